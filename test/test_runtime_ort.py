"""ONNX Runtime engine vs torch on the same weights; IO binding; instruction K/V reuse; no torch import; GPU paths."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from blockvla_ros.export.parity import compare_engines, random_observations
from blockvla_ros.export.policy_writer import load_checkpoint
from blockvla_ros.model.graphs import past_names
from blockvla_ros.runtime.cuda_memory import cuda_device_count
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.engine_factory import GPUUnavailableError, create_engine
from blockvla_ros.runtime.ort_engine import OrtEngine
from blockvla_ros.runtime.policy_folder import load_policy_folder
from blockvla_ros.runtime.runner import PolicyRunner, build_preprocessor
from blockvla_ros.runtime.torch_engine import TorchEngine

from tiny_policy import export_tiny

DECODERS = ('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp('ort'), schedule='fixed')


@pytest.fixture(scope='module')
def reference(folder):
    import torch

    torch.set_num_threads(1)
    policy, _ = load_checkpoint(folder.parent.parent / 'ckpt_tiny')
    return TorchEngine(policy)


@pytest.mark.parametrize('reuse', [True, False], ids=['split-prefill-reused', 'one-call-prefill'])
def test_ort_matches_torch_on_20_observations(folder, reference, reuse):
    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    obs = random_observations(spec.config, spec.stats, 20, seed=7, tokenizer=pre.text)
    engine = OrtEngine(spec, threads=1, reuse_text_kv=reuse)
    report = compare_engines(spec.config, reference, engine, obs, pre, 'onnxruntime', decoders=DECODERS)
    assert report.graph_calls > 20 * 4 * 5
    assert report.tokens_equal, report.mismatches
    assert report.max_abs_diff <= 1e-3
    assert engine.reuse_instruction == reuse


@pytest.mark.parametrize('reuse', [True, False], ids=['split-prefill', 'one-call-prefill'])
def test_reading_only_the_filled_cache_slots_equals_reading_them_all(folder, reuse):
    """The dynamic past length changes only the cost: a prefix pass bound to the first max(lo, 1) cache slots gives
    the logits of the same pass over all T_max slots (the empty ones masked)."""
    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    short, whole = OrtEngine(spec, threads=1, reuse_text_kv=reuse), OrtEngine(spec, threads=1, reuse_text_kv=reuse)
    whole.dynamic_past = False  # what a folder with a static cache input does
    for image, text, state in random_observations(spec.config, spec.stats, 3, seed=5, tokenizer=pre.text):
        prefix = pre(image, text, state)
        a, b = (Decoder(spec.config, 'blockdiff')(e, prefix, trace=True) for e in (short, whole))
        assert np.array_equal(a.tokens, b.tokens) and a.nfe == b.nfe
        assert max(float(np.abs(x[2] - y[2]).max(initial=0.0)) for x, y in zip(a.trace, b.trace)) <= 1e-5
    t_max = spec.config.max_seq_len
    assert {key[1] for key in whole._passes} == {t_max}  # (n, past, logit rows)
    assert min(key[1] for key in short._passes) < t_max and short.dynamic_past


def test_logits_of_scattered_rows_equal_those_rows_of_every_row(folder):
    """A refine pass asks for the rows of the tokens still masked (any subset): their logits are those rows of the
    same pass returning every row, and the K/V it commits are the same."""
    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    image, text, state = random_observations(spec.config, spec.stats, 1, seed=2, tokenizer=pre.text)[0]
    B, engine = spec.config.block_size, OrtEngine(spec, threads=1, reuse_text_kv=False)
    tokens = np.array([3, spec.config.mask_token_id, 7] * B)[:2 * B]
    asked = [[1, B + 1], [B - 1], [], slice(1, 2 * B - 1)]
    logits, caches = [], []
    for rows in [None] + asked:
        engine.prefill(pre(image, text, state))
        logits.append(engine.step(tokens, commit=B, block_size=B, rows=rows))
        caches.append(engine.cache.buffer.copy())
    full = logits[0]
    assert full.shape[0] == 2 * B and logits[3].shape[0] == 0
    for rows, got, cache in zip(asked, logits[1:], caches[1:]):
        assert got.shape[0] == len(full[rows]) and np.abs(got - full[rows]).max(initial=0.0) <= 1e-5
        assert np.array_equal(cache, caches[0])
    with pytest.raises(ValueError, match='rows must index'):
        engine.step(tokens, rows=[2 * B])


def test_threshold_schedule_and_overrides_match_torch(folder, reference):
    spec = load_policy_folder(folder)
    config = spec.config.replace(schedule='threshold', threshold=0.005, steps_per_block=2)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    engine = OrtEngine(spec, threads=1)
    for image, text, state in random_observations(spec.config, spec.stats, 4, seed=3, tokenizer=pre.text):
        prefix = pre(image, text, state)
        a, b = Decoder(config, 'blockdiff')(reference, prefix), Decoder(config, 'blockdiff')(engine, prefix)
        assert np.array_equal(a.tokens, b.tokens) and a.nfe == b.nfe and a.steps == b.steps


def test_instruction_kv_is_reused_while_the_instruction_is_unchanged(folder):
    runner = PolicyRunner.load(folder, threads=1)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    first = runner.predict(images[0], 'stack the cups')
    second = runner.predict(images[1], 'stack the cups')
    third = runner.predict(images[2], 'open the drawer')
    assert not first.instruction_kv_reused and second.instruction_kv_reused and not third.instruction_kv_reused
    fresh = PolicyRunner.load(folder, threads=1, engine_options={'reuse_text_kv': False})
    assert np.array_equal(fresh.predict(images[1], 'stack the cups').tokens, second.tokens)
    assert fresh.describe()['reuse_text_kv'] is False


def test_io_binding_shares_preallocated_buffers(folder):
    spec = load_policy_folder(folder)
    engine = OrtEngine(spec, threads=1)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    image, text, state = random_observations(spec.config, spec.stats, 1, seed=1, tokenizer=pre.text)[0]
    cache_buffer = engine.cache.buffer
    Decoder(spec.config, 'blockdiff')(engine, pre(image, text, state))
    B, t_max, lt = spec.config.block_size, spec.config.max_seq_len, engine.split
    assert engine.dynamic_past and lt > 0
    shapes = set(engine._passes)  # (n tokens, cache slots read, logit rows)
    assert {(B, t_max), (2 * B, t_max)} <= {s[:2] for s in shapes}  # refine, fused commit + refine: the whole cache
    # the prefix passes read only the slots before them: the instruction pass one (masked), the observation pass the
    # instruction's (a copy of them: the `head` buffer); the instruction pass returns its last row's logits, the
    # observation pass (block 0's masks folded in) its last row's and B - 1 of the block's
    assert {(lt, 1, 1), (spec.config.prefix_len - lt + B, lt, B)} <= shapes
    assert (2 * B, t_max, B) in shapes  # the fused pass: the last committed token's row and B - 1 of the block's
    passes = {n: (p.binding, p.new_kv, p.logits) for n, p in engine._passes.items()}
    Decoder(spec.config, 'blockdiff')(engine, pre(image, text, state))
    assert engine.cache.buffer is cache_buffer
    assert all(engine._passes[n].binding is b and engine._passes[n].new_kv is kv and engine._passes[n].logits is lg
               for n, (b, kv, lg) in passes.items())
    # the OrtValues bound as past_* read the numpy cache in place: zeroing the cache changes the step's output
    engine.prefill(pre(image, text, state))
    before = engine.step(np.zeros(B, np.int64))
    cache_buffer[:] = 0.0
    after = engine.step(np.zeros(B, np.int64))
    assert not np.allclose(before, after)


def test_runtime_and_ort_engine_never_import_torch(folder):
    code = ('import sys, numpy as np\n'
            'import blockvla_ros.runtime\n'
            'from blockvla_ros.runtime.runner import PolicyRunner\n'
            f'r = PolicyRunner.load({str(folder)!r}, threads=1)\n'
            'r.warmup(1)\n'
            'p = r.predict(np.zeros((20, 30, 3), np.uint8), "push the block", known_actions=np.zeros((1, 3)))\n'
            'assert p.actions.shape == (4, 3)\n'
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '[]', out.stdout


def test_onnxruntime_cuda_falls_back_or_fails_with_require_gpu(folder, caplog):
    import onnxruntime

    if 'CUDAExecutionProvider' in onnxruntime.get_available_providers() and cuda_device_count()[0]:
        pytest.skip('this machine has a usable CUDA provider')
    spec = load_policy_folder(folder)
    with pytest.raises(GPUUnavailableError, match="'onnxruntime'"):
        create_engine(spec, 'onnxruntime-cuda', require_gpu=True)
    engine = create_engine(spec, 'onnxruntime-cuda', threads=1)
    assert engine.describe()['provider'] == 'CPUExecutionProvider'
    assert any('CPU' in r.getMessage() or 'CUDA' in r.getMessage() for r in caplog.records)


class _Widths:
    """Records the token count of every backbone pass an engine makes."""

    def __init__(self, engine):
        self.engine, self.widths = engine, set()
        original = engine._backbone

        def backbone(embeds, positions, mask, rows):
            self.widths.add(embeds.shape[1])
            return original(embeds, positions, mask, rows)

        engine._backbone = backbone


def test_tensorrt_profiles_cover_every_pass_the_decoders_make(folder):
    """The static side of the TensorRT path, on the CPU: the profiles built into the engine cover every token count
    the decoders use (exactly for the regular ones), and their input shapes are consistent."""
    from blockvla_ros.runtime.tensorrt_profiles import check_profiles, pick_profile, profile_shapes, token_counts

    spec = load_policy_folder(folder)
    cfg = spec.config
    profiles = check_profiles(spec)
    regular = set(token_counts(cfg))
    P, Lt, B, L = cfg.prefix_len, cfg.max_text_tokens, cfg.block_size, cfg.n_action_tokens
    assert regular == {1, B, 2 * B, L, P, Lt, P - Lt,
                       P + B, P - Lt + B, P + L, P - Lt + L}  # prefill (or its observation part) + first pass
    pre = build_preprocessor(cfg, spec.stats, folder)
    seen = set()
    for reuse in (True, False):
        rec = _Widths(OrtEngine(spec, threads=1, reuse_text_kv=reuse))
        for image, text, state in random_observations(cfg, spec.stats, 2, seed=4, tokenizer=pre.text):
            for dec in DECODERS:
                Decoder(cfg, dec)(rec.engine, pre(image, text, state))
            Decoder(cfg, 'blockdiff')(rec.engine, pre(image, text, state), known=np.arange(7))  # RTC carries
        seen |= rec.widths
    assert seen - regular  # the known-action carries make other widths...
    for n in seen:  # ...and every width has a profile (an exact one for the regular passes)
        assert profiles[pick_profile(profiles, n)].covers(n)
        assert profiles[pick_profile(profiles, n)].exact == (n in regular)
    t_max = cfg.max_seq_len
    shapes = profile_shapes(spec.graphs['backbone'], profiles[-1], t_max)
    assert shapes['mask'] == ((1, 1, 1, t_max + 1), (1, 1, 2 * cfg.block_size, t_max + 2 * cfg.block_size),
                              (1, 1, t_max, 2 * t_max))
    layers, kv_heads, head_dim = spec.kv_shape
    assert set(shapes) == {'embeds', 'positions', 'mask', 'logit_rows'} | set(past_names(layers))
    assert shapes['logit_rows'] == ((1,), (2 * cfg.block_size,), (t_max,))  # TensorRT computes every row's logits
    assert shapes['past_key_0'] == ((1, kv_heads, t_max, head_dim),) * 3  # TensorRT reads the whole cache


@pytest.mark.skipif(cuda_device_count()[0] > 0, reason='this machine has a GPU')
def test_tensorrt_without_gpu_fails_at_once(folder):
    with pytest.raises(GPUUnavailableError) as e:
        PolicyRunner.load(folder, engine='tensorrt')
    assert 'GPU' in str(e.value) and "'onnxruntime'" in str(e.value)


TRT_MISSING = [name for module, name in (('tensorrt', 'TensorRT'), ('cuda', 'cuda-python'))
               if importlib.util.find_spec(module) is None]


def _ort_cuda_missing() -> bool:
    import onnxruntime

    return 'CUDAExecutionProvider' not in onnxruntime.get_available_providers()


# these skip at collection, before their fixtures export and load a policy (gpu_check.sh's time budget)
@pytest.mark.requires_cuda
@pytest.mark.skipif(bool(TRT_MISSING), reason=f'{" and ".join(TRT_MISSING)} not installed (the TensorRT engine '
                    'needs both)')
@pytest.mark.parametrize('cuda_graphs', [False, True])
def test_tensorrt_matches_torch_on_20_observations(folder, reference, tmp_path, cuda_graphs):
    from blockvla_ros.runtime.trt_engine import TrtEngine

    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    obs = random_observations(spec.config, spec.stats, 20, seed=7, tokenizer=pre.text)
    engine = TrtEngine(spec, fp16=False, cache_dir=str(tmp_path / 'trt'), cuda_graphs=cuda_graphs)
    report = compare_engines(spec.config, reference, engine, obs, pre, 'tensorrt', decoders=DECODERS)
    assert report.tokens_equal, report.mismatches
    assert report.max_abs_diff <= 1e-3
    assert list((tmp_path / 'trt').glob('*.engine'))  # cached for the next load


@pytest.mark.requires_cuda
@pytest.mark.skipif(_ort_cuda_missing(), reason='this onnxruntime has no CUDA provider (onnxruntime-gpu is not '
                    'installed)')
def test_onnxruntime_cuda_matches_torch(folder, reference):
    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    obs = random_observations(spec.config, spec.stats, 20, seed=7, tokenizer=pre.text)
    engine = create_engine(spec, 'onnxruntime-cuda', require_gpu=True)
    report = compare_engines(spec.config, reference, engine, obs, pre, 'onnxruntime-cuda', decoders=DECODERS)
    assert report.tokens_equal and report.max_abs_diff <= 1e-3
