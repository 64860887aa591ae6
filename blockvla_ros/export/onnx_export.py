"""torch -> ONNX for every graph a policy folder holds: static shapes, batch 1, logits over the bins only.

Traces exactly `model.graphs` (VisionGraph, PrefillGraph, StepGraph) plus the split prefill of
`export.prefix_graphs`. The step graph is exported once per width n the decoders need:

    block_step.onnx  n = block_size   (block diffusion refine + commit passes)
    ar_step.onnx     n = 1            (AR with KV cache)
    full_step.onnx   n = H*D          (full-sequence diffusion)

Exporters: 'legacy' (TorchScript, opset 18; ~0.5 s per tiny graph, the default) or 'dynamo' (opset 20, cleaner
graphs, ~4 s per graph). Shape arithmetic is folded into constants (export.onnx_fold), so every intermediate
shape is static too. Weights stay inline below 1 GiB per graph, otherwise in one `<file>.data` sidecar.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..model.graphs import PrefillGraph, StepGraph, VisionGraph
from ..runtime.policy_folder import GraphSpec, TensorSpec
from .onnx_checks import io_specs
from .onnx_fold import fold_constants
from .prefix_graphs import ObsPrefillGraph, TextPrefillGraph

log = logging.getLogger(__name__)

EXPORTERS = ('legacy', 'dynamo')
DEFAULT_OPSET = {'legacy': 18, 'dynamo': 20}
INLINE_LIMIT = 1 << 30  # bytes of weights per graph kept inside the .onnx file


@dataclass
class GraphPlan:
    key: str
    file: str
    module: nn.Module
    args: tuple
    inputs: list
    outputs: list
    step_width: Optional[int] = None


def step_files(config) -> dict:
    """{n: file} for the step widths the decoders use (one file per distinct n)."""
    out = {}
    for n, file in ((config.block_size, 'block_step.onnx'), (1, 'ar_step.onnx'),
                    (config.n_action_tokens, 'full_step.onnx')):
        out.setdefault(n, file)
    return out


def plan_graphs(policy, split_prefill: bool = True) -> list:
    """The graphs to export with example inputs (generic values: padding and invalid cache slots included)."""
    cfg = policy.config
    layers, kv_heads, head_dim = policy.kv_shape
    gen = torch.Generator().manual_seed(0)
    lt, p, t_max = cfg.max_text_tokens, cfg.prefix_len, cfg.max_seq_len
    vocab = int(policy.llm.config.vocab_size)
    from ..runtime.preprocess import image_processor_for

    shape = (1, 3, cfg.image_size, cfg.image_size) if not cfg.is_vlm else image_processor_for(cfg).pixel_shape
    pixels = torch.randn(*shape, generator=gen)
    text_ids = torch.randint(0, vocab, (1, lt), generator=gen)
    text_valid = torch.zeros(1, lt, dtype=torch.bool)
    text_valid[:, lt // 2:] = True  # left-padded
    image_tokens = torch.randn(1, cfg.n_image_tokens, policy.hidden_size, generator=gen)
    state = torch.randn(1, cfg.state_dim, generator=gen) if cfg.state_dim else None
    text_kv = torch.randn(layers, 2, kv_heads, lt, head_dim, generator=gen)
    with_state = (lambda names, args: (names + ['state'], args + (state,))) if cfg.state_dim else \
        (lambda names, args: (names, args))

    plans = [GraphPlan('vision', 'vision.onnx', VisionGraph(policy), (pixels,), ['pixels'], ['image_tokens'])]
    names, args = with_state(['text_ids', 'text_valid', 'image_tokens'], (text_ids, text_valid, image_tokens))
    plans.append(GraphPlan('prefill', 'prefill.onnx', PrefillGraph(policy), args, names, ['logits', 'kv']))
    if split_prefill and cfg.prefix_order == 'text_first' and not cfg.is_vlm:  # a VLM's image comes first
        plans.append(GraphPlan('text_prefill', 'text_prefill.onnx', TextPrefillGraph(policy), (text_ids, text_valid),
                               ['text_ids', 'text_valid'], ['text_kv']))
        names, args = with_state(['image_tokens', 'text_kv', 'text_valid'], (image_tokens, text_kv, text_valid))
        plans.append(GraphPlan('obs_prefill', 'obs_prefill.onnx', ObsPrefillGraph(policy), args, names,
                               ['logits', 'kv']))
    kv = torch.randn(layers, 2, kv_heads, t_max, head_dim, generator=gen)
    kv_valid = torch.zeros(1, t_max, dtype=torch.bool)
    kv_valid[:, lt // 2:p] = True  # valid prefix, nothing committed yet
    for n, file in step_files(cfg).items():
        tokens = torch.randint(0, cfg.n_bins + 1, (1, n), generator=gen)
        positions = (p - lt // 2 + torch.arange(n))[None]  # [1, n]
        if policy.layout is not None and policy.layout.rope_dims == 3:
            positions = positions[None].expand(3, 1, n).contiguous()  # M-RoPE: [3, 1, n]
        plans.append(GraphPlan(f'step_{n}', file, StepGraph(policy), (tokens, positions, kv, kv_valid),
                               ['tokens', 'positions', 'kv', 'kv_valid'], ['logits', 'new_kv'], step_width=n))
    return plans


def export_graph(plan: GraphPlan, folder: Path, exporter: str = 'legacy', opset: Optional[int] = None) -> GraphSpec:
    """Export one plan into `folder`; -> its GraphSpec (I/O names, static shapes, dtypes, sidecars)."""
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    folder = Path(folder)
    path = folder / plan.file
    before = {p.name for p in folder.iterdir()}
    plan.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if exporter == 'legacy':
            torch.onnx.export(plan.module, plan.args, str(path), input_names=plan.inputs, output_names=plan.outputs,
                              opset_version=opset or DEFAULT_OPSET['legacy'], do_constant_folding=True, dynamo=False)
        else:
            torch.onnx.export(plan.module, plan.args, str(path), input_names=plan.inputs, output_names=plan.outputs,
                              opset_version=opset or DEFAULT_OPSET['dynamo'], dynamo=True, external_data=True,
                              verbose=False)
    written = {p.name for p in folder.iterdir()} - before - {plan.file}
    data = _finalize(path, sidecars=written)
    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = io_specs(model)
    if [t['name'] for t in inputs] != plan.inputs or [t['name'] for t in outputs] != plan.outputs:
        raise RuntimeError(f'{path}: exported I/O {[t["name"] for t in inputs]} -> {[t["name"] for t in outputs]}'
                           f' differ from {plan.inputs} -> {plan.outputs} (an input unused by the graph?)')
    return GraphSpec(key=plan.key, file=plan.file, data=data, step_width=plan.step_width,
                     inputs=[TensorSpec(**t) for t in inputs], outputs=[TensorSpec(**t) for t in outputs])


def _finalize(path: Path, sidecars: set) -> list:
    """Fold shape arithmetic, then store weights inline below INLINE_LIMIT, else in one `<file>.data` sidecar.

    -> the sidecar file names (empty when inline)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fold_constants(model)
    if not sidecars:
        onnx.save_model(model, str(path))
        return []
    onnx.load_external_data_for_model(model, str(path.parent))
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    for name in sidecars:
        (path.parent / name).unlink()
    if size < INLINE_LIMIT:
        onnx.save_model(model, str(path))
        return []
    location = path.name + '.data'
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)
    return [location]
