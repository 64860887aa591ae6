"""Decoding calibration: the fewest passes whose tokens still agree with the full schedule on held-out windows.

A trained policy decodes well with far fewer passes than one token per pass, but how few depends on the policy: how
sharp its per-token distributions are (a threshold that never fires saves nothing) and which block sizes it was
trained with. Calibration measures it instead of guessing:

    reference   the full schedule: the smallest trained block size, one token committed per pass (fixed)
    candidates  every trained block size B x steps_per_block S in {1 .. min(4, B), B} x (fixed | threshold tau)
    agreement   share of action tokens equal to the reference's, over the same held-out windows
    chosen      the candidate with the fewest mean passes (NFE) whose agreement is >= `level`
                (ties: higher agreement, then the smaller block, then fixed before threshold)

The result is stored in policy.yaml (`calibration`, checked by runtime.policy_schema.calibration) and its setting
becomes the policy's default decoding (`config.block_size / steps_per_block / schedule / threshold`): blockvla-export
does this unless told `--no-calibrate` (`calibrate_folder` on the folder's own ONNX Runtime graphs, the windows from
the run's validation split). The choice itself is pure numpy: the decoding is a callable, so any engine can run it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DEFAULT_LEVEL = 0.9
DEFAULT_WINDOWS = 64  # held-out windows decoded per setting
MAX_SMALL_STEPS = 4  # steps_per_block candidates 1..4 (and B): more passes than 4 are never "fewer passes"


@dataclass(frozen=True)
class Setting:
    """One blockdiff decoding setting (the policy.yaml decoding keys it overrides)."""

    block_size: int
    steps_per_block: int
    schedule: str = 'fixed'  # fixed | threshold
    threshold: Optional[float] = None  # threshold schedule only

    def __post_init__(self):
        if self.schedule not in ('fixed', 'threshold'):
            raise ValueError(f"schedule must be 'fixed' or 'threshold', got {self.schedule!r}")
        if not 1 <= self.steps_per_block <= self.block_size:
            raise ValueError(f'steps_per_block must be in [1, block_size {self.block_size}], got '
                             f'{self.steps_per_block}')
        if (self.schedule == 'threshold') != (self.threshold is not None):
            raise ValueError('a threshold is given exactly when the schedule is threshold')
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f'threshold must be in (0, 1], got {self.threshold}')

    def overrides(self) -> dict:
        """Keys for BlockVLAConfig.replace / PolicyRunner overrides (threshold kept when the schedule ignores it)."""
        out = {'block_size': self.block_size, 'steps_per_block': self.steps_per_block, 'schedule': self.schedule}
        if self.threshold is not None:
            out['threshold'] = self.threshold
        return out

    @property
    def label(self) -> str:
        if self.threshold is None:
            return f'B={self.block_size}, {self.steps_per_block} passes'
        return f'B={self.block_size}, <={self.steps_per_block} passes, tau {self.threshold:g}'

    def sort_key(self) -> tuple:
        return (self.block_size, self.schedule != 'fixed', self.steps_per_block, self.threshold or 0.0)


def reference_setting(block_sizes: Sequence[int]) -> Setting:
    """The full schedule: the smallest trained block, one token per pass."""
    b = min(block_sizes)
    return Setting(b, b, 'fixed')


def candidate_settings(block_sizes: Sequence[int], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list:
    """Every trained block size x steps_per_block in {1..min(4, B), B} x (fixed, each threshold)."""
    out = []
    for b in sorted(set(int(x) for x in block_sizes)):
        for s in sorted(set(range(1, min(MAX_SMALL_STEPS, b) + 1)) | {b}):
            out.append(Setting(b, s, 'fixed'))
            if s > 1:  # with one pass per block every token is taken at once: a threshold changes nothing
                out.extend(Setting(b, s, 'threshold', float(t)) for t in thresholds)
    return out


@dataclass
class Row:
    setting: Setting
    nfe: float  # mean passes per chunk (prefill counted; folded into the first refine pass: one)
    agreement: float  # share of tokens equal to the reference's
    bin_error: float  # mean |token - reference token| in bins

    def to_dict(self) -> dict:
        return {**asdict(self.setting), 'nfe': round(self.nfe, 4), 'agreement': round(self.agreement, 6),
                'bin_error': round(self.bin_error, 6)}


@dataclass
class Calibration:
    chosen: Setting
    level: float
    reference: Row
    rows: list  # [Row] per candidate, as measured
    windows: int
    source: str = ''  # where the windows came from
    notes: list = field(default_factory=list)

    @property
    def chosen_row(self) -> Row:
        return next(r for r in self.rows if r.setting == self.chosen)

    def to_dict(self) -> dict:
        """The policy.yaml `calibration` section."""
        return {'level': self.level, 'windows': self.windows, 'source': self.source,
                'reference': self.reference.to_dict(), 'chosen': self.chosen_row.to_dict(),
                'candidates': [r.to_dict() for r in self.rows]}

    def table(self) -> str:
        """Markdown: every candidate, the chosen one marked."""
        lines = ['| setting | NFE | token agreement | mean bin error |', '| --- | ---: | ---: | ---: |']
        for r in [self.reference] + [r for r in self.rows if r is not self.reference]:
            mark = ' **(chosen)**' if r.setting == self.chosen else ' (reference)' if r is self.reference else ''
            lines.append(f'| {r.setting.label}{mark} | {r.nfe:.2f} | {100 * r.agreement:.1f} % | '
                         f'{r.bin_error:.3f} |')
        return '\n'.join(lines)


@dataclass(frozen=True)
class CalibrationOptions:
    """What export's calibration measures (blockvla-export --calibration-level / -windows / -bags)."""

    level: float = DEFAULT_LEVEL  # minimum token agreement with the full schedule
    windows: int = DEFAULT_WINDOWS  # evenly spaced held-out windows
    bags: tuple = ()  # held-out recordings instead of the run's validation split
    thresholds: tuple = DEFAULT_THRESHOLDS

    def __post_init__(self):
        if not (isinstance(self.level, (int, float)) and math.isfinite(self.level) and 0.0 < self.level <= 1.0):
            raise ValueError(f'calibration level must be in (0, 1], got {self.level!r}')
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f'calibration windows must be a positive integer, got {self.windows!r}')


# decode(setting, window index) -> (tokens [L] int, nfe)
DecodeFn = Callable[[Setting, int], tuple]


def _measure(decode: DecodeFn, setting: Setting, n: int, reference: Optional[np.ndarray]) -> tuple:
    tokens, nfes = [], []
    for i in range(n):
        t, nfe = decode(setting, i)
        tokens.append(np.asarray(t, dtype=np.int64).reshape(-1))
        nfes.append(int(nfe))
    tokens = np.stack(tokens)  # [n, L]
    if reference is None:
        return tokens, Row(setting, float(np.mean(nfes)), 1.0, 0.0)
    agree = float((tokens == reference).mean())
    return tokens, Row(setting, float(np.mean(nfes)), agree, float(np.abs(tokens - reference).mean()))


def calibrate(decode: DecodeFn, n_windows: int, block_sizes: Sequence[int], level: float = DEFAULT_LEVEL,
              thresholds: Sequence[float] = DEFAULT_THRESHOLDS, candidates: Optional[Sequence[Setting]] = None,
              source: str = '', progress: Optional[Callable] = None) -> Calibration:
    """Decode `n_windows` held-out windows with the reference and every candidate; choose the fewest passes whose
    token agreement with the reference is >= `level` (the reference itself always qualifies)."""
    if not (isinstance(level, (int, float)) and math.isfinite(level) and 0.0 < level <= 1.0):
        raise ValueError(f'calibration level must be in (0, 1], got {level!r}')
    if not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f'calibration needs at least one held-out window, got {n_windows!r}')
    ref_setting = reference_setting(block_sizes)
    ref_tokens, ref_row = _measure(decode, ref_setting, n_windows, None)
    cands = list(candidates) if candidates is not None else candidate_settings(block_sizes, thresholds)
    rows = []
    for setting in cands:
        rows.append(ref_row if setting == ref_setting else _measure(decode, setting, n_windows, ref_tokens)[1])
        if progress is not None:
            progress(rows[-1])
    if ref_row not in rows:
        rows.append(ref_row)
    qualified = [r for r in rows if r.agreement >= level - 1e-12]
    best = min(qualified, key=lambda r: (round(r.nfe, 9), -r.agreement, r.setting.sort_key()))
    return Calibration(chosen=best.setting, level=float(level), reference=ref_row, rows=rows, windows=n_windows,
                       source=source)


def engine_decode_fn(engine, config, windows: Sequence) -> DecodeFn:
    """A DecodeFn over `engine` (torch or graph engine) and held-out `windows` [PrefixInputs]: blockdiff with
    the setting's decoding keys on top of `config`."""
    from ..runtime.decoding import Decoder

    decoders = {}

    def decode(setting: Setting, i: int):
        dec = decoders.get(setting)
        if dec is None:
            dec = decoders[setting] = Decoder(config.replace(**setting.overrides()), 'blockdiff')
        res = dec(engine, windows[i])
        return res.tokens, res.nfe

    return decode


def calibrate_folder(folder, train_config, options: CalibrationOptions = CalibrationOptions(),
                     threads: Optional[int] = None, progress: bool = False) -> Calibration:
    """Calibrate a policy folder on its own ONNX Runtime graphs: held-out windows from the run's validation split
    (`train_config`: the checkpoint's train_config.yaml), or every episode of `options.bags`."""
    from ..runtime.ort_engine import OrtEngine
    from ..runtime.policy_folder import load_policy_folder
    from ..runtime.runner import policy_preprocessor
    from ..training.validation import held_out_windows

    spec = load_policy_folder(folder)
    pre = policy_preprocessor(spec)
    windows, source = held_out_windows(train_config, spec.config, pre.text, pre.actions,
                                       bags=list(options.bags) or None, max_windows=options.windows)
    engine = OrtEngine(spec, threads=threads)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(candidate_settings(spec.config.block_sizes, options.thresholds)), unit='setting',
                   desc=f'calibrate {spec.name}')
    try:
        return calibrate(engine_decode_fn(engine, spec.config, windows), len(windows), spec.config.block_sizes,
                         level=options.level, thresholds=options.thresholds, source=source,
                         progress=(lambda row: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def calibrated_config(config: dict, calibration: Calibration) -> dict:
    """policy.yaml's `config` with the chosen setting as the default decoding (blockdiff)."""
    return {**config, 'decoder': 'blockdiff', **calibration.chosen.overrides()}


def recalibrate_folder(folder, train_config, options: CalibrationOptions = CalibrationOptions(),
                       threads: Optional[int] = None, progress: bool = False) -> Calibration:
    """Calibrate an exported policy folder (again) and rewrite it with the chosen setting as its default decoding:
    a folder exported before calibration existed, or held-out recordings the export did not have (`options.bags`).
    The weights are untouched; policy.yaml and the manifest are rewritten, the folder replaced atomically."""
    import shutil
    from pathlib import Path

    import yaml

    from ..io.atomic import atomic_directory, atomic_write_text
    from ..runtime.policy_folder import POLICY_FILE, load_policy_folder, write_manifest

    folder = Path(folder)
    spec = load_policy_folder(folder)
    if spec.config.decoder != 'blockdiff':
        raise ValueError(f'{folder}: decodes with {spec.config.decoder}; calibration chooses blockdiff settings')
    cal = calibrate_folder(folder, train_config, options, threads=threads, progress=progress)
    doc = yaml.safe_load((folder / POLICY_FILE).read_text())
    doc['config'] = calibrated_config(doc['config'], cal)
    doc['calibration'] = json.loads(json.dumps(cal.to_dict()))
    with atomic_directory(folder) as tmp:
        for name in spec.manifest:
            if name != POLICY_FILE:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, tmp / name)
        atomic_write_text(tmp / POLICY_FILE, yaml.safe_dump(doc, sort_keys=False))
        write_manifest(tmp)
        for p in [tmp, *tmp.rglob('*')]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        load_policy_folder(tmp)  # the rewritten folder verifies before it replaces the old one
    return cal


def main(argv=None) -> int:
    """python -m blockvla_ros.export.calibration --policy models/demo --train-config config/train/demo.yaml
    [--bags held_out/] [--level 0.9] [--windows 64]: recalibrate an exported folder in place."""
    import argparse
    import logging
    import sys

    p = argparse.ArgumentParser(prog='python -m blockvla_ros.export.calibration',
                                description=recalibrate_folder.__doc__)
    p.add_argument('--policy', required=True, help='exported policy folder, rewritten in place')
    p.add_argument('--train-config', required=True, help="the run's training config (its data section: topics, "
                   'rate and, without --bags, the validation split)')
    p.add_argument('--bags', nargs='+', default=(), help="held-out recordings instead of the run's validation split")
    p.add_argument('--level', type=float, default=DEFAULT_LEVEL, help=f'default {DEFAULT_LEVEL}')
    p.add_argument('--windows', type=int, default=DEFAULT_WINDOWS, help=f'default {DEFAULT_WINDOWS}')
    p.add_argument('--threads', type=int, help='ONNX Runtime threads')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        cal = recalibrate_folder(args.policy, args.train_config, CalibrationOptions(args.level, args.windows,
                                                                                    tuple(args.bags)),
                                 threads=args.threads, progress=True)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f'calibration: error: {e}', file=sys.stderr)
        return 1
    print(cal.table())
    row = cal.chosen_row
    print(f'default decoding of {args.policy} (calibrated on {cal.source}): {cal.chosen.label}, {row.nfe:.2f} NFE '
          f'per chunk (full schedule {cal.reference.nfe:.2f}), token agreement {row.agreement:.3f} >= {cal.level:g}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
