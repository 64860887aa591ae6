"""blockvla-export --precision on a tiny policy: what int8 / int4 / fp16 folders hold and that parity reports tokens.

Token agreement itself is not asserted to be high: a tiny random policy's bin logits are nearly flat, so a small
weight error flips tokens (export.precision). What is asserted: the weights are stored at the precision asked for,
each file says so, the parity run decodes the folder through ONNX Runtime on the CPU and reports its agreement,
and a required agreement is enforced.
"""
import numpy as np
import onnx
import pytest
import yaml
from safetensors.numpy import load_file

from blockvla_ros.export.parity import ExportParityError
from blockvla_ros.export.policy_writer import export_policy
from blockvla_ros.runtime.policy_folder import load_policy_folder
from blockvla_ros.runtime.runner import PolicyRunner

from tiny_policy import write_checkpoint

pytestmark = pytest.mark.slow  # one export + parity run each


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp('precision') / 'ckpt')


def _export(ckpt, out, precision, **kw):
    return export_policy(ckpt, out, precision=precision, parity_samples=2, threads=1, progress=False, **kw)


def _matmul_weights(model):
    """MatMul nodes whose second input is a stored weight -> that initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == 'MatMul' and n.input[1] in inits]


@pytest.mark.parametrize('precision,bits', [('int8', 8), ('int4', 4)])
def test_int8_int4_store_matmuls_in_n_bits_and_report_token_agreement(ckpt, tmp_path, precision, bits):
    out = tmp_path / 'models' / precision
    report = _export(ckpt, out, precision, inline_limit=16 << 10)  # quantized weights above it: external data
    assert load_policy_folder(out).graphs['backbone'].data == ['backbone.onnx.data']
    model = onnx.load(str(out / 'backbone.onnx'))
    nbits = [n for n in model.graph.node if n.op_type == 'MatMulNBits']
    assert nbits and not _matmul_weights(model)  # every weight MatMul quantized, none left in fp32
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs['bits'] == bits and attrs['block_size'] == 32
    assert report.checks['backbone']['tensorrt'] is False  # com.microsoft op: ONNX Runtime only, and said so
    # quantized backbone: at most bits/32 of the fp32 MatMul weights plus one fp32 scale per 32 weights and the rest
    fp32_matmul = sum(4 * node_k_n(n) for n in nbits)
    stored = sum(p.stat().st_size for p in out.glob('backbone.onnx*'))
    assert stored < fp32_matmul * (bits / 32 + 1 / 8) + 100_000
    doc = yaml.safe_load((out / 'policy.yaml').read_text())
    assert doc['precision'] == precision and load_policy_folder(out).precision == precision
    results = doc['export']['parity']['results']
    assert doc['export']['parity']['tolerance'] is None  # judged by tokens, not by a logits bound
    assert [r['engine'] for r in results][0] == 'onnxruntime'
    for r in results:
        assert r['samples'] == 2 and 0.0 <= r['token_agreement'] <= 1.0
        assert r['tokens_equal'] == (r['token_agreement'] == 1.0) and r['graph_calls'] > 0
    runner = PolicyRunner.load(out, threads=1)  # what a robot runs: ONNX Runtime's CPU kernels for MatMulNBits
    pred = runner.predict(np.full((32, 32, 3), 128, np.uint8), 'push the block')  # tiny: no state input
    assert pred.actions.shape == (runner.config.chunk_len, runner.config.action_dim) and pred.nfe > 0
    assert ((pred.tokens >= 0) & (pred.tokens < runner.config.n_bins)).all()


def node_k_n(node) -> int:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return attrs['K'] * attrs['N']


def test_required_token_agreement_is_enforced_and_keeps_no_folder(ckpt, tmp_path):
    out = tmp_path / 'models' / 'int4'
    with pytest.raises(ExportParityError, match='token agreement'):
        _export(ckpt, out, 'int4', min_agreement=1.01)  # no decoding can agree on 101 % of its tokens
    assert not out.exists()


def test_fp16_stores_half_weights_and_tables_and_runs_on_the_cpu(ckpt, tmp_path):
    """fp16 targets GPUs, but ONNX Runtime's CPU provider runs it too (parity against the fp32 torch policy)."""
    out = tmp_path / 'models' / 'fp16'
    report = _export(ckpt, out, 'fp16')
    for graph in ('vision.onnx', 'backbone.onnx'):
        model = onnx.load(str(out / graph))
        weights = [t for t in model.graph.initializer if len(t.dims) == 2]
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), graph
    assert all(a.dtype.name == 'float16' for a in load_file(str(out / 'tables.safetensors')).values())
    assert report.checks['backbone'].get('tensorrt', True)  # TensorRT FP16 builds from the same file
    assert load_policy_folder(out).precision == 'fp16'
    for r in report.parity:
        assert r['samples'] == 2 and 0.0 <= r['token_agreement'] <= 1.0
