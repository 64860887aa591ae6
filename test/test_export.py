"""blockvla-export: the policy folder it writes, the graph checks (static shapes, TensorRT ops), fail-fast paths."""
import hashlib
import json
import os

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from blockvla_ros.export import cli
from blockvla_ros.export.onnx_checks import (GraphCheckError, check_graph_file, check_static_shapes,
                                             check_tensorrt_ops, load_tensorrt_ops)
from blockvla_ros.export.parity import ExportParityError
from blockvla_ros.export.policy_writer import export_policy
from blockvla_ros.runtime.cuda_memory import cuda_device_count
from blockvla_ros.runtime.policy_folder import load_policy_folder

from tiny import LLAMA
from tiny_policy import write_checkpoint


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('export')
    ckpt = write_checkpoint(root / 'ckpt')
    out = root / 'models' / 'pick'
    rc = cli.main(['--checkpoint', str(ckpt), '--out', str(out), '--threads', '1', '--parity-samples', '2', '-q'])
    assert rc == 0
    return ckpt, out


def test_folder_layout_manifest_and_policy_yaml(exported):
    _, out = exported
    names = sorted(os.listdir(out))
    assert names == sorted(['policy.yaml', 'stats.json', 'manifest.json', 'model.safetensors', 'vision.onnx',
                            'prefill.onnx', 'text_prefill.onnx', 'obs_prefill.onnx', 'block_step.onnx',
                            'ar_step.onnx', 'full_step.onnx'])
    manifest = json.loads((out / 'manifest.json').read_text())
    assert sorted(manifest['files']) == sorted(n for n in names if n != 'manifest.json')
    for name, digest in manifest['files'].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    doc = yaml.safe_load((out / 'policy.yaml').read_text())
    assert doc['format_version'] == 1 and doc['name'] == 'pick'
    cfg = doc['config']
    assert doc['kv_shape'] == [2, 2, 16]
    assert {g['step_width'] for g in doc['graphs'].values() if 'step_width' in g} == {
        cfg['block_size'], 1, cfg['chunk_len'] * cfg['action_dim']}
    assert doc['actions']['names'] == ['a0', 'a1', 'a2'] and len(doc['actions']['low']) == 3
    assert all(r['tokens_equal'] and r['max_abs_diff'] <= 1e-3 for r in doc['export']['parity']['results'])
    spec = load_policy_folder(out)
    assert spec.split_prefill and spec.config.to_dict() == cfg


def test_every_graph_has_static_shapes_and_only_tensorrt_ops(exported):
    _, out = exported
    spec = load_policy_folder(out)
    t_max = spec.config.max_seq_len
    for key, g in spec.graphs.items():
        info = check_graph_file(out / g.file)
        assert 18 <= info['opset'] <= 20
        model = onnx.load(str(out / g.file), load_external_data=False)
        for v in list(model.graph.input) + list(model.graph.output):
            dims = v.type.tensor_type.shape.dim
            assert all(d.HasField('dim_value') for d in dims), f'{key}: {v.name} is not static'
        if g.step_width:
            kv = next(t for t in g.inputs if t.name == 'kv')
            assert kv.shape[3] == t_max and next(t for t in g.inputs if t.name == 'kv_valid').dtype == 'bool'
            assert next(t for t in g.outputs if t.name == 'logits').shape == [1, g.step_width, spec.config.n_bins]


def _model(nodes, inputs, outputs, opset=18):
    graph = helper.make_graph(nodes, 'g', inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)], ir_version=8)


def test_graph_checks_reject_dynamic_shapes_unknown_ops_and_new_opsets():
    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', 4])
    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', 4])
    with pytest.raises(GraphCheckError, match='dynamic shape'):
        check_static_shapes(_model([helper.make_node('Relu', ['x'], ['y'])], [x], [y]), 'dyn.onnx')
    xs = helper.make_tensor_value_info('x', TensorProto.FLOAT, [2, 4])
    ys = helper.make_tensor_value_info('y', TensorProto.FLOAT, [2, 4])
    with pytest.raises(GraphCheckError, match="'BitShift'|Unique|custom"):
        check_tensorrt_ops(_model([helper.make_node('Unique', ['x'], ['y'])], [xs], [ys]), 'unique.onnx')
    with pytest.raises(GraphCheckError, match='custom::Relu'):
        check_tensorrt_ops(_model([helper.make_node('Relu', ['x'], ['y'], domain='custom')], [xs], [ys]), 'c.onnx')
    with pytest.raises(GraphCheckError, match='opset 23'):
        check_tensorrt_ops(_model([helper.make_node('Relu', ['x'], ['y'])], [xs], [ys], opset=23), 'new.onnx')
    ops = load_tensorrt_ops()
    assert {'MatMul', 'Softmax', 'Where', 'CumSum'} <= ops.ops and 'Unique' not in ops.ops
    assert ops.opset_max == 20


def test_parity_failure_aborts_and_keeps_the_old_folder(exported, tmp_path):
    ckpt, _ = exported
    out = tmp_path / 'models' / 'pick'
    out.mkdir(parents=True)
    (out / 'old.txt').write_text('previous export')
    with pytest.raises(ExportParityError, match='does not match torch'):
        export_policy(ckpt, out, parity_samples=1, tolerance=1e-12, threads=1, progress=False)
    assert os.listdir(out) == ['old.txt']
    assert not [p for p in os.listdir(tmp_path / 'models') if p.startswith('.pick')]  # temp dir removed


@pytest.mark.skipif(cuda_device_count()[0] > 0, reason='this machine has a GPU')
def test_trt_without_gpu_fails_at_once_naming_onnxruntime(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / 'trt_policy'
    rc = cli.main(['--checkpoint', str(ckpt), '--out', str(out), '--trt', '-q'])
    err = capsys.readouterr().err
    assert rc == 2
    assert 'GPU' in err and "'onnxruntime'" in err
    assert not out.exists()


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / 'ckpt')
    (ckpt / 'stats.json').unlink()
    rc = cli.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'out'), '-q'])
    assert rc == 1 and 'stats.json' in capsys.readouterr().err
    rc = cli.main(['--checkpoint', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'out'), '-q'])
    assert rc == 1 and 'nowhere' in capsys.readouterr().err


def test_llama_with_state_and_image_first_exports_without_split(tmp_path):
    ckpt = write_checkpoint(tmp_path / 'ckpt', backbone=LLAMA, state_dim=2, prefix_order='image_first',
                            logit_shift='same')
    report = export_policy(ckpt, tmp_path / 'out', parity_samples=2, threads=1, progress=False)
    assert 'text_prefill' not in report.graphs and 'state' in [
        t.name for t in load_policy_folder(tmp_path / 'out').graphs['prefill'].inputs]
    assert all(r['tokens_equal'] for r in report.parity)


@pytest.mark.slow
def test_dynamo_exporter_opset_20(exported, tmp_path):
    ckpt, _ = exported
    report = export_policy(ckpt, tmp_path / 'dyn', exporter='dynamo', parity_samples=1, threads=1, progress=False)
    assert {c['opset'] for c in report.checks.values()} == {20}
    assert report.parity[0]['tokens_equal'] and report.parity[0]['max_abs_diff'] <= 1e-3
    assert np.all([not f.endswith('.data') for f in report.files])  # tiny weights stay inline
