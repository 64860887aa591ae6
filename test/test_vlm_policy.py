"""A policy on a pretrained VLM, each family end to end: train -> export -> ONNX Runtime -> the node over loopback.

Random VLM folders (model.vlm.random_folder) of PaliGemma, SmolVLM2 and Qwen2.5-VL are finetuned with block
diffusion for 20 steps (LoRA on the language model, the vision tower frozen) on rosbag2 recordings the test writes,
exported (vision graph = the VLM's vision part, backbone graph = its language model) and checked against torch by
the exporter for every decoder (lock-step logits <= 1e-3, identical tokens). Cached decoding equals the uncached
reference for all six tiny shapes (PaliGemma/2, SmolVLM, Idefics3, Qwen2-VL, Qwen2.5-VL). The node then runs each
family's policy over loopback DDS.
"""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.vlm.random_folder import write_random_vlm
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.torch_engine import TorchEngine

from test_decoding_parity import UncachedEngine  # the reference: masks/positions from the training rules

E2E = ['paligemma-tiny', 'smolvlm-tiny', 'qwen2_5_vl-tiny']
ALL = ['paligemma-tiny', 'paligemma2-tiny', 'smolvlm-tiny', 'idefics3-tiny', 'qwen2_vl-tiny', 'qwen2_5_vl-tiny']
NAMES = ['j0', 'j1', 'j2']


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp('vlm_folders')
    return {s: write_random_vlm(root / s, s, seed=2) for s in ALL}


def model_config(shape, folder, **kw) -> dict:
    cfg = dict(vlm_path=str(folder), text_tokenizer='auto', max_text_tokens=16, action_dim=3, chunk_len=4,
               block_size=3, steps_per_block=3, state_dim=2, n_bins=32, action_names=NAMES,
               attn_implementation='eager' if shape == 'paligemma2-tiny' else 'sdpa')
    if shape.startswith('qwen'):
        cfg['vlm_image_size'] = [56, 56]
    cfg.update(kw)
    return cfg


@pytest.fixture(scope='module')
def trained(vlms, tmp_path_factory):
    """{shape: (TrainResult, ExportReport)}; policy folders under <root>/models/<shape>."""
    from blockvla_ros.export.policy_writer import export_policy
    from blockvla_ros.tasks.recording import record_demonstrations
    from blockvla_ros.training.config import TrainConfig
    from blockvla_ros.training.trainer import train

    root = tmp_path_factory.mktemp('vlm_runs')
    record_demonstrations(root / 'bags', tasks=['touch_red', 'touch_blue'], episodes_per_task=2, seed=0,
                          progress=False)
    out = {}
    for shape in E2E:
        cfg = TrainConfig.from_dict({
            'model': model_config(shape, vlms[shape], state_dim=0),  # no joint states: the node test has none
            'data': {'bags': [str(root / 'bags')], 'val_fraction': 0.3},
            'train': dict(mode='blockdiff', steps=20, batch_size=4, lr=3e-3, warmup_steps=3, log_interval=5,
                          eval_interval=20, save_interval=20, out_dir=str(root / 'runs' / shape), progress=False,
                          eval_decode_samples=1, lora={'enabled': True})})
        result = train(cfg)
        report = export_policy(result.checkpoint, root / 'models' / shape, parity_samples=2, threads=1,
                               progress=False)
        out[shape] = (result, report)
    return out


@pytest.mark.parametrize('shape', E2E)
def test_trains_exports_and_onnx_runtime_matches_torch(trained, vlms, shape):
    result, report = trained[shape]
    assert result.step == 20 and np.isfinite(result.train_loss)
    decoders = set()
    for r in report.parity:
        assert r['tokens_equal'] and r['max_abs_diff'] <= 1e-3, r
        decoders |= set(r['decoders'])
    assert decoders >= {'blockdiff', 'ar', 'fulldiff'}
    assert 'tokenizer.json' in report.files and 'vision.onnx' in report.files
    # the vision tower stayed as pretrained (frozen); LoRA and the connector trained
    ckpt = f'{result.checkpoint}/model.safetensors'
    with safe_open(ckpt, 'pt') as trained_w, safe_open(f'{vlms[shape]}/model.safetensors', 'pt') as base:
        names = {k for k in base.keys()}
        tower = [k for k in trained_w.keys() if k.startswith('vision.tower.')]
        assert tower
        for k in tower[:8]:
            hf_name = next(n for n in names if n.endswith(k[len('vision.tower.'):]))
            assert torch.equal(trained_w.get_tensor(k), base.get_tensor(hf_name)), k


@pytest.mark.parametrize('shape', ALL)
def test_cached_decoding_matches_uncached(vlms, shape):
    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.config import BlockVLAConfig
    from blockvla_ros.runtime.runner import build_preprocessor

    torch.manual_seed(0)
    policy = BlockVLAPolicy(BlockVLAConfig(**model_config(shape, vlms[shape], schedule='fixed'))).eval()
    config = policy.config
    stats = NormStats([-1.0] * 3, [1.0] * 3, [-1.0, -1.0], [1.0, 1.0])
    pre = build_preprocessor(config, stats, vlms[shape])
    rng = np.random.default_rng(1)
    prefix = pre(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), 'put the green bowl on the plate',
                 rng.uniform(-1, 1, 2))
    for decoder in ('blockdiff', 'ar', 'fulldiff'):
        cached = Decoder(config, decoder)(TorchEngine(policy), prefix, trace=True)
        ref = Decoder(config, decoder)(UncachedEngine(policy, 1 if decoder == 'ar' else config.block_size), prefix,
                                       trace=True)
        assert cached.calls == ref.calls and cached.nfe == ref.nfe
        diff = max(float(np.abs(a[2] - b[2]).max(initial=0.0)) for a, b in zip(cached.trace, ref.trace))
        assert diff <= 1e-4, f'{shape}/{decoder}: cached vs uncached logits differ by {diff}'
        assert np.array_equal(cached.tokens, ref.tokens)


def test_checkpoint_config_is_portable_and_a_wrong_family_is_named(vlms, tmp_path):
    from blockvla_ros.model.config import BlockVLAConfig

    policy = BlockVLAPolicy(BlockVLAConfig(**model_config('smolvlm-tiny', vlms['smolvlm-tiny'])))
    policy.save(tmp_path / 'ckpt')
    config = BlockVLAConfig.load(tmp_path / 'ckpt' / 'config.json')
    assert config.vlm_path is None and config.vlm['model_type'] == 'smolvlm' and config.vlm_layout
    again = BlockVLAPolicy.load(tmp_path / 'ckpt')  # no folder needed: config dict + resolved layout/processor
    assert again.config.prefix_len == policy.config.prefix_len
    with pytest.raises(ValueError, match='not supported'):
        BlockVLAPolicy(BlockVLAConfig(vlm={'model_type': 'llava'}, text_tokenizer='byte'))


@pytest.mark.ros
@pytest.mark.slow
def test_the_node_runs_each_family_over_loopback(trained):
    rclpy = pytest.importorskip('rclpy')
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from blockvla_ros.ros.policy_node import PolicyNode
    from ros_spin import Spinner
    from test_ros_policy_node import Peer, Transition, policy_action

    models = str(next(iter(trained.values()))[1].folder.parent)
    context = rclpy.Context()
    rclpy.init(context=context)
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter('policy', value=E2E[0]), Parameter('policy_dirs', value=[models]),
        Parameter('control_rate_hz', value=20.0), Parameter('max_image_age_s', value=2.0),
        Parameter('diagnostics_period_s', value=0.2), Parameter('warmup_runs', value=1),
        Parameter('threads', value=1)])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = Spinner(executor)
    peer = Peer(context)
    try:
        assert peer.transition(Transition.TRANSITION_CONFIGURE)
        assert peer.transition(Transition.TRANSITION_ACTIVATE)
        peer.make_frame = peer.good_raw
        peer.say('touch the red circle')
        for shape in E2E:
            if shape != E2E[0]:
                assert peer.set_param('policy', shape).successful
                peer.wait_diag(lambda d, s=shape: d.get('policy') == s, timeout=60)
            bounds = json.loads((trained[shape][1].folder / 'stats.json').read_text())
            low, high = min(bounds['action_low']), max(bounds['action_high'])
            peer.wait_actions(policy_action(low - 1e-6, high + 1e-6), mark=peer.mark(), timeout=60)
    finally:
        peer.close()
        spinner.stop()
        node.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_vlm_config_errors_name_the_setting():
    from blockvla_ros.model.config import BlockVLAConfig

    with pytest.raises(ValueError, match='vlm_image_size'):
        BlockVLAConfig(vlm_path='/x', text_tokenizer='auto', vlm_image_size=[56])
    with pytest.raises(ValueError, match='not both'):
        BlockVLAConfig(vlm_path='/x', backbone_path='/y')
    with pytest.raises(ValueError, match="text_tokenizer 'byte'"):
        BlockVLAConfig(vlm={'model_type': 'smolvlm'}, text_tokenizer='auto')
    with pytest.raises(ValueError, match='resolved when the policy is built'):
        BlockVLAConfig(vlm={'model_type': 'smolvlm'}).prefix_len
    with pytest.raises(ValueError, match='belong to a VLM'):
        BlockVLAConfig(vlm_layout={'segments': []}, vlm_processor={})


def test_a_broken_saved_layout_is_a_config_error(vlms):
    from blockvla_ros.model.config import BlockVLAConfig

    config = BlockVLAPolicy(BlockVLAConfig(**model_config('qwen2_vl-tiny', vlms['qwen2_vl-tiny']))).config
    for bad in ({'segments': [{'name': 'x'}]}, {**config.vlm_layout, 'rope_dims': 2}, {'unknown': 1}):
        with pytest.raises(ValueError, match='vlm_layout'):
            config.replace(vlm_layout=bad)
    with pytest.raises(ValueError, match='vlm_layout / vlm_processor'):
        config.replace(vlm_processor={**config.vlm_processor, 'grid_hw': [55, 56]})
    with pytest.raises(ValueError, match='instruction slot'):
        config.replace(max_text_tokens=17)


@pytest.mark.parametrize('shape', ['paligemma-tiny', 'smolvlm-tiny', 'qwen2_vl-tiny'])
def test_the_vision_tower_is_frozen_by_config_and_the_connector_trains(vlms, shape):
    from blockvla_ros.model.config import BlockVLAConfig

    policy = BlockVLAPolicy(BlockVLAConfig(**model_config(shape, vlms[shape])))
    trainable = {n for n, p in policy.vision.named_parameters() if p.requires_grad}
    connector = {'paligemma-tiny': 'connector.', 'smolvlm-tiny': 'connector.', 'qwen2_vl-tiny': 'tower.merger.'}[shape]
    assert trainable and all(n.startswith(connector) for n in trainable)
    assert all(p.requires_grad for n, p in policy.vision.named_parameters() if n.startswith(connector))
    thawed = BlockVLAPolicy(BlockVLAConfig(**model_config(shape, vlms[shape], vlm_freeze_vision=False)))
    assert all(p.requires_grad for p in thawed.vision.parameters())


@pytest.mark.slow
def test_real_size_benchmark_runs_a_vlm_shape(tmp_path):
    """benchmarks/real_size.py on a whole VLM (the tiny SmolVLM; README has the SmolVLM2-256M figures)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / 'rs.json'
    cmd = [sys.executable, str(root / 'benchmarks' / 'real_size.py'), '--shape', 'smolvlm-tiny', '--json', str(out),
           '--runs', '2', '--observations', '2', '--threads', '1']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    fp32 = data['precisions']['fp32']
    assert fp32['token_agreement'] == 1.0 and fp32['ms_per_chunk_1t'] > 0 and data['folder_over_weights'] > 0
    assert data['policy']['text_tokenizer'] == 'auto'
