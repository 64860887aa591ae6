"""blockvla-export: the policy folder it writes, the graph checks (static shapes, TensorRT ops), fail-fast paths."""
import hashlib
import json
import os
import re

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from blockvla_ros.export import cli
from blockvla_ros.export.onnx_checks import (GraphCheckError, check_graph_file, check_tensorrt_ops, io_specs,
                                             load_tensorrt_ops)
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
    rc = cli.main(['--checkpoint', str(ckpt), '--out', str(out), '--threads', '1', '--parity-samples', '2',
                   '--no-calibrate', '-q'])  # a bare checkpoint: no run, no validation split to calibrate on
    assert rc == 0
    return ckpt, out


def test_folder_layout_manifest_and_policy_yaml(exported):
    _, out = exported
    names = sorted(os.listdir(out))
    assert names == sorted(['policy.yaml', 'stats.json', 'manifest.json', 'vision.onnx', 'backbone.onnx',
                            'tables.safetensors'])
    manifest = json.loads((out / 'manifest.json').read_text())
    assert sorted(manifest['files']) == sorted(n for n in names if n != 'manifest.json')
    for name, digest in manifest['files'].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    doc = yaml.safe_load((out / 'policy.yaml').read_text())
    assert doc['format_version'] == 2 and doc['name'] == 'pick' and doc['precision'] == 'fp32'
    assert set(doc['graphs']) == {'vision', 'backbone'} and doc['tables'] == 'tables.safetensors'
    cfg = doc['config']
    assert doc['kv_shape'] == [2, 2, 16]
    assert doc['prefix']['segments'] == [{'name': 'text', 'length': cfg['max_text_tokens'], 'source': 'text'},
                                         {'name': 'image', 'length': 4, 'source': 'image'}]
    assert doc['prefix']['rope_dims'] == 1
    assert doc['actions']['names'] == ['a0', 'a1', 'a2'] and len(doc['actions']['low']) == 3
    assert all(r['max_abs_diff'] <= 1e-3 for r in doc['export']['parity']['results'])
    engines = {r['engine'] for r in doc['export']['parity']['results']}
    assert engines == {'onnxruntime', 'onnxruntime (one-call prefill)'}
    spec = load_policy_folder(out)
    assert spec.config.to_dict() == cfg and spec.float_dtype == 'float32'


def test_each_weight_is_stored_once(exported):
    """Every parameter the runtime needs is in exactly one file of the folder, and nothing is stored twice."""
    ckpt, out = exported
    from safetensors.numpy import load_file

    def fingerprint(a):  # transposition-invariant: the exporter may store W or W^T
        a = np.asarray(a, np.float32).ravel()
        return a.size, hashlib.sha256(np.sort(a).tobytes()).hexdigest()

    stored = []
    for graph in ('vision.onnx', 'backbone.onnx'):
        stored += [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out / graph)).graph.initializer]
    stored += list(load_file(str(out / 'tables.safetensors')).values())
    stored = [a for a in stored if a.dtype.kind == 'f' and np.unique(a).size > 1]  # shapes, all-ones norms aside
    counts = {}
    for a in stored:
        counts[fingerprint(a)] = counts.get(fingerprint(a), 0) + 1
    params = {k: v for k, v in load_file(str(ckpt / 'model.safetensors')).items() if np.unique(v).size > 1}
    for name, value in params.items():
        assert counts.get(fingerprint(value), 0) == 1, f'{name} is stored {counts.get(fingerprint(value), 0)} times'
    assert all(c == 1 for c in counts.values())
    weights = sum(v.nbytes for v in load_file(str(ckpt / 'model.safetensors')).values())
    folder = sum((out / f).stat().st_size for f in os.listdir(out))
    assert folder <= 1.15 * weights, f'folder {folder} bytes for {weights} bytes of weights'


def test_graphs_vary_only_in_n_past_and_m_and_use_only_tensorrt_ops(exported):
    _, out = exported
    spec = load_policy_folder(out)
    t_max, layers = spec.config.max_seq_len, spec.kv_shape[0]
    assert check_graph_file(out / 'vision.onnx')['dynamic'] == []
    info = check_graph_file(out / 'backbone.onnx')
    assert info['opset'] == 20 and info['dynamic'] == ['m', 'n', 'past']
    g = spec.graphs['backbone']
    assert [t.name for t in g.inputs] == ['embeds', 'positions', 'mask', 'logit_rows'] + [
        f'past_{w}_{i}' for i in range(layers) for w in ('key', 'value')]
    assert g.tensor('embeds').shape == [1, 'n', 64] and g.tensor('positions').shape == [1, 'n']
    assert g.tensor('mask').shape == [1, 1, 'n', 'n + past'] and g.tensor('mask').dtype == 'bool'
    assert g.tensor('past_key_0').shape == [1, 2, 'past', 16]
    assert g.tensor('logit_rows').shape == ['m'] and g.tensor('logit_rows').dtype == 'int64'
    assert g.tensor('logits').shape == [1, 'm', spec.config.n_bins]
    assert g.tensor('logits').concrete(5, 7, 2) == (1, 2, spec.config.n_bins)
    assert g.tensor('logits').concrete(5) == (1, 5, spec.config.n_bins)  # m defaults to n (every row)
    assert g.tensor('new_kv').shape == [layers, 2, 2, 'n', 16]
    assert g.tensor('mask').concrete(5, t_max) == (1, 1, 5, t_max + 5)
    assert g.tensor('past_value_1').concrete(5, 7) == (1, 2, 7, 16)


def test_every_rmsnorm_is_fused_by_onnx_runtime(exported, tmp_path):
    """export.onnx_rewrites: no Reciprocal feeds a Mul in the exported backbone, so ONNX Runtime's optimizer turns
    each RMSNorm (2 per layer + the final one) into one SimplifiedLayerNormalization node."""
    import onnxruntime as ort

    _, out = exported
    spec = load_policy_folder(out)
    model = onnx.load(str(out / 'backbone.onnx'), load_external_data=False)
    assert 'Reciprocal' not in {n.op_type for n in model.graph.node}
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    ort.InferenceSession(str(out / 'backbone.onnx'), options, providers=['CPUExecutionProvider'])
    ops = [n.op_type for n in onnx.load(str(tmp_path / 'optimized.onnx'), load_external_data=False).graph.node]
    assert ops.count('SimplifiedLayerNormalization') == 2 * spec.kv_shape[0] + 1
    assert 'ReduceMean' not in ops


def _model(nodes, inputs, outputs, opset=18):
    graph = helper.make_graph(nodes, 'g', inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)], ir_version=8)


def test_graph_checks_reject_other_dynamic_dims_unknown_ops_and_new_opsets():
    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', 4])
    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', 4])
    with pytest.raises(GraphCheckError, match=r"only \['n', 'past', 'm'\] may vary"):
        io_specs(_model([helper.make_node('Relu', ['x'], ['y'])], [x], [y]))
    xn = helper.make_tensor_value_info('x', TensorProto.FLOAT, ['n', 'n + 3'])
    assert io_specs(_model([helper.make_node('Relu', ['x'], ['y'])], [xn], [xn]))[0][0]['shape'] == ['n', 'n + 3']
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


def test_parity_samples_zero_says_not_checked_and_refuses_a_required_agreement(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / 'unchecked'
    rc = cli.main(['--checkpoint', str(ckpt), '--out', str(out), '--threads', '1', '--parity-samples', '0',
                   '--no-calibrate'])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0 and 'parity vs torch: not checked (--parity-samples 0)' in printed, captured.err[-500:]
    assert 'token agreement 0.000' not in printed  # no agreement is claimed over zero observations
    assert yaml.safe_load((out / 'policy.yaml').read_text())['export']['parity']['results'] == []
    rc = cli.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'refused'), '--parity-samples', '0',
                   '--min-agreement', '0.9', '--no-calibrate', '-q'])
    assert rc == 1 and 'parity_samples' in capsys.readouterr().err and not (tmp_path / 'refused').exists()


@pytest.mark.parametrize('flags, message', [
    (['--tolerance', '-1'], r'--tolerance\) must be a positive number, got -1'),
    (['--tolerance', 'nan'], r'--tolerance\) must be a positive number, got nan'),
    (['--min-agreement', '5'], r'--min-agreement\) must be in \[0, 1\], got 5'),
    (['--threads', '-2'], r'--threads\) must be >= 0'),
    (['--inline-limit-mb', '-1'], r'--inline-limit-mb\) must be >= 0'),
    (['--fp16'], '--fp16 makes FP16 TensorRT engines and needs --trt'),
])
def test_bad_export_options_are_refused_before_any_work(exported, tmp_path, capsys, flags, message):
    """--tolerance -1 / --min-agreement 5 ran the whole export and then failed parity with figures that matched
    (max diff 9.5e-07, agreement 1.000); --fp16 without --trt was silently ignored (an fp32 folder)."""
    ckpt, _ = exported
    assert cli.main(['--checkpoint', str(ckpt), '--out', str(tmp_path / 'out'), '--no-calibrate', '-q', *flags]) == 1
    assert re.search(message, capsys.readouterr().err) and not (tmp_path / 'out').exists()


def test_a_folder_that_cannot_be_written_is_an_error_line_and_keeps_the_old_one(exported, tmp_path, capsys):
    """A full disk (a real EFBIG from RLIMIT_FSIZE here) ended the export in onnx_ir's OSError traceback."""
    import resource
    import signal

    ckpt, _ = exported
    out = tmp_path / 'models' / 'pick'
    out.mkdir(parents=True)
    (out / 'old.txt').write_text('previous export')
    limits, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))  # the tiny policy's graphs are ~0.7 MB
    try:
        rc = cli.main(['--checkpoint', str(ckpt), '--out', str(out), '--threads', '1', '--parity-samples', '1',
                       '--no-calibrate', '-q', '--inline-limit-mb', '0'])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    err = capsys.readouterr().err
    assert rc == 1 and 'blockvla-export: error: cannot write the policy folder' in err and 'Traceback' not in err, err
    assert os.listdir(out) == ['old.txt'] and os.listdir(tmp_path / 'models') == ['pick']


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
    run = tmp_path / 'runs' / 'pick'  # the run folder instead of one of its checkpoints: name the newest
    for step in ('step_00000010', 'step_00000020'):
        (run / 'checkpoints' / step).mkdir(parents=True)
    for given in (run, run / 'checkpoints'):
        rc = cli.main(['--checkpoint', str(given), '--out', str(tmp_path / 'out'), '-q'])
        err = capsys.readouterr().err
        assert rc == 1 and 'training run folder' in err and str(run / 'checkpoints' / 'step_00000020') in err, err


def test_llama_with_state_and_image_first_exports_without_split(tmp_path):
    ckpt = write_checkpoint(tmp_path / 'ckpt', backbone=LLAMA, state_dim=2, prefix_order='image_first',
                            logit_shift='same')
    report = export_policy(ckpt, tmp_path / 'out', parity_samples=2, threads=1, progress=False)
    spec = load_policy_folder(tmp_path / 'out')
    assert [r['engine'] for r in report.parity] == ['onnxruntime']  # no instruction split to check
    assert [s['name'] for s in spec.raw['prefix']['segments']] == ['image', 'text', 'state']
    assert report.parity[0]['max_abs_diff'] <= 1e-3


def test_weights_above_the_inline_limit_go_to_one_external_file(exported, tmp_path):
    """The mechanism that lets a graph pass protobuf's 2 GiB: the limit lowered to 64 KiB on a tiny policy."""
    ckpt, _ = exported
    out = tmp_path / 'models' / 'big'
    report = export_policy(ckpt, out, parity_samples=1, threads=1, progress=False, inline_limit=64 << 10)
    assert 'backbone.onnx.data' in report.files and 'vision.onnx.data' in report.files
    spec = load_policy_folder(out)
    assert spec.graphs['backbone'].data == ['backbone.onnx.data']
    assert set(spec.manifest) >= {'backbone.onnx.data', 'vision.onnx.data'}
    model = onnx.load(str(out / 'backbone.onnx'), load_external_data=False)
    assert (out / 'backbone.onnx').stat().st_size < 64 << 10  # the graph alone; weights are in the .data file
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if len(t.dims) == 2)
    assert report.parity[0]['max_abs_diff'] <= 1e-3


def test_the_exporter_keeps_no_reference_to_the_policys_parameters(exported, tmp_path):
    """Export drops the fp32 policy before quantizing and reloads it for parity: that frees memory only if nothing
    else still holds the parameters' memory: onnxscript's module-level rewrite rules kept the exporter's IR values,
    which held the parameters themselves, and the optimizer's folded transposes of the Linear weights, numpy views
    whose base is an alias of the weight (the parameter objects died, their storages did not)."""
    import gc
    import weakref

    from blockvla_ros.export.onnx_export import export_backbone
    from blockvla_ros.export.policy_writer import load_checkpoint

    policy, _ = load_checkpoint(exported[0])
    refs = {name: (weakref.ref(p), weakref.ref(p.untyped_storage())) for name, p in policy.named_parameters()}
    assert any(p.dim() == 2 and 'proj' in name for name, p in policy.named_parameters())  # Linear weights are here
    export_backbone(policy, tmp_path)
    del policy
    gc.collect()
    assert not [name for name, (param, storage) in refs.items() if param() is not None]
    assert not [name for name, (param, storage) in refs.items() if storage() is not None]


def test_the_vision_export_leaves_no_torchscript_state(tmp_path):
    """The TorchScript exporter traces the vision tower (an HF SigLIP here) into a JIT graph; once export_vision
    returns nothing of that trace may remain: every parameter dies with the policy (a tensor still held by C++, a
    leaked traced module, would keep its Python object alive), and the graph file, whose weights export_vision wrote
    from the torch tensors, is complete on its own and computes what the tower does."""
    import gc
    import weakref

    import onnxruntime as ort
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from blockvla_ros.export.onnx_export import export_vision
    from blockvla_ros.model.graphs import VisionGraph
    from blockvla_ros.model.policy import BlockVLAPolicy

    from tiny import tiny_config

    tower = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8)
    SiglipVisionModel(tower).save_pretrained(tmp_path / 'tower')
    policy = BlockVLAPolicy(tiny_config(vision={'type': 'hf', 'num_tokens': 16, 'path': str(tmp_path / 'tower')}))
    refs = [weakref.ref(p) for p in policy.vision.parameters()]
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = VisionGraph(policy.eval())(pixels).numpy()
    spec = export_vision(policy, tmp_path)
    del policy
    gc.collect()
    assert not [r for r in refs if r() is not None]
    assert spec.data == [] and sorted(p.name for p in tmp_path.glob('vision.onnx*')) == ['vision.onnx']
    sess = ort.InferenceSession(str(tmp_path / 'vision.onnx'), providers=['CPUExecutionProvider'])
    (tokens,) = sess.run(None, {'pixels': pixels.numpy()})  # its weights, written from the torch tensors
    assert tokens.shape == (1, 16, 64)
    np.testing.assert_allclose(tokens, expected, atol=1e-5)


@pytest.mark.parametrize('reuse', [True, False], ids=['split-prefill-reused', 'one-call-prefill'])
def test_a_recorded_reference_gives_the_report_of_the_live_one(exported, reuse):
    """The exporter records the torch reference's lock-step calls and logits, drops it, then replays them against the
    ONNX Runtime session: the report (max |diff|, calls, token agreement, mismatches) is the live comparison's."""
    import torch

    from blockvla_ros.export.parity import compare_engines, compare_recorded, random_observations, record_reference
    from blockvla_ros.export.policy_writer import load_checkpoint
    from blockvla_ros.runtime.ort_engine import OrtEngine
    from blockvla_ros.runtime.runner import policy_preprocessor
    from blockvla_ros.runtime.torch_engine import TorchEngine

    ckpt, out = exported
    torch.set_num_threads(1)
    spec = load_policy_folder(out)
    pre = policy_preprocessor(spec)
    obs = random_observations(spec.config, spec.stats, 3, seed=3, tokenizer=pre.text)
    decoders = ('blockdiff', 'ar', 'fulldiff')
    policy = load_checkpoint(ckpt)[0]
    live = compare_engines(spec.config, TorchEngine(policy, reuse_instruction=reuse),
                           OrtEngine(spec, threads=1, reuse_text_kv=reuse), obs, pre, 'live', decoders)
    tape = record_reference(spec.config, TorchEngine(policy, reuse_instruction=reuse), obs, pre, decoders)
    replayed = compare_recorded(spec.config, tape, OrtEngine(spec, threads=1, reuse_text_kv=reuse), obs, pre, 'live',
                                decoders)
    assert replayed.to_dict() == live.to_dict()
    assert live.graph_calls == sum(2 if isinstance(answer, tuple) else 1 for _, answer in tape)  # each call taped
    assert 0 < live.max_abs_diff <= 1e-3 and live.tokens > 0


@pytest.mark.parametrize('precision', ['fp32', 'int8'])
def test_the_reference_policy_is_gone_before_the_onnxruntime_session_opens(exported, tmp_path, monkeypatch,
                                                                           precision):
    """Peak export RSS (issue 14): the fp32 torch reference and the folder's session, each a full copy of the weights,
    are never alive together; every policy the export loads is dead when the first session is created."""
    import gc
    import weakref

    from blockvla_ros.export import policy_writer
    from blockvla_ros.runtime import ort_engine

    loaded, alive_at_session = [], []

    def load(path):
        policy, stats = policy_writer_load(path)
        loaded.append(weakref.ref(policy))
        return policy, stats

    class Session(ort_engine.OrtEngine):
        def __init__(self, *args, **kw):
            gc.collect()
            alive_at_session.append(sum(ref() is not None for ref in loaded))
            super().__init__(*args, **kw)

    policy_writer_load = policy_writer.load_checkpoint
    monkeypatch.setattr(policy_writer, 'load_checkpoint', load)
    monkeypatch.setattr(ort_engine, 'OrtEngine', Session)
    report = export_policy(exported[0], tmp_path / 'out', precision=precision, parity_samples=1, threads=1,
                           progress=False)
    assert len(report.parity) == 2 and len(loaded) == (1 if precision == 'fp32' else 2)
    assert alive_at_session == [0, 0]


def test_parity_catches_a_tampered_weight_in_the_exported_graph(exported, tmp_path, monkeypatch):
    """One backbone weight changed in backbone.onnx after the export (before the manifest, so the folder loads):
    the recorded reference no longer matches and the export is refused."""
    from blockvla_ros.export import policy_writer

    real = policy_writer.export_backbone

    def tampered(policy, folder, **kw):
        graph = real(policy, folder, **kw)
        path = folder / graph.file
        model = onnx.load(str(path))
        weight = next(t for t in model.graph.initializer if len(t.dims) == 2 and min(t.dims) >= 32)  # a Linear's
        array = onnx.numpy_helper.to_array(weight).copy()
        array[0] += 1.0  # one row of it
        weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
        onnx.save(model, str(path))
        return graph

    monkeypatch.setattr(policy_writer, 'export_backbone', tampered)
    with pytest.raises(ExportParityError, match='does not match torch'):
        export_policy(exported[0], tmp_path / 'out', parity_samples=1, threads=1, progress=False)
    assert not (tmp_path / 'out').exists()
