"""export_policy: a training checkpoint folder -> a verified policy folder, written atomically.

Checkpoint folder (what BlockVLAPolicy.save + NormStats.save write): config.json, model.safetensors, stats.json
(+ tokenizer files when text_tokenizer is 'auto'). The policy folder is assembled in a temporary sibling,
checked (static shapes, TensorRT op list, manifest, ONNX Runtime vs torch parity) and only then renamed into
place; any failure leaves the previous folder untouched.
"""
from __future__ import annotations

import datetime
import json
import logging
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
from ..runtime.policy_folder import (FORMAT_VERSION, POLICY_FILE, STATS_FILE, WEIGHTS_FILE, load_policy_folder,
                                     write_manifest)
from .onnx_checks import check_graph_file
from .onnx_export import DEFAULT_OPSET, export_graph, plan_graphs

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
    checks: dict  # key -> {'ops', 'opset'}
    seconds: float
    files: list = field(default_factory=list)


def load_checkpoint(folder: str | Path):
    """-> (BlockVLAPolicy in eval mode, NormStats). Errors name the folder and the missing file."""
    from ..model.policy import BlockVLAPolicy

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f'checkpoint folder not found: {folder}')
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


def export_policy(checkpoint: str | Path, out: str | Path, *, name: Optional[str] = None, exporter: str = 'legacy',
                  opset: Optional[int] = None, split_prefill: bool = True, torch_weights: bool = True,
                  parity_samples: int = 4, tolerance: float = 1e-3, threads: Optional[int] = None,
                  progress: bool = True) -> ExportReport:
    """Export `checkpoint` into the policy folder `out` (replaced atomically on success).

    threads: CPU threads for the parity run (torch and ONNX Runtime); None keeps the libraries' defaults.
    """
    import onnx
    import torch
    import transformers
    from tqdm import tqdm

    from ..runtime.ort_engine import OrtEngine
    from ..runtime.runner import policy_preprocessor
    from ..runtime.torch_engine import TorchEngine
    from .parity import compare_engines, random_observations, require_parity

    start = time.perf_counter()
    checkpoint, out = Path(checkpoint), check_output_dir(out)  # before any work
    policy, stats = load_checkpoint(checkpoint)
    config = policy.portable_config()
    config = config.replace(action_kinds=config.kinds)  # written out: absolute where training did not say
    name = name or out.name
    with atomic_directory(out) as tmp:
        plans = plan_graphs(policy, split_prefill=split_prefill)
        graphs, checks = {}, {}
        for plan in tqdm(plans, desc=f'export {name}', unit='graph', disable=not progress):
            spec = export_graph(plan, tmp, exporter=exporter, opset=opset)
            checks[plan.key] = check_graph_file(tmp / spec.file)  # static shapes + TensorRT op list
            graphs[plan.key] = spec
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
        doc = {
            'format_version': FORMAT_VERSION,
            'name': name,
            'config': _plain(config.to_dict()),
            'kv_shape': list(policy.kv_shape),
            'image_size': config.image_size,
            'prefix': {'order': config.prefix_order, 'text_tokens': config.max_text_tokens,
                       'image_tokens': config.n_image_tokens, 'state_token': bool(config.state_dim),
                       'length': config.prefix_len, 'max_seq_len': config.max_seq_len},
            'actions': {'names': list(config.action_names) or [f'a{i}' for i in range(config.action_dim)],
                        'low': [float(x) for x in stats.action_low], 'high': [float(x) for x in stats.action_high],
                        'limits_source': LIMITS_SOURCE},
            'graphs': {k: g.to_dict() for k, g in graphs.items()},
            'weights': WEIGHTS_FILE if torch_weights else None,
            'tokenizer_files': tokenizer_files,
            'export': {'exporter': exporter, 'opset': opset or DEFAULT_OPSET[exporter], 'torch': str(torch.__version__),
                       'transformers': str(transformers.__version__), 'onnx': str(onnx.__version__),
                       'created_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                       'checkpoint': str(checkpoint.resolve())},
        }
        atomic_write_text(tmp / POLICY_FILE, yaml.safe_dump(doc, sort_keys=False))
        write_manifest(tmp)

        spec = load_policy_folder(tmp)  # the folder as a runtime sees it (manifest verified)
        pre = policy_preprocessor(spec)
        if sources:
            check_tokenizer_parity(pre.text, sources[0].parent, spec.config)
        observations = random_observations(spec.config, spec.stats, parity_samples, seed=0, tokenizer=pre.text)
        reference = TorchEngine(policy)
        reports = []
        torch_threads = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(int(threads))
            engine = OrtEngine(spec, threads=threads, reuse_text_kv=True)
            reports.append(compare_engines(spec.config, reference, engine, observations, pre, 'onnxruntime'))
            if spec.split_prefill:  # the one-call prefill graph too
                engine = OrtEngine(spec, threads=threads, reuse_text_kv=False)
                reports.append(compare_engines(spec.config, reference, engine, observations, pre,
                                               'onnxruntime (prefill.onnx)', decoders=('blockdiff',)))
            del engine
        finally:
            torch.set_num_threads(torch_threads)
        for r in reports:
            require_parity(r, tolerance)
        doc['export']['parity'] = {'tolerance': tolerance, 'results': [r.to_dict() for r in reports]}
        atomic_write_text(tmp / POLICY_FILE, yaml.safe_dump(doc, sort_keys=False))
        write_manifest(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        _readable(tmp)
    seconds = time.perf_counter() - start
    log.info('exported %s to %s in %.1f s (%d graphs, parity max diff %.2g)', name, out, seconds, len(graphs),
             max(r.max_abs_diff for r in reports))
    return ExportReport(folder=out, name=name, graphs={k: g.file for k, g in graphs.items()},
                        parity=[r.to_dict() for r in reports], checks=checks, seconds=seconds, files=files)
