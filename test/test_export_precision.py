"""blockvla-export --precision on a tiny policy: what int8 / int4 / fp16 folders hold and that parity reports tokens.

Token agreement itself is not asserted to be high: a tiny random policy's bin logits are nearly flat, so a small
weight error flips tokens (export.precision). What is asserted: the weights are stored at the precision asked for
(int8 / int4: the backbone's MatMuls and the text embedding table), each file says so, the folder's size against
the weights at the precision, a malformed quantized table is refused by name, the parity run decodes the folder
through ONNX Runtime on the CPU and reports its agreement, and a required agreement is enforced.
"""
import shutil

import numpy as np
import onnx
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file, save_file as save_numpy

from blockvla_ros.export.parity import ExportParityError
from blockvla_ros.export.policy_writer import export_policy, load_checkpoint
from blockvla_ros.export.precision import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, default_block_size
from blockvla_ros.model.graphs import tables
from blockvla_ros.runtime.policy_folder import PolicyFolderError, load_policy_folder, write_manifest
from blockvla_ros.runtime.runner import PolicyRunner
from blockvla_ros.runtime.tables import Tables

from quantized_table import dequantize_reference
from tiny import QWEN2
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


@pytest.mark.parametrize('precision,bits,block', [('int8', 8, None), ('int4', 4, None), ('int4', 4, 64)])
def test_int8_int4_store_matmuls_in_n_bits_and_report_token_agreement(ckpt, tmp_path, precision, bits, block):
    """None: the default block size for the tiny backbone's hidden 64 (32), recorded in policy.yaml; 64:
    --quant-block-size 64 reaches the MatMulNBits nodes and the text table's groups (recorded in its file), and the
    folder decodes with ONNX Runtime and reports its agreement."""
    out = tmp_path / 'models' / precision
    report = _export(ckpt, out, precision, inline_limit=16 << 10,  # quantized weights above it: external data
                     quant_block_size=block)
    block = block or default_block_size(64)  # 32
    assert yaml.safe_load((out / 'policy.yaml').read_text())['export']['quant_block_size'] == block
    assert load_policy_folder(out).graphs['backbone'].data == ['backbone.onnx.data']
    model = onnx.load(str(out / 'backbone.onnx'))
    nbits = [n for n in model.graph.node if n.op_type == 'MatMulNBits']
    assert nbits and not _matmul_weights(model)  # every weight MatMul quantized, none left in fp32
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs['bits'] == bits and attrs['block_size'] == block
        assert attrs.get('accuracy_level', 0) == DEFAULT_ACCURACY_LEVEL  # int8 compute unless asked otherwise
    assert report.checks['backbone']['tensorrt'] is False  # com.microsoft op: ONNX Runtime only, and said so
    # quantized backbone: at most bits/32 of the fp32 MatMul weights (K padded to whole blocks: the tiny K = 64 in
    # blocks of 128) plus one fp32 scale per block and the rest
    fp32_matmul = sum(4 * node_k_n(n, block) for n in nbits)
    stored = sum(p.stat().st_size for p in out.glob('backbone.onnx*'))
    assert stored < fp32_matmul * (bits / 32 + 1 / block) + 100_000
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
    _check_text_table(ckpt, out, bits, block)


def _check_text_table(ckpt, out, bits, group):
    """The folder's text table is stored at `bits` in groups of `group`, recorded in the file (runtime.tables'
    layout), and the runtime's rows are a plain numpy dequantization of it, within half a quantization step of the
    fp32 policy's table."""
    with safe_open(str(out / 'tables.safetensors'), 'numpy') as f:
        assert f.metadata() == {'text_embed.group': str(group)}
    stored = load_file(str(out / 'tables.safetensors'))
    q, scale = stored.pop(f'text_embed.int{bits}'), stored.pop('text_embed.scale')
    text = tables(load_checkpoint(ckpt)[0])['text_embed'].numpy()
    vocab, hidden = text.shape
    assert q.dtype == (np.int8 if bits == 8 else np.uint8) and q.nbytes == vocab * hidden * bits // 8
    assert scale.dtype == np.float16 and scale.shape == (vocab, -(-hidden // group))
    assert set(stored) == {'action_embed'} and stored['action_embed'].dtype == np.float32  # small: fp32
    ids = np.array([0, 1, vocab // 2, vocab - 1])
    table = Tables.open(out / 'tables.safetensors')
    assert table.text_group == group
    rows = table.text(ids)[0]
    assert np.array_equal(rows, dequantize_reference(q[ids], scale[ids], bits, hidden, group))
    step = np.repeat(scale[ids].astype(np.float32), group, axis=1)[:, :hidden]
    assert np.all(np.abs(rows - text[ids]) <= step / 2 * (1 + 1e-5))


def node_k_n(node, block: int) -> int:
    """A MatMulNBits node's weight count with K padded to whole blocks (as stored)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return -(-attrs['K'] // block) * block * attrs['N']


def test_required_token_agreement_is_enforced_and_keeps_no_folder(ckpt, tmp_path):
    out = tmp_path / 'models' / 'int4'
    with pytest.raises(ExportParityError, match='token agreement'):
        _export(ckpt, out, 'int4', min_agreement=1.0)  # int4 rounding changes some of the tiny policy's tokens
    assert not out.exists()


@pytest.mark.parametrize('samples', [0, 2])
def test_the_fp32_reference_is_reloaded_only_when_parity_is_checked(ckpt, tmp_path, monkeypatch, samples):
    """An int8 export drops the model before quantizing; it loads the fp32 checkpoint a second time only as the
    parity reference (a second model at the export's peak otherwise: SmolLM2-360M int4, README), and policy.yaml gets
    the same kv_shape and prefix either way."""
    from blockvla_ros.export import policy_writer

    loads = []

    def counted(path):
        loads.append(path)
        return load_checkpoint(path)

    monkeypatch.setattr(policy_writer, 'load_checkpoint', counted)  # the real loader, counted
    out = tmp_path / 'models' / 'int8'
    report = export_policy(ckpt, out, precision='int8', parity_samples=samples, threads=1, progress=False)
    assert bool(report.parity) == (samples > 0)
    policy, _ = load_checkpoint(ckpt)
    doc = yaml.safe_load((out / 'policy.yaml').read_text())
    assert doc['kv_shape'] == list(policy.kv_shape) and doc['prefix'] == policy.layout.to_dict()
    assert len(loads) == 1 + (samples > 0)


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


@pytest.mark.parametrize('precision,bits,bound', [('int8', 8, 1.15), ('int4', 4, 1.20)])
def test_folder_over_weights_at_int8_int4_when_the_text_table_dominates(tmp_path, precision, bits, bound):
    """A 65,536-word vocabulary makes the text table 94 % of the parameters (Qwen2.5-0.5B: 28 %). int8 meets issue
    14's <= 1.15x the weights at the precision (1.095x). int4 at blocks of 128 (the default from hidden 512 up: the
    table's float16 scale per 128 values, 1.03x) does at 0.5B (1.07x) but not here (1.185x; 1.229x at blocks of 32,
    this hidden-64 backbone's own default): vision.onnx stays fp32, 8x its 4-bit bytes, and the tiny backbone's
    K = 64 is padded to a block of 128, so it is held to 1.20x here."""
    ckpt = write_checkpoint(tmp_path / 'ckpt', backbone=dict(QWEN2, vocab_size=1 << 16))
    out = tmp_path / 'models' / precision
    report = export_policy(ckpt, out, precision=precision, parity_samples=0, progress=False,
                           quant_block_size=DEFAULT_BLOCK_SIZE)
    params = report.sizes.pop('weights') // 4
    text = 65536 * 64
    assert text / params > 0.9
    folder = sum(report.sizes.values())
    assert sum(p.stat().st_size for p in out.iterdir()) == folder
    ratio = folder / (params * bits / 8)
    print(f'{precision}: folder {folder} bytes = {ratio:.3f}x the weights at {bits} bits')
    assert ratio <= bound
    runner = PolicyRunner.load(out, threads=1)
    action_embed = (runner.config.n_bins + 1) * 64 * 4  # fp32
    scales = 65536 * 2 * -(-64 // DEFAULT_BLOCK_SIZE)  # float16, one per group of each row (one group of 64 here)
    assert report.sizes['tables.safetensors'] <= text * bits / 8 + scales + action_embed + 1000  # + the header
    assert runner.engine.tables.text_layout == precision
    pred = runner.predict(np.full((32, 32, 3), 128, np.uint8), 'push the block')
    assert pred.actions.shape == (runner.config.chunk_len, runner.config.action_dim)


def _rewrite_tables(folder, change, metadata=None):
    """Rewrite the folder's tables with `change` applied, and `metadata` as the file's __metadata__ (None: none, as
    files written before the text table's group was recorded)."""
    arrays = load_file(str(folder / 'tables.safetensors'))
    change(arrays)
    save_numpy(arrays, str(folder / 'tables.safetensors'), metadata=metadata)
    write_manifest(folder)  # a consistent manifest: the loader must find the problem in the table itself


def test_a_malformed_quantized_table_is_refused_by_name_and_an_fp32_table_still_loads(ckpt, tmp_path):
    """int8 folder: a scale of the wrong dtype or shape, a table of the wrong dtype, or a recorded group size that is
    not a power of two >= 16 or does not fit the scales, is refused when the folder loads, naming the tensor or key;
    an int8 folder written before the group was recorded (32) or before quantized tables (fp32 text_embed) loads and
    runs."""
    out = tmp_path / 'models' / 'int8'
    _export(ckpt, out, 'int8', quant_block_size=32)  # the group files with none recorded read as
    cases = [(lambda a: a.update({'text_embed.scale': a['text_embed.scale'].astype(np.float32)}),
              'text_embed.scale is float32'),
             (lambda a: a.update({'text_embed.scale': a['text_embed.scale'][:, :1]}),
              r'text_embed.scale is float16 \[512, 1\], expected float16 \[512, 2\]'),
             (lambda a: a.update({'text_embed.int8': a['text_embed.int8'].view(np.uint8)}),
              'text_embed.int8 is uint8'),
             (lambda a: None, '__metadata__ text_embed.group must be a power of two >= 16', '48'),
             (lambda a: None, r"text_embed.group must be .*, got 'x'", 'x'),
             (lambda a: None, r'text_embed.scale is float16 \[512, 2\], expected float16 \[512, 1\]', '64')]
    for i, (change, match, *group) in enumerate(cases):
        bad = shutil.copytree(out, tmp_path / f'bad{i}')
        _rewrite_tables(bad, change, {'text_embed.group': group[0]} if group else None)
        with pytest.raises(PolicyFolderError, match=match) as err:
            load_policy_folder(bad)
        assert 'tables.safetensors' in str(err.value)
    text = tables(load_checkpoint(ckpt)[0])['text_embed'].numpy()
    unrecorded = shutil.copytree(out, tmp_path / 'unrecorded')  # written before the group was recorded: 32
    _rewrite_tables(unrecorded, lambda a: None)
    assert np.array_equal(PolicyRunner.load(unrecorded, threads=1).engine.tables.text([5, 9]),
                          PolicyRunner.load(out, threads=1).engine.tables.text([5, 9]))
    old = shutil.copytree(out, tmp_path / 'before')

    def fp32_table(a):
        del a['text_embed.int8'], a['text_embed.scale']
        a['text_embed'] = text
    _rewrite_tables(old, fp32_table)
    assert load_policy_folder(old).precision == 'int8'
    runner = PolicyRunner.load(old, threads=1)
    assert runner.engine.tables.text_layout == 'float32'
    assert np.array_equal(runner.engine.tables.text([5, 9])[0], text[[5, 9]])
    pred = runner.predict(np.full((32, 32, 3), 128, np.uint8), 'push the block')
    assert pred.actions.shape == (runner.config.chunk_len, runner.config.action_dim)
