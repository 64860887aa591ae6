"""export_policy: a training checkpoint folder -> a verified policy folder (format 2), written atomically.

    from blockvla_ros.export.policy_writer import export_policy
    report = export_policy('runs/x/checkpoints/step_100', 'models/x')        # fp32, ONNX Runtime parity-checked
    report = export_policy(ckpt, 'models/x_int4', precision='int4')           # fp16 | int8 | int4: export.precision
    report = export_policy(ckpt, 'models/x', calibration=CalibrationOptions())  # default decoding calibrated
    report.folder, report.parity, report.seconds, report.sizes               # what was written and measured

Checkpoint folder (what BlockVLAPolicy.save + NormStats.save write): config.json, model.safetensors, stats.json
(+ tokenizer files when text_tokenizer is 'auto'). The policy folder holds each weight once: vision.onnx,
backbone.onnx (+ backbone.onnx.data above `inline_limit` bytes of weights) and tables.safetensors (its text table
quantized at int8 / int4: runtime.tables); see runtime.policy_folder. It is assembled in a temporary sibling,
checked (dims dynamic only in n, TensorRT op list, manifest, ONNX Runtime vs torch parity) and only then renamed into
place; any failure leaves the previous folder untouched. With `calibration`, the fewest passes that keep the tokens
of the full schedule on held-out windows of the run (export.calibration) become the folder's default decoding,
recorded in policy.yaml's `calibration`.
"""
from __future__ import annotations

import datetime
import gc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..io.atomic import atomic_directory, atomic_write_text, check_output_dir
from ..model.action_tokenizer import NormStats
from ..model.config import BlockVLAConfig
from ..runtime.policy_folder import (FORMAT_VERSION, POLICY_FILE, STATS_FILE, TABLES_FILE, WEIGHTS_FILE,
                                     load_policy_folder, write_manifest)
from ..runtime.tables import TEXT, quantize_text
from .calibration import CalibrationOptions, calibrate_folder, calibrated_config
from .onnx_checks import check_graph_file
from .onnx_export import INLINE_LIMIT, OPSET, export_backbone, export_vision
from .precision import (BITS, PRECISIONS, check_precision, check_quant_accuracy_level,  # noqa: F401
                        check_quant_block_size, default_tolerance, quantize_weights)

log = logging.getLogger(__name__)

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json', 'merges.txt',
                   'tokenizer.model', 'added_tokens.json', 'chat_template.jinja')
LIMITS_SOURCE = ('the range of the training actions (stats.json, 1st/99th percentile): decoded actions are bin '
                 'centres inside it. Not the robot\'s limits: the node clamps to its action_limits.* parameters')


class CheckpointError(ValueError):
    """The checkpoint folder is missing a file or does not load."""


@dataclass
class ExportReport:
    folder: Path
    name: str
    graphs: dict  # key -> file
    parity: list  # ParityReport dicts
    checks: dict  # key -> {'ops', 'opset', 'dynamic'}
    seconds: float
    files: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)  # file -> bytes; 'weights' -> parameter bytes at fp32
    calibration: Optional[object] = None  # export.calibration.Calibration, when calibrated


def load_checkpoint(folder: str | Path):
    """-> (BlockVLAPolicy in eval mode, NormStats). Errors name the folder and the missing file."""
    from ..model.policy import BlockVLAPolicy

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f'checkpoint folder not found: {folder}')
    steps = sorted((folder if folder.name == 'checkpoints' else folder / 'checkpoints').glob('step_*'))
    if steps and not (folder / 'config.json').is_file():  # blockvla-train's out_dir (or its checkpoints/)
        raise CheckpointError(f'{folder} is a training run folder, not a checkpoint: give one of its checkpoints, '
                              f'e.g. the newest, {steps[-1]}')
    for name in ('config.json', WEIGHTS_FILE, STATS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f'{folder}: {name} is missing (a checkpoint holds config.json, '
                                  'model.safetensors and stats.json)')
    config = BlockVLAConfig.load(folder / 'config.json')
    stats = NormStats.load(folder / STATS_FILE)
    if len(stats.action_low) != config.action_dim:
        raise CheckpointError(f'{folder / STATS_FILE}: {len(stats.action_low)} action dims, config.json has '
                              f'{config.action_dim}')
    return BlockVLAPolicy.load(folder, config).eval(), stats


def _tokenizer_sources(checkpoint: Path, config: BlockVLAConfig) -> list:
    if config.text_tokenizer != 'auto':
        return []
    for src in (checkpoint, Path(config.backbone_path) if config.backbone_path else None):
        if src is not None and src.is_dir():
            files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
            if files:
                return files
    raise CheckpointError(f"{checkpoint}: text_tokenizer is 'auto' but no tokenizer files were found next to the "
                          'checkpoint or in backbone_path')


# Instructions the runtime's tokenizer must encode exactly as training's did (words in and out of a small vocabulary,
# upper case, punctuation, digits).
TOKENIZER_SAMPLES = ('touch the red block', 'touch red, then green, then blue', 'Press the YELLOW square and then the '
                     'blue one!', 'pick up the mug and put it on plate 2', 'ouvrir la porte')


def _write_tokenizer_json(source: Path, out: Path) -> None:
    """A backbone without tokenizer.json (slow tokenizer files only): write the fast tokenizer's own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    if not getattr(tok, 'is_fast', False):
        raise CheckpointError(f'{source}: no tokenizer.json and {type(tok).__name__} has no fast version; the runtime '
                              'reads tokenizer.json (tokenizers library, no transformers)')
    tok.backend_tokenizer.save(str(out / 'tokenizer.json'))


def check_tokenizer_parity(runtime_tokenizer, source: Path, config: BlockVLAConfig) -> None:
    """The runtime reads tokenizer.json with the tokenizers library; training used transformers' AutoTokenizer on
    ``source``. Refuse the export if they disagree on any sample instruction."""
    from ..model.text_tokenizer import load_text_tokenizer

    if config.is_vlm:  # training filled the VLM's instruction slot with its tokenizer.json (model.vlm.slot_tokenizer)
        from ..model.vlm.slot_tokenizer import slot_tokenizer

        reference = slot_tokenizer(source, config.max_text_tokens, config.vlm_layout)
    else:
        reference = load_text_tokenizer('auto', config.max_text_tokens, 0, folder=source)
    for text in TOKENIZER_SAMPLES:
        outcomes = []
        for tok in (reference, runtime_tokenizer):
            try:
                outcomes.append(tuple(tok.encode(text)[0].tolist()))
            except ValueError as e:  # too long for max_text_tokens, special tokens only: both must refuse
                outcomes.append(type(e).__name__)
        if outcomes[0] != outcomes[1]:
            raise CheckpointError(f'{source}: the runtime tokenizer (tokenizer.json via the tokenizers library) '
                                  f'encodes {text!r} as {outcomes[1]}, training\'s AutoTokenizer as {outcomes[0]}')


def _readable(folder: Path) -> None:
    """Temp files/dirs are created private (0600/0700); a policy folder is shared read-only data."""
    os.chmod(folder, 0o755)
    for p in folder.iterdir():
        os.chmod(p, 0o644)


def _plain(data):
    """YAML-safe copy (tuples -> lists etc.)."""
    return json.loads(json.dumps(data))


def export_policy(checkpoint: str | Path, out: str | Path, *, name: Optional[str] = None, precision: str = 'fp32',
                  opset: int = OPSET, torch_weights: bool = False, inline_limit: int = INLINE_LIMIT,
                  parity_samples: int = 4, tolerance: float = 1e-3, min_agreement: float = 0.0,
                  threads: Optional[int] = None, progress: bool = True,
                  calibration: Optional[CalibrationOptions] = None,
                  quant_accuracy_level: Optional[int] = None,
                  quant_block_size: Optional[int] = None) -> ExportReport:
    """Export `checkpoint` into the policy folder `out` (replaced atomically on success).

    precision: fp32 | fp16 | int8 | int4 (see export.precision: what each stores, how parity is judged).
    torch_weights: also copy model.safetensors (engine 'torch'; a second copy of every weight).
    inline_limit: weight bytes above which a graph keeps its weights in one `<file>.data` (default 16 MiB; an int8/int4
    backbone always does: export.precision.quantize_weights).
    tolerance: max lock-step |logits diff| vs the fp32 torch policy (fp32 only); min_agreement: minimum token
    agreement (every precision; 0 = reported only).
    threads: CPU threads for the parity run (torch and ONNX Runtime); None keeps the libraries' defaults.
    calibration: calibrate the default decoding on held-out windows (the run's validation split, read through the
    checkpoint's train_config.yaml, or options.bags); None keeps the training config's decoding.
    quant_accuracy_level: int8/int4 only: MatMulNBits' accuracy_level (export.quantize; None: the default,
    export.precision.DEFAULT_ACCURACY_LEVEL).
    quant_block_size: int8/int4 only: weights per scale, in the backbone's MatMulNBits blocks and the text table's
    groups (a power of two >= 16; None: export.precision.default_block_size of the backbone's hidden size; recorded
    in policy.yaml's export section).
    """
    from tqdm import tqdm

    start = time.perf_counter()
    checkpoint, out = Path(checkpoint), check_output_dir(out)  # before any work
    check_precision(precision)
    quant_accuracy_level = check_quant_accuracy_level(precision, quant_accuracy_level)
    check_quant_block_size(precision, quant_block_size)  # refused before any work; the default needs the width
    if parity_samples < 0 or (parity_samples == 0 and min_agreement > 0):
        raise ValueError(f'parity_samples must be >= 0 and > 0 when a minimum token agreement ({min_agreement}) is '
                         f'required, got {parity_samples}')
    _check_parity_options(tolerance, min_agreement, threads, inline_limit)
    policy, stats = load_checkpoint(checkpoint)
    quant_block_size = check_quant_block_size(precision, quant_block_size, policy.hidden_size)
    train_config = _calibration_source(checkpoint) if calibration is not None else None
    config = policy.portable_config()
    config = config.replace(action_kinds=config.kinds)  # written out: absolute where training did not say
    weight_bytes = sum(p.numel() * 4 for p in policy.parameters())
    shapes = {'kv_shape': list(policy.kv_shape), 'prefix': _plain(policy.layout.to_dict())}  # for policy.yaml
    name = name or out.name
    with atomic_directory(out) as tmp:
        graphs, checks = {}, {}
        if precision == 'fp16':
            policy.half()  # traced in half precision; the parity reference is reloaded in fp32 below
        steps = (('vision', export_vision), ('backbone', export_backbone))
        for key, fn in tqdm(steps, desc=f'export {name}', unit='graph', disable=not progress):
            graphs[key] = fn(policy, tmp, opset=opset, inline_limit=inline_limit)
            checks[key] = check_graph_file(tmp / graphs[key].file)  # dims vary only in n, past + TensorRT op list
        _write_tables(policy, tmp / TABLES_FILE, precision, quant_block_size)
        if precision != 'fp32':  # parity's reference is the fp32 policy: reloaded below
            del policy  # not held while the graph is rewritten: peak RSS ~ one copy of the model, not two
            gc.collect()
        if precision in ('int8', 'int4'):  # weight-only MatMulNBits: ONNX Runtime only
            graphs['backbone'].data = quantize_weights(tmp / graphs['backbone'].file, precision, quant_accuracy_level,
                                                       quant_block_size)
            checks['backbone'] = check_graph_file(tmp / graphs['backbone'].file, tensorrt=False)
        if precision != 'fp32':  # the fp32 parity reference, only when parity is checked (a second model's peak)
            policy = load_checkpoint(checkpoint)[0] if parity_samples else None
        stats.save(tmp / STATS_FILE)
        if torch_weights:
            shutil.copyfile(checkpoint / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        tokenizer_files = []
        sources = _tokenizer_sources(checkpoint, config)
        for src in sources:
            shutil.copyfile(src, tmp / src.name)
            tokenizer_files.append(src.name)
        if sources and 'tokenizer.json' not in tokenizer_files:
            _write_tokenizer_json(sources[0].parent, tmp)  # the runtime reads tokenizer.json only
            tokenizer_files.append('tokenizer.json')
        doc = _policy_doc(shapes, config, stats, name, graphs, tokenizer_files, torch_weights, opset, checkpoint)
        doc['precision'] = precision
        if precision in BITS:  # provenance: the default depends on the backbone's width
            doc['export'].update(quant_block_size=quant_block_size, quant_accuracy_level=quant_accuracy_level)
        atomic_write_text(tmp / POLICY_FILE, yaml.safe_dump(doc, sort_keys=False))
        write_manifest(tmp)
        tolerance = default_tolerance(precision, tolerance)
        recorded = _record_parity(policy, tmp, parity_samples, threads, sources[0].parent if sources else None)
        del policy  # the reference's answers are recorded: not held beside the folder's session (a second copy)
        gc.collect()
        reports = _check_parity(recorded, tolerance, min_agreement, threads)
        doc['export']['parity'] = {'tolerance': tolerance, 'min_agreement': min_agreement,
                                   'results': [r.to_dict() for r in reports]}
        cal = None
        if train_config is not None and config.decoder != 'blockdiff':
            log.warning('not calibrated: the policy decodes with %s (calibration chooses blockdiff settings)',
                        config.decoder)
        elif train_config is not None:
            cal = calibrate_folder(tmp, train_config, calibration, threads=threads, progress=progress)
            doc['config'] = calibrated_config(doc['config'], cal)
            doc['calibration'] = _plain(cal.to_dict())
            log.info('calibrated default decoding: %s, %.2f NFE per chunk (full schedule %.2f), token agreement '
                     '%.3f >= %g', cal.chosen.label, cal.chosen_row.nfe, cal.reference.nfe, cal.chosen_row.agreement,
                     cal.level)
        atomic_write_text(tmp / POLICY_FILE, yaml.safe_dump(doc, sort_keys=False))
        write_manifest(tmp)
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        sizes['weights'] = weight_bytes
        _readable(tmp)
    seconds = time.perf_counter() - start
    log.info('exported %s to %s in %.1f s (parity max diff %s)', name, out, seconds,
             f'{max(r.max_abs_diff for r in reports):.2g}' if reports else 'not checked')
    return ExportReport(folder=out, name=name, graphs={k: g.file for k, g in graphs.items()},
                        parity=[r.to_dict() for r in reports], checks=checks, seconds=seconds,
                        files=[f for f in sizes if f != 'weights'], sizes=sizes, calibration=cal)


def _calibration_source(checkpoint: Path) -> Path:
    """The run's training config next to the checkpoint (its data section names the validation split)."""
    path = checkpoint / 'train_config.yaml'
    if not path.is_file():
        raise CheckpointError(f'{checkpoint}: train_config.yaml is missing, so the run\'s validation split for '
                              'calibrating the default decoding is unknown (blockvla-train writes it into every '
                              'checkpoint); export with --no-calibrate to keep the config\'s decoding')
    return path


def _write_tables(policy, path: Path, precision: str, block_size: Optional[int]) -> None:
    """The small tables in the policy's float type (fp32, or fp16 for an fp16 export); at int8 / int4 the text table
    is stored quantized in groups of `block_size` (runtime.tables: the layout, the group recorded in the file's
    metadata), the small ones stay fp32."""
    from safetensors.numpy import save_file

    from ..model.graphs import tables

    dtype = next(policy.parameters()).dtype
    arrays = {k: v.to(dtype).numpy() for k, v in tables(policy).items()}  # fp32: views of the parameters, not copies
    metadata = None
    if precision in BITS:
        text, metadata = quantize_text(arrays.pop(TEXT), BITS[precision], block_size)  # reads the fp32 table
        arrays.update(text)
    save_file(arrays, str(path), metadata=metadata)


def _policy_doc(shapes, config, stats, name, graphs, tokenizer_files, torch_weights, opset, checkpoint) -> dict:
    """policy.yaml's content; `shapes`: the policy's kv_shape and prefix layout (so no model need be held here)."""
    import onnx
    import torch
    import transformers

    return {
        'format_version': FORMAT_VERSION,
        'name': name,
        'config': _plain(config.to_dict()),
        'kv_shape': shapes['kv_shape'],
        'image_size': config.image_size,
        'prefix': shapes['prefix'],
        'actions': {'names': list(config.action_names) or [f'a{i}' for i in range(config.action_dim)],
                    'low': [float(x) for x in stats.action_low], 'high': [float(x) for x in stats.action_high],
                    'limits_source': LIMITS_SOURCE},
        'graphs': {k: g.to_dict() for k, g in graphs.items()},
        'tables': TABLES_FILE,
        'precision': 'fp32',
        'weights': WEIGHTS_FILE if torch_weights else None,
        'tokenizer_files': tokenizer_files,
        'export': {'exporter': 'dynamo', 'opset': opset, 'torch': str(torch.__version__),
                   'transformers': str(transformers.__version__), 'onnx': str(onnx.__version__),
                   'created_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                   'checkpoint': str(checkpoint.resolve())},
    }


def _check_parity_options(tolerance: float, min_agreement: float, threads: Optional[int], inline_limit: int) -> None:
    """Refused before any work: a negative tolerance or an agreement above 1 let the whole export run and then
    failed its parity check with a figure that matched."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f'the parity tolerance (--tolerance) must be a positive number, got {tolerance}')
    if not (isinstance(min_agreement, (int, float)) and 0.0 <= min_agreement <= 1.0):
        raise ValueError(f'the minimum token agreement (--min-agreement) must be in [0, 1], got {min_agreement}')
    if threads is not None and threads < 0:
        raise ValueError(f'threads (--threads) must be >= 0 (0: the libraries\' defaults), got {threads}')
    if inline_limit < 0:
        raise ValueError(f'the inline limit (--inline-limit-mb) must be >= 0, got {inline_limit / 2**20:g} MiB')


def _record_parity(policy, folder: Path, samples: int, threads: Optional[int],
                   tokenizer_source: Optional[Path] = None) -> Optional[tuple]:
    """The runtime's tokenizer vs training's (tokenizer_source), then the torch reference's side of the parity check
    on the folder as a runtime sees it (manifest verified), both prefill paths: (spec, preprocessor, observations,
    [(label, reuse, decoders, tape)]) for `_check_parity`, or None when parity is not checked (samples == 0). Holds no
    reference to `policy` afterwards, so the caller can drop it before the ONNX Runtime session opens."""
    import torch

    from ..runtime.runner import policy_preprocessor
    from ..runtime.torch_engine import TorchEngine
    from .parity import random_observations, record_reference

    spec = load_policy_folder(folder)
    pre = policy_preprocessor(spec)
    if tokenizer_source is not None:
        check_tokenizer_parity(pre.text, tokenizer_source, spec.config)
    if samples == 0:
        return None  # not checked (the folder is still loaded and its tokenizer checked); the CLI says so
    observations = random_observations(spec.config, spec.stats, samples, seed=0, tokenizer=pre.text)
    runs = []
    torch_threads = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        for reuse in (True, False):
            reference = TorchEngine(policy, reuse_instruction=reuse)
            if reuse or reference.split:  # with an instruction split the one-call prefill is a second path
                label = 'onnxruntime' if reuse else 'onnxruntime (one-call prefill)'
                decoders = ('blockdiff', 'ar', 'fulldiff') if reuse else ('blockdiff',)
                runs.append((label, reuse, decoders, record_reference(spec.config, reference, observations, pre,
                                                                      decoders)))
            del reference
    finally:
        torch.set_num_threads(torch_threads)
    return spec, pre, observations, runs


def _check_parity(recorded: Optional[tuple], tolerance: Optional[float], min_agreement: float,
                  threads: Optional[int]) -> list:
    """ONNX Runtime on the folder vs the torch reference recorded by `_record_parity`, replayed call by call."""
    from ..runtime.ort_engine import OrtEngine
    from .parity import compare_recorded, require_parity

    if recorded is None:
        return []
    spec, pre, observations, runs = recorded
    reports = []
    for label, reuse, decoders, tape in runs:
        engine = OrtEngine(spec, threads=threads, reuse_text_kv=reuse)
        reports.append(compare_recorded(spec.config, tape, engine, observations, pre, label, decoders))
        del engine
    for r in reports:
        require_parity(r, tolerance, min_agreement)
    return reports
