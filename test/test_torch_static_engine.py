"""The GPU torch engine (runtime.torch_static_engine): static buffers, in-place cache, CUDA graphs, bf16.

On the CPU (capture off: the same code path minus the replay) it must equal the reference TorchEngine and ONNX
Runtime, and the region a CUDA graph records must neither synchronize with the host nor write anything but its
outputs. The `requires_cuda` tests (benchmarks/gpu_check.sh runs them) check replay against eager, bf16 token
agreement and memory across chunks on a GPU.
"""
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blockvla_ros.export.parity import LockStep, compare_engines, random_observations
from blockvla_ros.export.policy_writer import load_checkpoint
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.engine_factory import GPUUnavailableError, create_engine
from blockvla_ros.runtime.ort_engine import OrtEngine
from blockvla_ros.runtime.policy_folder import load_policy_folder
from blockvla_ros.runtime.runner import PolicyRunner, build_preprocessor
from blockvla_ros.runtime.tensorrt_profiles import token_counts
from blockvla_ros.runtime.torch_engine import TorchEngine
from blockvla_ros.runtime.torch_static_engine import StaticTorchEngine, _Pass

from tiny_policy import export_tiny

DECODERS = ('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')
# ops that wait for the device (a value read on the host) or have data-dependent output shapes: a CUDA graph
# capture fails on them
HOST_SYNC_OPS = {'aten._local_scalar_dense', 'aten.item', 'aten.is_nonzero', 'aten.nonzero', 'aten.equal',
                 'aten.masked_select', 'aten._unique2', 'aten.unique_consecutive', 'aten.unique_dim',
                 'aten.lift_fresh', 'aten.lift_fresh_copy'}  # the last two: a tensor made from host data (a copy in)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    torch.set_num_threads(1)
    return export_tiny(tmp_path_factory.mktemp('static'), schedule='fixed', torch_weights=True)


def fresh_policy(folder):
    """A new copy of the weights (engines move / cast the policy they are given)."""
    return load_checkpoint(folder.parent.parent / 'ckpt_tiny')[0]


def observations(folder, n, seed=7):
    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    return spec, pre, random_observations(spec.config, spec.stats, n, seed=seed, tokenizer=pre.text)


def decode_with_carries(config, engine, prefix, engines=None):
    """Every decoder with a one-call and a split prefill (`reuse_instruction` of `engines`, default [engine]), then
    blockdiff and AR continuing 1..4 known timesteps (passes of widths outside the fixed shapes)."""
    for reuse in (False, True):
        for e in engines or [engine]:
            e.reuse_instruction = reuse
        for dec in DECODERS:
            Decoder(config, dec)(engine, prefix)
    for steps in range(1, 5):
        known = np.arange(steps * config.action_dim) % config.n_bins
        Decoder(config, 'blockdiff')(engine, prefix, known=known)
        Decoder(config, 'ar')(engine, prefix, known=known)


@pytest.mark.parametrize('reuse', [True, False], ids=['split-prefill-reused', 'one-call-prefill'])
def test_static_engine_equals_the_torch_engine_and_onnxruntime(folder, reuse):
    spec, pre, obs = observations(folder, 8)
    static = StaticTorchEngine(fresh_policy(folder), reuse_instruction=reuse)
    for name, reference, engine in (('static vs torch', TorchEngine(fresh_policy(folder), reuse_instruction=reuse),
                                     static),
                                    ('onnxruntime vs static', static,
                                     OrtEngine(spec, threads=1, reuse_text_kv=reuse))):
        report = compare_engines(spec.config, reference, engine, obs, pre, name, decoders=DECODERS)
        assert report.tokens_equal, (name, report.mismatches)
        assert report.max_abs_diff <= 1e-4, (name, report.max_abs_diff)
        assert report.graph_calls > 8 * 4 * 4
    # real-time chunking carries (widths outside the fixed pass shapes) through the same buffers
    lock = LockStep(TorchEngine(fresh_policy(folder)), static)
    for image, text, state in obs[:2]:
        decode_with_carries(spec.config, lock, pre(image, text, state), [lock.reference, static])
    assert lock.max_abs_diff <= 1e-4
    assert static.describe()['cuda_graphs'] is False and static.describe()['captured_shapes'] == []


def test_passes_reuse_their_buffers_and_the_cache_is_written_in_place(folder):
    spec, pre, obs = observations(folder, 2)
    engine = StaticTorchEngine(fresh_policy(folder))
    cache = engine.cache.buffer
    pointer = cache.data_ptr()
    decode_with_carries(spec.config, engine, pre(*obs[0]))
    regular = set(token_counts(spec.config))
    assert regular <= set(engine._passes)  # every fixed pass shape was used, each with its own buffers
    buffers = {n: (p.embeds.data_ptr(), p.mask.data_ptr(), p.logits.data_ptr(), p.new_kv.data_ptr())
               for n, p in engine._passes.items()}
    decode_with_carries(spec.config, engine, pre(*obs[1]))
    assert {n: (p.embeds.data_ptr(), p.mask.data_ptr(), p.logits.data_ptr(), p.new_kv.data_ptr())
            for n, p in engine._passes.items()} == buffers
    assert engine.cache.buffer is cache and cache.data_ptr() == pointer
    # a commit writes exactly its slots, in place
    engine.prefill(pre(*obs[0]))
    B, P = spec.config.block_size, engine.layout.length
    before = cache.clone()
    engine.step(np.zeros(2 * B, np.int64), commit=B, block_size=B)
    changed = (cache != before).flatten(0, 2).any(0).any(-1)  # [T_max]: slots that changed
    assert changed.nonzero().flatten().tolist() == list(range(P, P + B))


class _Ops(TorchDispatchMode):
    """Records the name of every aten op run inside it, and the dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.names, self.dtypes = set(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.names.add(name)
        self.dtypes.setdefault(name, set()).update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def test_the_captured_region_never_syncs_and_writes_only_its_outputs(folder):
    """What a CUDA graph records (`_forward`) on every pass shape: no op reads a value back to the host or has a
    data-dependent shape (either makes a capture fail), and the cache is only read (commits happen outside). The
    same passes in bf16 on the 'meta' device (no data, not the CPU): a value read on the host (.item(), .tolist(),
    .numpy(), a Python branch on a tensor), a tensor made without the device (on the CPU beside a GPU engine's) or
    sent to the CPU fails there as it would on cuda, and the softmax must run in float32."""
    spec, pre, obs = observations(folder, 1)
    engine = StaticTorchEngine(fresh_policy(folder))
    meta = StaticTorchEngine(fresh_policy(folder), device='meta', dtype='bfloat16')
    ops, meta_ops, widths, forward = _Ops(), _Ops(), set(), engine._forward

    def recorded(p):
        before = engine.cache.buffer.clone()
        with ops:
            forward(p)
        widths.add(p.embeds.shape[1])
        assert torch.equal(before, engine.cache.buffer), 'the pass wrote into the cache'
        twin = meta._passes.setdefault(p.embeds.shape[1], _Pass(meta, p.embeds, p.positions, p.mask, capture=False))
        with torch.inference_mode(), meta_ops:
            meta._forward(twin)

    engine._forward = recorded
    decode_with_carries(spec.config, engine, pre(*obs[0]))
    assert set(token_counts(spec.config)) <= widths and set(meta._passes) == widths
    assert 'aten.matmul' in ops.names or 'aten.mm' in ops.names or 'aten.bmm' in ops.names  # it saw the graph
    assert not ops.names & HOST_SYNC_OPS, sorted(ops.names & HOST_SYNC_OPS)
    dtypes = lambda *names: set().union(*(meta_ops.dtypes.get(n, set()) for n in names))  # noqa: E731
    assert dtypes('aten.softmax', 'aten._softmax') == {torch.float32}, meta_ops.dtypes
    # every projection in bf16, the attention matmuls too (transformers 5.17, the GPU machine's, also makes the rotary
    # angles by a float32 matmul of the frequencies and positions)
    assert dtypes('aten.linear', 'aten.addmm') == {torch.bfloat16}, meta_ops.dtypes
    assert torch.bfloat16 in dtypes('aten.matmul', 'aten.mm', 'aten.bmm'), meta_ops.dtypes


class _Queued(StaticTorchEngine):
    """The GPU engine, marking where a GPU would still hold queued work: a call returns its logits (read back) but
    its cache write may still be running, until `synchronize`."""

    queued = False

    def _backbone(self, *args):
        out = super()._backbone(*args)
        self.queued = True  # the commit's index_copy_ comes after the logits were read
        return out

    def synchronize(self) -> None:
        super().synchronize()
        self.queued = False


def test_benchmark_timers_are_read_after_the_engine_synchronizes(folder, monkeypatch):
    """decode_latency's timers (bench_all, per_pass, the prefill share; gpu_latency uses them) read the clock only
    once the engine's device work is done."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import decode_latency as dl

    spec, pre, obs = observations(folder, 1)
    engine, reads, clock = _Queued(fresh_policy(folder)), [], time.perf_counter
    monkeypatch.setattr(time, 'perf_counter', lambda: reads.append(engine.queued) or clock())
    dl.bench_all({'torch': engine}, spec.config, [pre(*obs[0])], 1, 0, ('blockdiff', 'ar', 'blockdiff_unfolded'))
    dl.per_pass(engine, spec.config, pre(*obs[0]), 1)
    assert len(reads) > 10 and not any(reads), reads


def bf16_agreement(folder, device, request) -> float:
    spec, pre, obs = observations(folder, 8, seed=11)
    engine = StaticTorchEngine(fresh_policy(folder), device=device, dtype='bfloat16')
    report = compare_engines(spec.config, TorchEngine(fresh_policy(folder)), engine, obs, pre, f'bf16 {device}',
                             decoders=DECODERS)
    request.node.user_properties.append(('bf16_token_agreement', report.token_agreement))
    request.node.user_properties.append(('bf16_max_abs_logit_diff', report.max_abs_diff))
    print(f'bf16 on {device} vs fp32 torch (cpu): token agreement {report.token_agreement:.3f} over {report.tokens} '
          f'tokens, lock-step max |logit diff| {report.max_abs_diff:.4f}')
    assert engine.cache.buffer.dtype == torch.bfloat16 and engine.describe()['dtype'] == 'bfloat16'
    # the text table lives on the host (runtime.tables), full precision; no device or cast copy is kept
    assert engine.policy.llm.get_input_embeddings().weight.numel() == 0
    assert engine.tables.text_embed.dtype == np.float32 and engine.tables.text_embed.shape[0] > 0
    rotary = [b.dtype for name, b in engine.policy.named_buffers() if name.endswith('inv_freq')]
    assert rotary and set(rotary) == {torch.float32}  # positions ~300 need float32 frequencies
    # bf16 keeps ~3 significant digits: the lock-step logits stay close (an fp16 overflow or a wrong cast would
    # not); free-run agreement is reported (near-tied random logits flip), and far above chance
    assert report.max_abs_diff <= 2e-2
    assert report.token_agreement >= 4.0 / spec.config.n_bins
    return report.token_agreement


def test_bf16_weights_token_agreement_on_the_cpu(folder, request):
    bf16_agreement(folder, 'cpu', request)


def test_factory_options_and_errors(folder):
    spec = load_policy_folder(folder)
    with pytest.raises(ValueError, match='dtype'):
        create_engine(spec, 'torch', options={'dtype': 'int3'})
    with pytest.raises(ValueError, match='unknown engine options'):
        create_engine(spec, 'torch', options={'fp16': True})
    if not torch.cuda.is_available():
        with pytest.raises(GPUUnavailableError, match="'onnxruntime'"):
            create_engine(spec, 'torch', options={'device': 'cuda'})
    runner = PolicyRunner.load(folder, engine='torch', threads=1, engine_options={'dtype': 'bf16'})
    d = runner.describe()
    assert d['engine'] == 'torch' and d['dtype'] == 'bfloat16' and d['device'] == 'cpu' and not d['cuda_graphs']
    assert runner.predict(np.zeros((20, 30, 3), np.uint8), 'push the block').actions.shape == (4, 3)


# --- on a GPU (benchmarks/gpu_check.sh; its --dry-run-cpu runs these bodies on the CPU: `gpu_device` is 'cpu') -------
def device_memory(device) -> tuple:
    """(allocated, reserved) bytes of the torch allocator on cuda, after the queued work; () on the CPU."""
    if device == 'cpu':
        return ()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


@pytest.mark.requires_cuda
def test_cuda_graph_replay_equals_eager(folder, gpu_device):
    spec, pre, obs = observations(folder, 8)
    eager = StaticTorchEngine(fresh_policy(folder), device=gpu_device, cuda_graphs=False)
    graphs = StaticTorchEngine(fresh_policy(folder), device=gpu_device, cuda_graphs=True)
    report = compare_engines(spec.config, eager, graphs, obs, pre, 'cuda graphs vs eager', decoders=DECODERS)
    assert report.tokens_equal, report.mismatches
    assert report.max_abs_diff <= 1e-4
    lock = LockStep(eager, graphs)
    decode_with_carries(spec.config, lock, pre(*obs[0]), [eager, graphs])
    assert lock.max_abs_diff <= 1e-4
    # every fixed shape captured and replayed (none on the CPU: capture is CUDA only)
    fixed = set(token_counts(spec.config)) if graphs.cuda_graphs else set()
    assert set(graphs.describe()['captured_shapes']) == fixed
    cpu = compare_engines(spec.config, TorchEngine(fresh_policy(folder)), graphs, obs, pre, 'cuda vs cpu',
                          decoders=DECODERS)
    assert cpu.max_abs_diff <= 1e-3, cpu.max_abs_diff


@pytest.mark.requires_cuda
def test_bf16_weights_token_agreement_on_cuda(folder, request, gpu_device):
    bf16_agreement(folder, gpu_device, request)


@pytest.mark.requires_cuda
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_no_cuda_allocation_growth_across_chunks(folder, dtype, gpu_device):
    spec, pre, obs = observations(folder, 6)
    engine = StaticTorchEngine(fresh_policy(folder), device=gpu_device, dtype=dtype, cuda_graphs=True)
    for prefix in obs[:2]:  # the first chunk captures every fixed shape (or makes its eager buffers); each capture
        decode_with_carries(spec.config, engine, pre(*prefix))  # empties the allocator's cache (torch.cuda.graph)
    memory = device_memory(gpu_device)  # so the reserved figure counts from the second, capture-free chunk
    captured, shapes = engine.describe()['captured_shapes'], set(engine._passes)
    for i in range(20 if gpu_device != 'cpu' else 2):
        decode_with_carries(spec.config, engine, pre(*obs[i % len(obs)]))
    assert device_memory(gpu_device) == memory
    assert engine.describe()['captured_shapes'] == captured and set(engine._passes) == shapes
