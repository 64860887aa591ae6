"""torch -> ONNX for the two graphs of a policy folder (`model.graphs`): vision (static) and backbone (dynamic n).

    vision.onnx     pixels [1, 3, S, S] (a VLM: its processor's pixel shape) -> image_tokens [1, Ni, hidden]
    backbone.onnx   embeds [1, n, hidden], positions [1, n], mask [K, 1, n, past + n] (K: model.graphs),
                    logit_rows [m] int64, past_key_i / past_value_i [1, kv_heads, past, head_dim]
                    -> logits [1, m, n_bins], new_kv [layers, 2, kv_heads, n, head_dim]; n, past and m in [1, T_max]
                    ('n', 'past', 'm' in the graph: the runtime binds the whole cache, past = T_max, or only the slots
                    a pass reads, and asks for the logits of the rows it reads)

The backbone goes through the dynamo exporter (torch.export, opset 20, n, past and m as symbolic dims), which
writes the weights straight from the torch parameters into one external-data file, tensor by tensor: no second
in-memory copy of the model and no constant folding over the weights here. The vision graph is static and goes
through the TorchScript exporter (opset 18): VLM towers such as Qwen2.5-VL's compute window indices from data, which
torch.export cannot trace, and a static graph needs nothing more; its inline weights are moved to one external-data
file right after, so both graphs continue alike, the graph read without its weights. A graph whose weights stay
below `INLINE_LIMIT` (16 MiB: the demo's graphs, a real backbone's vision graph) is then rewritten with its weights
inline (one file, written one tensor at a time: export.onnx_inline); above it, the graph keeps its single
`<file>.data`, which is also what lets a graph pass protobuf's 2 GiB limit, and what ONNX Runtime memory-maps and
drops once it has folded or pre-packed the weights, where an inline graph's weights are parsed into the heap
(SmolLM2-360M fp16 on a CPU: runner 1.51 vs 1.63 GB, load peak 1.52 vs 2.08 GB; docs/benchmarks/real_size.md).
Before that,
`export.onnx_rewrites` folds each Reciprocal -> Mul into a Div (standard ONNX), so ONNX Runtime fuses every RMSNorm
into one kernel at session load.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..model.graphs import BackboneGraph, VisionGraph, past_inputs, past_names
from ..runtime.policy_folder import GraphSpec, TensorSpec
from .onnx_checks import io_specs
from .onnx_inline import write_inline
from .onnx_rewrites import reciprocal_mul_to_div

log = logging.getLogger(__name__)

OPSET = 20  # TensorRT 10 parses up to 20; 23+ would emit fused Attention/RMSNormalization of unknown support
VISION_OPSET = 18  # the TorchScript exporter's
INLINE_LIMIT = 16 << 20  # bytes of weights kept inside a .onnx file; above: one <file>.data sidecar


def _free_size(taken: set, start: int = 3) -> int:
    """An example token count equal to no other dimension (torch.export would tie the two otherwise)."""
    n = start
    while n in taken:
        n += 1
    return n


def backbone_example(policy) -> tuple:
    """Example inputs of the backbone graph (generic values; n, past and m differ from every static dimension and
    from each other; the m logit rows are distinct rows of the n)."""
    cfg = policy.config
    layers, kv_heads, head_dim = policy.kv_shape
    t_max, hidden = cfg.max_seq_len, policy.hidden_size
    dtype = next(policy.llm.parameters()).dtype
    taken = {layers, kv_heads, head_dim, t_max, hidden, cfg.n_bins, 2}
    m = _free_size(taken)
    n = _free_size(taken | {m}, start=m + 1)
    past = _free_size(taken | {n, m}, start=max(n + 1, t_max // 2))
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, n, hidden, generator=gen).to(dtype)
    positions = (t_max // 2 + torch.arange(n))[None]
    if policy.layout.rope_dims != 1:  # M-RoPE: [3, 1, n]
        positions = positions[None].expand(policy.layout.rope_dims, 1, n).contiguous()
    mask = torch.rand(max(len(cfg.attention_windows), 1), 1, n, past + n, generator=gen) > 0.5
    mask[..., past:] |= torch.eye(n, dtype=torch.bool)
    kv = torch.zeros(layers, 2, kv_heads, past, head_dim, dtype=dtype)
    rows = torch.arange(n - m, n)  # [m]
    return embeds, positions, mask, rows, past_inputs(kv)


def export_vision(policy, folder: Path, opset: int = OPSET, inline_limit: int = INLINE_LIMIT) -> GraphSpec:
    from ..runtime.preprocess import image_processor_for

    cfg = policy.config
    shape = (1, 3, cfg.image_size, cfg.image_size) if not cfg.is_vlm else image_processor_for(cfg).pixel_shape
    pixels = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(next(policy.vision.parameters()).dtype)
    return _export(VisionGraph(policy), (pixels,), None, ['pixels'], ['image_tokens'], Path(folder) / 'vision.onnx',
                   'vision', min(opset, VISION_OPSET), inline_limit)


def export_backbone(policy, folder: Path, opset: int = OPSET, inline_limit: int = INLINE_LIMIT) -> GraphSpec:
    layers = policy.kv_shape[0]
    t_max = policy.config.max_seq_len
    args = backbone_example(policy)
    n = torch.export.Dim('n', min=1, max=t_max)
    past = torch.export.Dim('past', min=1, max=t_max)
    m = torch.export.Dim('m', min=1, max=t_max)
    pos_axis = 1 if policy.layout.rope_dims == 1 else 2
    # the mask's last dim is past + n, which torch.export cannot state (a sum of two dims): AUTO, renamed below
    dynamic = ({1: n}, {pos_axis: n}, {2: n, 3: torch.export.Dim.AUTO}, {0: m}, [{2: past}] * (2 * layers))
    inputs = ['embeds', 'positions', 'mask', 'logit_rows'] + past_names(layers)
    return _export(BackboneGraph(policy), args, dynamic, inputs,
                   ['logits', 'new_kv'], Path(folder) / 'backbone.onnx', 'backbone', opset, inline_limit)


def _export(module, args, dynamic, inputs, outputs, path: Path, key: str, opset: int, inline_limit: int) -> GraphSpec:
    import onnx

    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if dynamic is None:  # static: TorchScript, the graph alone (its weights: _write_weights)
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              opset_version=opset, do_constant_folding=False, export_params=False, dynamo=False)
            _write_weights(path, module)
        else:
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, opset_version=opset,
                              dynamo=True, external_data=True, dynamic_shapes=dynamic, verbose=False)
            _release_weights()
    model = onnx.load(str(path), load_external_data=False)  # the graph only; weights stay in the .data file
    if dynamic is not None:
        _name_dynamic_dims(model)
    for node in model.graph.node:  # the exporter's per-node provenance (~1.5 kB a node): not needed to run
        del node.metadata_props[:]
    reciprocal_mul_to_div(model)  # RMSNorms ONNX Runtime can fuse (export.onnx_rewrites)
    onnx.save_model(model, str(path))  # keeps the external-data references as they are
    data = _place_weights(path, inline_limit)
    ins, outs = io_specs(model)
    if [t['name'] for t in ins] != inputs or [t['name'] for t in outs] != outputs:
        raise RuntimeError(f'{path}: exported I/O {[t["name"] for t in ins]} -> {[t["name"] for t in outs]} '
                           f'differ from {inputs} -> {outputs} (an input unused by the graph?)')
    return GraphSpec(key=key, file=path.name, data=data, inputs=[TensorSpec(**t) for t in ins],
                     outputs=[TensorSpec(**t) for t in outs])


def _release_weights() -> None:
    """Drop every exporter IR value's reference to torch memory once the file is written.

    onnxscript's rewrite rules are module-level objects whose pattern matchers keep the last graph they matched
    (`SimplePatternMatcher._graph`), and that graph's input ref-counter keeps values once seen. Two kinds of value
    hold a parameter's memory: the exporter's own, a `TorchTensor` wrapping the parameter, and the optimizer's folded
    `Transpose` of each Linear weight (always folded, whatever its size), an `ir.Tensor` over `np.transpose` of the
    weight's numpy view, whose `.base` chain ends at a detached alias of the parameter: numpy arrays are invisible to
    gc, so the parameter objects die while their storages live on. Without this every parameter (then every 2-D
    Linear weight) outlived the policy (a 0.5B export's RSS did not fall when the exporter dropped the policy before
    reloading it for parity: 2.64 GB held, peak 6.61 GB in the reload; benchmarks/export_memory.py)."""
    import gc

    try:
        from torch.onnx._internal.exporter._core import TorchTensor  # private: absent in another torch, skip then
    except ImportError:
        log.warning('torch %s: the exporter\'s tensor type moved; its IR may keep the parameters alive (more export '
                    'memory, same files)', torch.__version__)
        return

    for obj in gc.get_objects():
        if getattr(type(obj), '__name__', '') in ('SymbolicTensor', 'Value') and \
                _torch_backed(getattr(obj, 'const_value', None), TorchTensor):
            obj.const_value = None


def _torch_backed(tensor, torch_tensor_type) -> bool:
    """Whether an IR tensor's bytes are a torch tensor's: the exporter's wrapper, or an array viewing one."""
    import numpy as np

    if isinstance(tensor, torch_tensor_type):
        return True
    raw = getattr(tensor, 'raw', None)
    while isinstance(raw, np.ndarray):  # a folded transpose: view -> the weight's .numpy() -> its torch tensor
        raw = raw.base
    return isinstance(raw, torch.Tensor)


def _name_dynamic_dims(model) -> None:
    """Name the symbols 'n' (token count), 'past' (cache slots read), 'm' (logit rows) and the mask's last dim
    'n + past' everywhere (torch.export names them e.g. 's18', 's44', 's82')."""
    import re

    dims = {v.name: v.type.tensor_type.shape.dim for v in model.graph.input}
    names = {dims['embeds'][1].dim_param: 'n', dims['past_key_0'][2].dim_param: 'past',
             dims['mask'][3].dim_param: 'n + past', dims['logit_rows'][0].dim_param: 'm'}
    names = {old: new for old, new in names.items() if old and old != new}
    if not names:
        return
    pattern = re.compile(r'\b(' + '|'.join(map(re.escape, names)) + r')\b')
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)


def _write_weights(path: Path, module) -> None:
    """Give a TorchScript graph exported without its weights (export_params=False) those weights, in `<file>.data`.

    That exporter names each weight a graph input after its state_dict key; each becomes an initializer whose bytes
    are written straight from the torch tensor, one at a time. With its weights the exporter held ~3.4x a tower's
    weight bytes at once (its C++ protobuf, the serialized bytes and torch's own onnx parse of them: 1.24 GB for
    SmolVLM2-256M's 0.37 GB SigLIP, the whole export's peak; benchmarks/export_memory.py). Constant folding is left
    to ONNX Runtime and TensorRT at load: it needs the weights inside the exporter (e.g. each transposed matmul
    weight, a second copy)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    weights = dict(module.named_buffers(remove_duplicate=False))  # non-persistent ones too (e.g. position ids)
    weights.update(module.named_parameters(remove_duplicate=False))
    model = onnx.load(str(path))  # the graph alone
    data = path.with_name(path.name + '.data')
    inputs, offset = [], 0
    with open(data, 'wb') as f:
        for value in model.graph.input:
            if value.name not in weights:
                inputs.append(value)
                continue
            tensor = numpy_helper.from_array(weights[value.name].detach().contiguous().numpy(), value.name)
            f.write(tensor.raw_data)
            set_external_data(tensor, data.name, offset, len(tensor.raw_data))
            offset += len(tensor.raw_data)
            tensor.ClearField('raw_data')
            model.graph.initializer.append(tensor)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save_model(model, str(path))


def _place_weights(path: Path, inline_limit: int) -> list:
    """Weights below `inline_limit` bytes go inline (one file); otherwise the one `<file>.data` stays. -> sidecars."""
    import onnx

    data = path.with_name(path.name + '.data')
    if not data.is_file():  # no tensor of 1 kB or more: the graph is one small file already
        return []
    if data.stat().st_size >= inline_limit:
        model = onnx.load(str(path), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == 'location'}
        if locations - {data.name}:
            raise RuntimeError(f'{path}: weights in unexpected files {sorted(locations)}')
        return [data.name]
    write_inline(path)  # small: one file, written one tensor at a time (export.onnx_inline)
    return []
