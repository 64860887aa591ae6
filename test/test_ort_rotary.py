"""The ONNX Runtime engine's fused rotary embeddings (runtime.ort_rotary): the rewrite fires on exported backbones
(fewer nodes, one RotaryEmbedding per q and k of every layer), decodes the same tokens with logits within 1e-4 of the
graph as exported (lock-step, every decoder), and falls back to the graph as exported when it cannot apply."""
import logging
import shutil
import sys

import numpy as np
import onnx
import pytest

from blockvla_ros.export.parity import compare_engines, random_observations
from blockvla_ros.runtime import ort_engine
from blockvla_ros.runtime.ort_engine import OrtEngine
from blockvla_ros.runtime.ort_rotary import fuse_rotary
from blockvla_ros.runtime.policy_folder import load_policy_folder, write_manifest
from blockvla_ros.runtime.runner import build_preprocessor

from tiny import GEMMA3_WINDOW, LLAMA, QWEN2
from tiny_policy import export_tiny

DECODERS = ('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')
FAMILIES = {'qwen2': dict(backbone=QWEN2, schedule='fixed'), 'llama': dict(backbone=LLAMA, schedule='fixed'),
            # two rotary bases (sliding and full layers): two cos / sin sources in one graph
            'gemma3-window': dict(backbone=GEMMA3_WINDOW, attn_implementation='eager', schedule='fixed')}


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def folder(request, tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp(f'rotary_{request.param}'), **FAMILIES[request.param])


def test_the_rewrite_replaces_every_rotate_half_by_one_node(folder):
    model = onnx.load(str(folder / 'backbone.onnx'))
    layers = load_policy_folder(folder).kv_shape[0]
    ops = [n.op_type for n in model.graph.node]
    assert fuse_rotary(model) == 2 * layers
    fused = [n.op_type for n in model.graph.node]
    assert fused.count('RotaryEmbedding') == 2 * layers
    assert ops.count('Neg') == 2 * layers and 'Neg' not in fused  # rotate_half's Neg was the rotary's only one
    assert len(fused) <= len(ops) - 5 * 2 * layers
    onnx.checker.check_model(model)


def test_fused_engine_decodes_as_the_graph_as_exported(folder):
    spec = load_policy_folder(folder)
    pre = build_preprocessor(spec.config, spec.stats, folder)
    obs = random_observations(spec.config, spec.stats, 6, seed=11, tokenizer=pre.text)
    plain, fused = OrtEngine(spec, threads=1, fuse_rotary=False), OrtEngine(spec, threads=1)
    assert plain.rotary_fused == 0 and fused.rotary_fused == 2 * spec.kv_shape[0]
    assert fused.describe()['rotary_fused'] == fused.rotary_fused
    report = compare_engines(spec.config, plain, fused, obs, pre, 'onnxruntime-rotary', decoders=DECODERS)
    assert report.graph_calls > 6 * 4 * 3
    assert report.tokens_equal, report.mismatches
    assert report.max_abs_diff <= 1e-4


def _without_pattern(folder, tmp_path):
    """A copy of the folder whose backbone computes the same function with an Identity between each rotate_half's
    Neg and Concat (what the matcher does not know)."""
    copy = tmp_path / 'copy'
    shutil.copytree(folder, copy)
    model = onnx.load(str(copy / 'backbone.onnx'))
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type == 'Neg':
            out = node.output[0]
            node.output[0] = out + '_pre_identity'
            nodes.append(onnx.helper.make_node('Identity', [node.output[0]], [out]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(copy / 'backbone.onnx'))
    write_manifest(copy)
    return copy


def _same_passes(a: OrtEngine, b: OrtEngine, spec, folder):
    pre = build_preprocessor(spec.config, spec.stats, folder)
    for image, text, state in random_observations(spec.config, spec.stats, 2, seed=3, tokenizer=pre.text):
        prefix = pre(image, text, state)
        np.testing.assert_allclose(a.prefill(prefix), b.prefill(prefix), atol=1e-4, rtol=0)
        tokens = np.full(spec.config.block_size, spec.config.mask_token_id)
        np.testing.assert_allclose(a.step(tokens), b.step(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize('folder', ['qwen2'], indirect=True)
def test_a_graph_without_the_pattern_runs_as_exported(folder, tmp_path, caplog):
    copy = _without_pattern(folder, tmp_path)
    spec = load_policy_folder(copy)
    with caplog.at_level(logging.INFO, logger='blockvla_ros.runtime.ort_rotary'):
        engine = OrtEngine(spec, threads=1)
    assert engine.rotary_fused == 0
    assert 'no rotary embedding in the pattern' in caplog.text
    _same_passes(engine, OrtEngine(load_policy_folder(folder), threads=1), spec, copy)


@pytest.mark.parametrize('folder', ['qwen2'], indirect=True)
def test_without_onnx_or_if_onnxruntime_refuses_the_rewrite_the_graph_runs_as_exported(folder, monkeypatch, caplog):
    spec = load_policy_folder(folder)
    reference = OrtEngine(spec, threads=1, fuse_rotary=False)
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setitem(sys.modules, 'onnx', None)  # `import onnx` raises ImportError
        engine = OrtEngine(spec, threads=1)
    assert engine.rotary_fused == 0 and 'the onnx package is not installed' in caplog.text
    _same_passes(engine, reference, spec, folder)
    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(ort_engine, 'fused_backbone', lambda path, rotary, attention_past: (b'not a model', 4, 0))
        engine = OrtEngine(spec, threads=1)
    assert engine.rotary_fused == 0 and 'cannot load the graph with fused rotary embeddings' in caplog.text
    _same_passes(engine, reference, spec, folder)
