"""The ONNX Runtime engine's fused attention (runtime.ort_attention): every layer's attention core but the last
becomes one GroupQueryAttention on exported backbones, the engine decodes the same tokens with logits within 1e-4 of
the graph as exported (lock-step, every decoder) and leaves the same cache (the last layer, scoring the logit rows
only, stays as exported, reading a copy of its K/V); graphs outside the pattern (softcaps, sliding windows) and ONNX
Runtimes without a bidirectional kernel run without it."""
import logging

import numpy as np
import onnx
import pytest

from blockvla_ros.export.parity import compare_engines, random_observations
from blockvla_ros.runtime import ort_engine
from blockvla_ros.runtime.ort_attention import PRESENT, fuse_attention, fused_layers
from blockvla_ros.runtime.ort_engine import OrtEngine
from blockvla_ros.runtime.ort_rotary import fuse_rotary
from blockvla_ros.runtime.policy_folder import load_policy_folder
from blockvla_ros.runtime.runner import build_preprocessor

from tiny import GEMMA2, GEMMA3_WINDOW, LLAMA, QWEN2
from tiny_policy import export_tiny

DECODERS = ('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')
FUSED = {'qwen2': dict(backbone=dict(QWEN2, num_hidden_layers=3), schedule='fixed'),  # 4 query heads on 2 K/V heads
         'llama': dict(backbone=LLAMA, schedule='fixed', block_size=4)}  # one K/V head; a fused commit of 8
NOT_FUSED = {'gemma2-softcap': dict(backbone=GEMMA2, attn_implementation='eager'),  # tanh on the scores
             'gemma3-window': dict(backbone=GEMMA3_WINDOW, attn_implementation='eager')}  # a mask per window


@pytest.fixture(scope='module', params=sorted(FUSED))
def folder(request, tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp(f'gqa_{request.param}'), **FUSED[request.param])


def _past_names(model):
    return [i.name for i in model.graph.input if i.name.startswith('past_')]


def test_the_rewrite_replaces_every_layers_attention_by_one_node(folder):
    model = onnx.load(str(folder / 'backbone.onnx'))
    layers = load_policy_folder(folder).kv_shape[0]
    before = [n.op_type for n in model.graph.node]
    assert fuse_attention(model, _past_names(model)) == layers - 1
    after = [n.op_type for n in model.graph.node]
    assert after.count('GroupQueryAttention') == layers - 1
    assert before.count('Softmax') == layers and after.count('Softmax') == 1  # the split attention's only softmaxes
    presents = [f'{PRESENT}{k}_{i}' for i in range(layers - 1) for k in ('key', 'value')]
    assert [o.name for o in model.graph.output][2:] == presents
    assert fused_layers(o.name for o in model.graph.output) == list(range(layers - 1))
    assert all(a.i == 0 for n in model.graph.node if n.op_type == 'GroupQueryAttention' for a in n.attribute
               if a.name == 'causal')
    onnx.checker.check_model(model)
    assert fuse_rotary(model) == 2 * layers  # independent of the rotary rewrite


def test_after_the_rotary_rewrite_q_is_rotated_in_the_layout_the_attention_reads(folder):
    model = onnx.load(str(folder / 'backbone.onnx'))
    layers = load_policy_folder(folder).kv_shape[0]
    assert fuse_rotary(model) == 2 * layers  # what the engine does first
    transposes = [n.op_type for n in model.graph.node].count('Transpose')
    assert fuse_attention(model, _past_names(model)) == layers - 1
    rotary = [n for n in model.graph.node if n.op_type == 'RotaryEmbedding']
    heads = [a.i for n in rotary for a in n.attribute if a.name == 'num_heads']
    assert len(rotary) == 2 * layers and len(heads) == layers - 1  # the fused layers' q: 3-D, [1, n, heads * d]
    # per fused layer: q's Transpose before its rotary goes; k gets one (to [1, n, kv_heads * d]), which cancels
    # the one of its past-score MatMul that went with the old core
    assert [n.op_type for n in model.graph.node].count('Transpose') <= transposes - (layers - 1)
    onnx.checker.check_model(model)


def _engines(folder, **kw):
    spec = load_policy_folder(folder)
    return spec, OrtEngine(spec, threads=1, fuse_attention=False, **kw), OrtEngine(spec, threads=1, **kw)


def test_fused_engine_decodes_as_the_graph_as_exported(folder):
    spec, plain, fused = _engines(folder)
    assert plain.attention_fused == 0 and fused.attention_fused == spec.kv_shape[0] - 1
    assert fused.describe()['attention_fused'] == fused.attention_fused and fused.rotary_fused > 0
    pre = build_preprocessor(spec.config, spec.stats, folder)
    obs = random_observations(spec.config, spec.stats, 6, seed=11, tokenizer=pre.text)
    report = compare_engines(spec.config, plain, fused, obs, pre, 'onnxruntime-gqa', decoders=DECODERS)
    assert report.graph_calls > 6 * 4 * 3
    assert report.tokens_equal, report.mismatches
    assert report.max_abs_diff <= 1e-4


def _chunk(engine, spec, folder, seed: int):
    """A prefill and three steps (one committing a block) -> the logits of each."""
    pre = build_preprocessor(spec.config, spec.stats, folder)
    (image, text, state), = random_observations(spec.config, spec.stats, 1, seed=seed, tokenizer=pre.text)
    prefix, B = pre(image, text, state), spec.config.block_size
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, spec.config.n_bins, n) for n in (B, 2 * B, B)]
    out = [engine.prefill(prefix)]
    out.append(engine.step(tokens[0]))
    out.append(engine.step(tokens[1], commit=B, block_size=B))
    out.append(engine.step(tokens[2]))
    return out


@pytest.mark.parametrize('folder', ['qwen2'], indirect=True)
def test_the_cache_holds_the_same_slots_and_passes_wider_than_the_spare_slots_run_on_a_copy(folder):
    spec, plain, fused = _engines(folder)
    T = spec.config.max_seq_len
    assert fused.cache.buffer.shape[3] == T + fused.spare_slots and plain.cache.buffer.shape[3] == T
    for seed in (1, 2):  # the second chunk keeps the instruction's K/V
        for a, b in zip(_chunk(plain, spec, folder, seed), _chunk(fused, spec, folder, seed)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        last = spec.kv_shape[0] - 1
        assert fused.cache.plain_layers == [last]
        np.testing.assert_allclose(fused.cache.buffer[:last, :, :, :T], plain.cache.buffer[:last], atol=1e-5, rtol=0)
        np.testing.assert_allclose(fused.cache.plain[0], plain.cache.buffer[last], atol=1e-5, rtol=0)
        assert np.array_equal(fused.cache.valid, plain.cache.valid)
    narrow = OrtEngine(spec, threads=1)
    narrow.spare_slots = 0  # no pass fits after T_max: each reads a copy of the cache with room for its K/V
    for a, b in zip(_chunk(plain, spec, folder, 3), _chunk(narrow, spec, folder, 3)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert not narrow.cache.buffer[:, :, :, T:].any()  # nothing was written after T_max


@pytest.mark.parametrize('name', sorted(NOT_FUSED))
def test_graphs_outside_the_pattern_run_as_exported(name, tmp_path, caplog):
    folder = export_tiny(tmp_path, **NOT_FUSED[name])
    model = onnx.load(str(folder / 'backbone.onnx'))
    assert fuse_attention(model, _past_names(model)) == 0
    with caplog.at_level(logging.INFO):
        spec, plain, fused = _engines(folder)
    assert fused.attention_fused == 0 and fused.spare_slots == 0
    assert fused.cache.buffer.shape == plain.cache.buffer.shape
    for a, b in zip(_chunk(plain, spec, folder, 4), _chunk(fused, spec, folder, 4)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize('folder', ['qwen2'], indirect=True)
def test_without_a_bidirectional_kernel_or_if_onnxruntime_refuses_it_attention_runs_as_exported(folder, monkeypatch,
                                                                                                caplog):
    spec, plain, _ = _engines(folder)
    with monkeypatch.context() as m, caplog.at_level(logging.INFO):
        m.setattr(ort_engine, 'gqa_supported', lambda ort: False)  # an ONNX Runtime whose kernel is causal only
        engine = OrtEngine(spec, threads=1)
    assert engine.attention_fused == 0 and engine.rotary_fused > 0 and 'no GroupQueryAttention' in caplog.text
    for a, b in zip(_chunk(plain, spec, folder, 5), _chunk(engine, spec, folder, 5)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    real = ort_engine.fused_backbone
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(ort_engine, 'fused_backbone', lambda path, rotary, attention_past: (
            (b'not a model', 2, 2) if attention_past else real(path, rotary, attention_past)))
        engine = OrtEngine(spec, threads=1)
    assert engine.attention_fused == 0 and engine.rotary_fused > 0
    assert 'cannot load the graph with fused attention' in caplog.text
    for a, b in zip(_chunk(plain, spec, folder, 5), _chunk(engine, spec, folder, 5)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
