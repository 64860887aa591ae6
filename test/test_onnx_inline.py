"""export.onnx_inline.write_inline: a graph's external data moved inline one tensor at a time writes the very bytes
onnx.load + onnx.save_model write, and ONNX Runtime runs it like the external-data graph."""
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from blockvla_ros.export.onnx_export import export_backbone
from blockvla_ros.export.onnx_checks import check_graph_file
from blockvla_ros.export.onnx_inline import load_without_weights, write_inline
from blockvla_ros.model.policy import BlockVLAPolicy

from tiny import tiny_config


def _feeds(sess, n=3, past=5):
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [{'n': n, 'past': past, 'm': n, 'n + past': n + past}.get(d, d) for d in i.shape]
        if i.name == 'mask':
            feeds[i.name] = np.ones(shape, bool)
        elif i.name == 'logit_rows':
            feeds[i.name] = np.arange(n, dtype=np.int64)
        elif i.name == 'positions':
            feeds[i.name] = np.broadcast_to(np.arange(past, past + n), shape).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(path, feeds=None):
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    feeds = feeds or _feeds(sess)
    return sess.run(None, feeds), feeds


@pytest.fixture(scope='module')
def external_backbone(tmp_path_factory):
    """A tiny policy's backbone as the dynamo exporter writes it: backbone.onnx + backbone.onnx.data."""
    root = tmp_path_factory.mktemp('inline')
    torch.manual_seed(0)
    export_backbone(BlockVLAPolicy(tiny_config()).eval(), root, inline_limit=0)
    assert (root / 'backbone.onnx.data').is_file()
    return root


def test_inline_write_equals_onnx_load_and_save_and_runs_the_same(external_backbone, tmp_path):
    ours, ref = tmp_path / 'ours', tmp_path / 'ref'
    shutil.copytree(external_backbone, ours)
    shutil.copytree(external_backbone, ref)
    model = onnx.load(str(ref / 'backbone.onnx'))  # the old way: every weight in memory, then serialized
    onnx.save_model(model, str(ref / 'backbone.onnx'))
    write_inline(ours / 'backbone.onnx')
    assert sorted(p.name for p in ours.iterdir()) == ['backbone.onnx']
    assert (ours / 'backbone.onnx').read_bytes() == (ref / 'backbone.onnx').read_bytes()
    inline = onnx.load(str(ours / 'backbone.onnx'), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in inline.graph.initializer)
    expected, feeds = _run(external_backbone / 'backbone.onnx')
    got, _ = _run(ours / 'backbone.onnx', feeds)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


def _graph_with_external_attribute(folder):
    """y = x @ W + C, W an initializer and C a Constant node's tensor, both in g.onnx.data."""
    rng = np.random.default_rng(1)
    w, c = rng.standard_normal((4, 300)).astype(np.float32), rng.standard_normal(300).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node('Constant', [], ['c'], value=numpy_helper.from_array(c, 'c')),
         helper.make_node('MatMul', ['x', 'w'], ['xw']), helper.make_node('Add', ['xw', 'c'], ['y'])],
        'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [2, 300])], [numpy_helper.from_array(w, 'w')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)], ir_version=10)
    onnx.save_model(model, str(folder / 'g.onnx'), save_as_external_data=True, location='g.onnx.data',
                    size_threshold=0, convert_attribute=True)
    return w, c


def test_attribute_tensors_in_external_data_are_inlined_too(tmp_path):
    w, c = _graph_with_external_attribute(tmp_path)
    assert len([t for t in onnx.external_data_helper._get_all_tensors(
        onnx.load(str(tmp_path / 'g.onnx'), load_external_data=False))
        if onnx.external_data_helper.uses_external_data(t)]) == 2
    write_inline(tmp_path / 'g.onnx')
    assert not (tmp_path / 'g.onnx.data').exists()
    x = np.ones((2, 4), np.float32)
    (y,), _ = _run(tmp_path / 'g.onnx', {'x': x})
    np.testing.assert_allclose(y, x @ w + c, rtol=1e-6)


def test_a_graph_naming_another_data_file_is_refused_and_left_as_it_was(tmp_path):
    _graph_with_external_attribute(tmp_path)
    (tmp_path / 'g.onnx').rename(tmp_path / 'h.onnx')  # its tensors still point into g.onnx.data
    before = (tmp_path / 'h.onnx').read_bytes()
    with pytest.raises(ValueError, match='g.onnx.data'):
        write_inline(tmp_path / 'h.onnx')
    assert (tmp_path / 'h.onnx').read_bytes() == before and (tmp_path / 'g.onnx.data').is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['g.onnx.data', 'h.onnx']  # no temporary file left


def test_load_without_weights_reads_the_graph_of_an_inline_file_without_its_weights(external_backbone, tmp_path):
    """What the export's graph checks read: the inline graph minus its initializers' bytes, the same as onnx.load
    then dropping them; the checks agree with those of the external-data graph."""
    shutil.copytree(external_backbone, tmp_path / 'g')
    path = tmp_path / 'g' / 'backbone.onnx'
    external = check_graph_file(path)
    write_inline(path)
    expected = onnx.load(str(path))
    for t in expected.graph.initializer:
        t.ClearField('raw_data')
    got = load_without_weights(path)
    assert got == expected and len(got.graph.initializer) > 0
    assert not any(t.HasField('raw_data') for t in got.graph.initializer)
    assert check_graph_file(path) == external
    expected = onnx.load(str(external_backbone / 'backbone.onnx'), load_external_data=False)
    for t in expected.graph.initializer:  # the small ones the exporter kept inline
        t.ClearField('raw_data')
    assert load_without_weights(external_backbone / 'backbone.onnx') == expected


@pytest.mark.parametrize('mib, sidecars', [(1, []), (17, ['g.onnx.data'])])
def test_the_default_inline_limit_keeps_real_size_weights_external(tmp_path, mib, sidecars):
    """At the default limit (16 MiB) a small graph goes inline and a larger one keeps its one .data file, which ONNX
    Runtime maps and drops once used (inline weights stay parsed in the heap: README, fp16 on a CPU); both run the
    same."""
    from blockvla_ros.export.onnx_export import INLINE_LIMIT, _place_weights

    assert INLINE_LIMIT == 16 << 20
    side = int(np.sqrt(mib * 2**20 / 4))
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((side, side)).astype(np.float32), 'w')
    graph = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y'])], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, side])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / 'g.onnx'), save_as_external_data=True, location='g.onnx.data',
                    size_threshold=1024)
    x = {'x': np.ones((1, side), np.float32)}
    before = _run(tmp_path / 'g.onnx', x)[0][0]
    assert _place_weights(tmp_path / 'g.onnx', INLINE_LIMIT) == sidecars
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['g.onnx'] + sidecars)
    assert np.array_equal(_run(tmp_path / 'g.onnx', x)[0][0], before)
