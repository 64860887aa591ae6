"""Meta-World through this package: the env wrapper's fixed render settings, expert recordings that training
reads unchanged, the closed-loop evaluation and its report, the CLI's errors, and one short episode through the
sim bridge node + the real policy node over loopback DDS. Skipped without the sim extra (the reason says how)."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault('MUJOCO_GL', 'egl')
try:
    import metaworld  # noqa: F401
    import mujoco
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip("Meta-World tests need the sim extra: pip install '.[sim]' (or make setup-sim; apt-get install "
                'libegl1 libegl-mesa0 libgl1-mesa-dri)', allow_module_level=True)

from blockvla_ros.sim.env import MetaWorldEnv  # noqa: E402
from blockvla_ros.sim.suites import (ACTION_NAMES, INSTRUCTIONS, STATE_NAMES, SUITES, resolve_suite,  # noqa: E402
                                     vocabulary)


@pytest.fixture(scope='module')
def reach():
    env = MetaWorldEnv('reach-v3', seed=0)
    yield env
    env.close()


def test_render_settings_are_fixed_and_the_corner_camera_upright(reach):
    vis = reach._env.model.vis.quality
    assert (vis.shadowsize, vis.offsamples) == (1, 0)
    flags = reach._renderer._renderer.scene.flags
    for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
        assert flags[flag] == 0
    obs = reach.reset(0)
    assert obs.image.shape == (64, 64, 3) and obs.image.dtype == np.uint8
    raw = reach._renderer._renderer
    raw.update_scene(reach._env.data, camera='corner')
    assert np.array_equal(obs.image, raw.render()[::-1, ::-1])          # turned 180 degrees
    # upright: the table (lit, brown/grey) fills the lower half, the black background the top rows
    assert obs.image[:8].mean() < obs.image[40:].mean()


def test_layouts_are_seeded_and_the_expert_succeeds(reach):
    a, b = reach.reset(3).state, reach._env._target_pos.copy()
    reach.reset(4)
    assert not np.allclose(b, reach._env._target_pos)
    assert np.allclose(reach.reset(3).state, a) and np.allclose(b, reach._env._target_pos)
    other = MetaWorldEnv('reach-v3', seed=1)
    other.reset(3)
    assert not np.allclose(other._env._target_pos, b)                   # seed 1 layouts differ from seed 0's
    other.close()
    obs, done = reach.reset(0), False
    assert obs.instruction in INSTRUCTIONS['reach-v3'] and obs.state.shape == (len(STATE_NAMES),)
    while not done:
        obs, done, success = reach.step(reach.expert_action(), render=False)
    assert success and reach.steps < 200
    with pytest.raises(RuntimeError, match='over'):
        reach.step(np.zeros(4))


def test_bad_input_is_refused_with_the_reason(reach):
    reach.reset(0)
    with pytest.raises(ValueError, match='4 values'):
        reach.step(np.zeros(3))
    with pytest.raises(ValueError, match='non-finite'):
        reach.step(np.array([0, np.nan, 0, 0]))
    with pytest.raises(ValueError, match='unknown task'):
        MetaWorldEnv('fly-v3')
    with pytest.raises(ValueError, match='unknown suite'):
        resolve_suite('mt50')
    assert resolve_suite('mt10', ['push']) == ['push-v3'] and len(SUITES['mt10']) == 10
    assert {'door', 'drawer', 'window', 'peg', 'puck'} <= set(vocabulary())


def test_recording_is_what_training_reads(tmp_path):
    from blockvla_ros.io.bag_reader import TopicMap, read_episodes
    from blockvla_ros.sim.recording import record_suite

    result = record_suite(tmp_path / 'bags', tasks=['reach'], episodes_per_task=1, seed=0, progress=False)
    assert result['recorded'] == 1 and result['per_task']['reach-v3']['recorded'] == 1
    bag = result['paths'][0]
    [ep] = read_episodes(bag, TopicMap(state='/joint_states'), rate_hz=80.0, action_dim=4, state_dim=4)
    assert ep.instruction in INSTRUCTIONS['reach-v3']
    assert ep.action_names == ACTION_NAMES and ep.state_names == STATE_NAMES
    assert len(ep) == result['per_task']['reach-v3']['mean_steps'] and ep.images.shape[1:] == (64, 64, 3)
    assert np.all(np.diff(ep.stamps_ns) == 12_500_000)
    assert np.all(np.abs(ep.actions) <= 1.0)
    with pytest.raises(FileExistsError, match='already exist'):
        record_suite(tmp_path / 'bags', tasks=['reach'], episodes_per_task=1, seed=0, progress=False)


@pytest.fixture(scope='module')
def tiny_mt10_policy(tmp_path_factory):
    """A tiny random policy with Meta-World's action and state names, exported to ONNX."""
    import torch

    from blockvla_ros.export.policy_writer import export_policy
    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.policy import BlockVLAPolicy
    from tiny import tiny_config

    root = tmp_path_factory.mktemp('mt10_policy')
    torch.manual_seed(0)
    config = tiny_config(action_dim=4, state_dim=4, block_size=4, chunk_len=8, action_names=ACTION_NAMES,
                         state_names=STATE_NAMES)
    BlockVLAPolicy(config).save(root / 'ckpt')
    rng = np.random.default_rng(0)
    NormStats.from_data(rng.uniform(-1, 1, (200, 4)), rng.uniform(0, 1, (200, 4))).save(root / 'ckpt/stats.json')
    export_policy(root / 'ckpt', root / 'models' / 'tiny_mt10', parity_samples=1, threads=1, progress=False)
    return root / 'models' / 'tiny_mt10'


def test_fast_path_evaluation_writes_the_report(tiny_mt10_policy, tmp_path):
    from blockvla_ros.sim.evaluate import evaluate_policy_folder

    out = tmp_path / 'report'
    result = evaluate_policy_folder(tiny_mt10_policy, out, tasks=['reach', 'drawer-close'], episodes=2, seed=1,
                                    max_steps=12, progress=False)
    saved = json.loads((out / 'report.json').read_text())
    assert saved['per_task']['reach-v3']['episodes'] == 2 and saved['path'] == 'policy_runner'
    assert set(saved['expert']) == {'reach-v3', 'drawer-close-v3'}
    assert all(d['steps'] <= 12 for r in saved['per_task'].values() for d in r['episodes_detail'])
    assert result['success_rate'] == np.mean([r['success_rate'] for r in saved['per_task'].values()])
    assert '| reach-v3 |' in (out / 'report.md').read_text()
    import cv2
    montage = cv2.imread(str(out / 'montage.png'))
    assert montage.shape[0] > 2 * 128 and montage.shape[1] >= 128   # two task rows of 2x-scaled frames
    # two processes, one task each: the same episodes, the same outcomes
    split = evaluate_policy_folder(tiny_mt10_policy, tmp_path / 'jobs', tasks=['reach', 'drawer-close'], episodes=2,
                                   seed=1, max_steps=12, expert=False, progress=False, jobs=2)
    assert split['per_task'] == saved['per_task'] and list(split['per_task']) == ['reach-v3', 'drawer-close-v3']
    # without the montage's frames (benchmarks/convergence.py): episode 0 renders less, the outcomes are the same
    from blockvla_ros.runtime.runner import PolicyRunner
    from blockvla_ros.sim.evaluate import evaluate_suite, runner_predictor
    bare = evaluate_suite(runner_predictor(PolicyRunner.load(tiny_mt10_policy, threads=1)), 'mt10',
                          ['reach', 'drawer-close'], 2, 1, max_steps=12, progress=False, frames=False)
    assert bare['frames'] == {} and bare['per_task'] == saved['per_task']


def test_cli_names_the_problem(tiny_mt10_policy, capsys):
    from blockvla_ros.sim.cli import main

    assert main(['evaluate', '--policy', str(tiny_mt10_policy), '--tasks', 'fly', '--episodes', '1']) == 2
    assert 'unknown task' in capsys.readouterr().err
    assert main(['evaluate', '--policy', str(tiny_mt10_policy), '--episodes', '0']) == 2
    assert 'episodes must be a positive int' in capsys.readouterr().err


@pytest.mark.ros
@pytest.mark.slow
def test_one_episode_through_the_sim_bridge_and_the_real_policy_node(tiny_mt10_policy, tmp_path):
    """Bridge (sim time on /clock, camera, joint_states, instruction) -> real policy node (ONNX Runtime) ->
    `action` -> physics, as processes over loopback DDS."""
    pytest.importorskip('rclpy')
    from blockvla_ros.sim.evaluate import evaluate_policy_folder

    result = evaluate_policy_folder(tiny_mt10_policy, tmp_path / 'ros', tasks=['reach'], episodes=1, seed=1,
                                    max_steps=40, via_ros=True, real_time_factor=0.25, expert=False,
                                    progress=False)
    [r] = result['per_task']['reach-v3']['episodes_detail']
    assert r['steps'] == 40 and result['path'] == 'ros' and result['actions_rejected'] == 0
    # the node acted: most steps applied a policy action, not a hold (it holds only until its first chunk)
    assert result['per_task']['reach-v3']['holds'] < 30
    assert (tmp_path / 'ros' / 'montage.png').is_file()
