"""The tabletop benchmark: rules, rendering, determinism, expert, closed-loop evaluation, recording, CLI."""
import numpy as np
import pytest
import yaml
from rosbags.highlevel import AnyReader

from blockvla_ros.tasks.cli import main as task_cli
from blockvla_ros.tasks.evaluate import evaluate_closed_loop, random_policy_success
from blockvla_ros.tasks.expert import ScriptedExpert, expert_rollout
from blockvla_ros.io.episode_recording import RECORDING_START_NS, bag_name
from blockvla_ros.tasks.recording import record_demonstrations
from blockvla_ros.tasks.spec import (ACTION_HIGH, ACTION_LOW, ACTION_NAMES, COLOR_RGB, COLORS, MAX_STEP,
                                     STATE_NAMES, TASKS, TaskSpec, get_task)
from blockvla_ros.tasks.tabletop import TabletopEnv, episode_seed


def _rollout_images(task, seed, image_size=64):
    env = TabletopEnv(task, seed, image_size=image_size)
    return [obs.image for obs, _ in expert_rollout(env)], env


# --- an image-only oracle: proves the task is solvable from (image, instruction, state) without memory ----
def _colour_centres(image):
    """Table (x, y) of each colour's pixel centroid, and whether a white ring surrounds it."""
    size = image.shape[0]
    found = {}
    white = np.all(image >= 245, axis=-1)                                    # [H, W]
    rows, cols = np.nonzero(white)
    for colour in COLORS:
        diff = np.abs(image.astype(int) - np.array(COLOR_RGB[colour])).sum(-1)   # [H, W]
        r, c = np.nonzero(diff < 60)
        if len(r) == 0:
            continue
        cr, cc = r.mean(), c.mean()
        ringed = bool(np.any(np.hypot(rows - cr, cols - cc) < 0.1 * size))
        found[colour] = (np.array([(cc + 0.5) / (size / 2) - 1, 1 - (cr + 0.5) / (size / 2)]), ringed)
    return found


def _image_oracle(horizon):
    def predict(image, instruction, state):
        order = sorted((instruction.find(c), c) for c in COLORS if c in instruction)
        found = _colour_centres(image)
        pending = [c for _, c in order if c in found and not found[c][1]]
        chunk = np.zeros((horizon, 3), dtype=np.float32)
        if not pending:
            return chunk
        target, ee = found[pending[0]][0], state.astype(np.float64)
        for k in range(horizon):
            delta = target - ee
            dist = np.linalg.norm(delta)
            if dist <= MAX_STEP:
                chunk[k] = [*(delta / MAX_STEP), 1.0]
                break   # the rest holds still: the next target needs a new look
            chunk[k, :2] = delta / dist
            ee = ee + delta / dist * MAX_STEP
        return chunk
    return predict


# --- spec -------------------------------------------------------------------------------------------------
def test_registry_layout_and_paraphrases():
    assert ACTION_NAMES == ['ee_dx', 'ee_dy', 'gripper'] and STATE_NAMES == ['ee_x', 'ee_y']
    assert ACTION_LOW.shape == ACTION_HIGH.shape == (3,) and np.all(ACTION_LOW < ACTION_HIGH)
    assert {f'touch_{c}' for c in COLORS} <= set(TASKS)
    assert any(len(s.targets) >= 2 for s in TASKS.values())
    for spec in TASKS.values():
        texts = spec.instructions({c: 'circle' for c in COLORS})
        assert len(set(texts)) >= 3, spec.name
        for text in texts:   # every paraphrase names the targets in order
            positions = [text.find(c) for c in spec.targets]
            assert min(positions) >= 0 and positions == sorted(positions), text


def test_unknown_task_and_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="unknown task 'touch_purple'.*touch_red"):
        TabletopEnv('touch_purple', 0)
    with pytest.raises(ValueError, match='unknown colours'):
        TaskSpec('x', ('purple',))
    with pytest.raises(ValueError, match='twice'):
        TaskSpec('x', ('red', 'red'))
    with pytest.raises(ValueError, match='seed'):
        TabletopEnv('touch_red', -1)
    with pytest.raises(ValueError, match='image_size'):
        TabletopEnv('touch_red', 0, image_size=4)


# --- environment ------------------------------------------------------------------------------------------
def test_observation_format_and_configurable_size():
    for size in (64, 96):
        obs = TabletopEnv('touch_blue_then_red', 3, image_size=size).reset()
        assert obs.image.shape == (size, size, 3) and obs.image.dtype == np.uint8
        assert obs.state.shape == (2,) and obs.state.dtype == np.float32
        assert np.all(np.abs(obs.state) <= 1)
        assert 'blue' in obs.instruction and 'red' in obs.instruction
        assert len(np.unique(obs.image.reshape(-1, 3), axis=0)) > 5   # objects and effector are drawn


def test_same_seed_same_episode_other_seed_other_episode():
    a, env_a = _rollout_images('touch_green_then_yellow', 11)
    b, env_b = _rollout_images('touch_green_then_yellow', 11)
    c, _ = _rollout_images('touch_green_then_yellow', 12)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert env_a.instruction == env_b.instruction
    assert not np.array_equal(a[0], c[0])
    env = TabletopEnv('touch_red', 5)
    first = env.reset().image
    env.step([1, 0, 0])
    assert np.array_equal(env.reset().image, first)     # reset restarts the same episode
    assert episode_seed(0, 'touch_red', 0, 'train') == episode_seed(0, 'touch_red', 0, 'train')
    assert episode_seed(0, 'touch_red', 0, 'train') != episode_seed(0, 'touch_red', 0, 'eval')


def test_touch_marks_progress_visibly_and_wrong_order_fails():
    env = TabletopEnv('touch_red_then_blue', 7)
    env.reset()
    expert = ScriptedExpert()
    while not env.touched:
        before = env.observation().image
        obs, done, success = env.step(expert.act(env))
    assert not done and not success and env.objects[env.touched[0]].color == 'red'
    # the ring appears: new near-white pixels around the red object
    white = lambda img: np.all(img >= 240, axis=-1).sum()  # noqa: E731
    assert white(obs.image) > white(before) + 5
    # pressing on the touched object again, or on empty table, changes nothing
    env.step([0, 0, 1])
    assert not env.done and len(env.touched) == 1
    # press on yellow (not the next target): failure
    yellow = next(o for o in env.objects if o.color == 'yellow')
    while np.linalg.norm(np.asarray(yellow.xy) - env.ee) > MAX_STEP:
        d = np.asarray(yellow.xy) - env.ee
        env.step([*(d / np.linalg.norm(d)), 0])
    obs, done, success = env.step([*((np.asarray(yellow.xy) - env.ee) / MAX_STEP), 1])
    assert done and not success and 'yellow' in env.failure and 'blue' in env.failure


def test_timeout_and_bad_actions():
    env = TabletopEnv('touch_red', 0, max_steps=5)
    with pytest.raises(RuntimeError, match='reset'):
        env.step([0, 0, 0])
    env.reset()
    with pytest.raises(ValueError, match=r'shape \(3,\).*got shape \(2,\)'):
        env.step([0.1, 0.2])
    with pytest.raises(ValueError, match='non-finite'):
        env.step([np.nan, 0, 0])
    for k in range(5):
        _, done, success = env.step([0, 0, 0])
    assert done and not success and 'timeout' in env.failure and env.steps == 5
    with pytest.raises(RuntimeError, match='over'):
        env.step([0, 0, 0])
    with pytest.raises(ValueError, match='max_steps'):
        TabletopEnv('touch_red', 0, max_steps=0)


# --- expert -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('noise', [0.0, 0.3])
def test_expert_succeeds_on_every_task(noise):
    for name in TASKS:
        for ep in range(15):
            env = TabletopEnv(name, episode_seed(0, name, ep, 'train'))
            steps = sum(1 for _ in expert_rollout(env, ScriptedExpert(noise, seed=ep)))
            assert env.success, (name, ep, env.failure)
            assert steps == env.steps < env.max_steps


def test_intended_labels_are_the_noise_free_expert_on_the_same_rollout():
    """DART labels: the same noisy rollout (same states), but each label is the expert's noise-free action there."""
    env_a, env_b = (TabletopEnv('touch_red_then_blue', episode_seed(0, 'touch_red_then_blue', 2, 'train'))
                    for _ in range(2))
    executed = list(expert_rollout(env_a, ScriptedExpert(0.3, seed=5)))
    intended = list(expert_rollout(env_b, ScriptedExpert(0.3, seed=5), labels='intended'))
    assert env_a.success and env_b.success and len(executed) == len(intended)
    differ = 0
    for (obs_e, act_e), (obs_i, act_i) in zip(executed, intended):
        assert np.array_equal(obs_e.image, obs_i.image) and np.allclose(obs_e.state, obs_i.state)
        differ += int(not np.allclose(act_e, act_i))
        assert np.isclose(np.hypot(*act_i[:2]), 1.0, atol=1e-5) or act_i[2] == 1.0  # unit heading or the final touch
    assert differ > len(executed) // 2  # the noise moved most executed actions away from the label
    with pytest.raises(ValueError, match='labels'):
        next(expert_rollout(env_a, labels='noisy'))


def test_intended_labels_repeat_the_previous_tick_far_more_often_than_executed_ones():
    """Why expert.py warns about intended labels: a direction token (32 bins over [-1, 1]) equals the previous
    tick's most of the time, so block-diffusion training can predict a masked token by copying its neighbour."""
    def repeat_rate(labels):
        same = []
        for name in TASKS:
            for ep in range(3):
                env = TabletopEnv(name, episode_seed(0, name, ep, 'train'))
                acts = np.array([a for _obs, a in expert_rollout(env, ScriptedExpert(0.1, seed=ep), labels)])
                tokens = np.clip(np.floor((acts[:, :2] + 1) / 2 * 32), 0, 31)  # [T, 2] dx, dy bins
                same.append(tokens[1:] == tokens[:-1])
        return float(np.concatenate(same).mean())

    intended, executed = repeat_rate('intended'), repeat_rate('executed')
    assert intended > 0.6 and executed < 0.4, (intended, executed)


# --- closed-loop evaluation -------------------------------------------------------------------------------
def test_image_only_policy_succeeds_and_random_policy_does_not():
    oracle = evaluate_closed_loop(_image_oracle(4), episodes_per_task=3, seed=1, progress=False)
    rand = random_policy_success(episodes_per_task=3, seed=1)
    assert set(oracle['per_task']) == set(TASKS) and oracle['episodes'] == 3 * len(TASKS)
    assert oracle['success_rate'] >= 0.9, oracle['per_task']
    assert rand['episodes'] == oracle['episodes']
    assert rand['success_rate'] <= 0.2 and rand['success_rate'] < oracle['success_rate'] - 0.5
    assert 0 <= oracle['successes'] <= oracle['episodes']


def test_execute_steps_controls_how_often_the_policy_is_asked():
    tasks = ['touch_red', 'touch_blue_then_red']
    full = evaluate_closed_loop(_image_oracle(4), tasks, episodes_per_task=2, progress=False)
    one = evaluate_closed_loop(_image_oracle(4), tasks, episodes_per_task=2, execute_steps=1, progress=False)
    assert one['success_rate'] == full['success_rate'] == 1.0
    total_steps = sum(r['mean_steps'] * r['episodes'] for r in one['per_task'].values())
    assert one['policy_calls'] == total_steps
    assert full['policy_calls'] < one['policy_calls'] / 2


def test_evaluation_rejects_bad_chunks_and_settings():
    with pytest.raises(ValueError, match=r"shape \(3,\) on task 'touch_red'"):
        evaluate_closed_loop(lambda i, t, s: np.zeros(3), ['touch_red'], 1, progress=False)
    with pytest.raises(ValueError, match=r'shape \(4, 2\)'):
        evaluate_closed_loop(lambda i, t, s: np.zeros((4, 2)), ['touch_red'], 1, progress=False)
    with pytest.raises(ValueError, match='non-finite'):
        evaluate_closed_loop(lambda i, t, s: np.full((1, 3), np.inf), ['touch_red'], 1, progress=False)
    with pytest.raises(ValueError, match='unknown task'):
        evaluate_closed_loop(_image_oracle(1), ['touch_nothing'], 1, progress=False)
    with pytest.raises(ValueError, match='execute_steps'):
        evaluate_closed_loop(_image_oracle(1), ['touch_red'], 1, execute_steps=0, progress=False)


# --- recording --------------------------------------------------------------------------------------------
def _read(path):
    out = {}
    with AnyReader([path]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype)))
    custom = yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']['custom_data']
    return types, out, custom


def _raw_messages(path):
    with AnyReader([path]) as reader:
        return [(conn.topic, t, bytes(raw)) for conn, t, raw in reader.messages()]


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_recorded_demonstrations_match_the_expert(tmp_path, storage):
    tasks = ['touch_green', 'touch_red_green_blue']
    paths = record_demonstrations(tmp_path, tasks, episodes_per_task=1, seed=3, rate_hz=5, storage=storage,
                                  progress=False)
    assert [p.name for p in paths] == [bag_name(t, 3, 0) for t in tasks]
    for path, task in zip(paths, tasks):
        env = TabletopEnv(task, episode_seed(3, task, 0, 'train'))
        expected = list(expert_rollout(env))
        types, msgs, custom = _read(path)
        assert types == {'/camera/image_raw': 'sensor_msgs/msg/Image', '/instruction': 'std_msgs/msg/String',
                         '/joint_states': 'sensor_msgs/msg/JointState',
                         '/joint_command': 'trajectory_msgs/msg/JointTrajectory'}
        n = len(expected)
        assert [len(msgs[t]) for t in ('/camera/image_raw', '/joint_states', '/joint_command')] == [n, n, n]
        stamps = [RECORDING_START_NS + k * 200_000_000 for k in range(n)]
        for topic in ('/camera/image_raw', '/joint_states', '/joint_command'):
            assert [t for t, _ in msgs[topic]] == stamps      # receive time = stamp, same for obs and action
            assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, m in msgs[topic]] == stamps
        # instruction at the start and once per second (every 5 ticks at 5 Hz)
        assert [t for t, _ in msgs['/instruction']] == stamps[::5]
        assert {m.data for _, m in msgs['/instruction']} == {env.instruction}
        streams = (msgs['/camera/image_raw'], msgs['/joint_states'], msgs['/joint_command'])
        for (obs, action), (_, img), (_, st), (_, act) in zip(expected, *streams):
            assert np.array_equal(img.data.reshape(img.height, img.width, 3), obs.image)
            assert list(st.name) == STATE_NAMES and np.allclose(st.position, obs.state)
            assert list(act.joint_names) == ACTION_NAMES and np.allclose(act.points[0].positions, action)
        assert custom['blockvla.task'] == task and custom['blockvla.success'] == 'True'
        assert int(custom['blockvla.steps']) == n


def test_recording_is_deterministic_and_refuses_existing_bags(tmp_path):
    kw = dict(tasks=['touch_yellow'], episodes_per_task=2, seed=0, image_format='png', progress=False)
    a = record_demonstrations(tmp_path / 'a', **kw)
    b = record_demonstrations(tmp_path / 'b', **kw)
    for pa, pb in zip(a, b):
        _, msgs, _ = _read(pa)
        assert msgs['/camera/image_raw/compressed'][0][1].format == 'rgb8; png compressed bgr8'
        assert _raw_messages(pa) == _raw_messages(pb)   # byte-identical, same stamps
    assert _raw_messages(a[0]) != _raw_messages(a[1])
    with pytest.raises(FileExistsError, match='touch_yellow_seed0_ep0000'):
        record_demonstrations(tmp_path / 'a', **kw)
    with pytest.raises(ValueError, match='rate_hz'):
        record_demonstrations(tmp_path / 'c', ['touch_red'], 1, rate_hz=0, progress=False)
    assert not (tmp_path / 'c').exists() or not any((tmp_path / 'c').iterdir())


def test_cli_record_random_baseline_and_errors(tmp_path, capsys):
    assert task_cli(['record', '--out', str(tmp_path / 'bags'), '--episodes', '1', '--tasks', 'touch_red',
                     '--storage', 'sqlite3', '--image-format', 'jpeg']) == 0
    bag = tmp_path / 'bags' / bag_name('touch_red', 0, 0)
    types, _, _ = _read(bag)
    assert types['/camera/image_raw/compressed'] == 'sensor_msgs/msg/CompressedImage'
    assert any(bag.glob('*.db3'))
    assert task_cli(['random-baseline', '--episodes', '2', '--tasks', 'touch_red', 'touch_blue']) == 0
    out = capsys.readouterr().out
    assert 'touch_blue' in out and 'overall' in out
    assert task_cli(['record', '--out', str(tmp_path / 'x'), '--tasks', 'touch_mauve']) == 2
    assert 'unknown task' in capsys.readouterr().err
    assert get_task('touch_red').targets == ('red',)
