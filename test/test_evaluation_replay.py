"""blockvla-replay end to end on bags the test records (mcap + sqlite3, raw + compressed images, every action
message type) with a tiny random policy exported to a real policy folder and run on ONNX Runtime.

The report's numbers are checked against values computed here independently: the bag is read with rosbags
directly, images decoded with OpenCV, the runner called at the same ticks, errors computed with plain numpy.
"""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import Reader, Writer
from rosbags.typesys import Stores, get_typestore

from blockvla_ros.evaluation import cli
from blockvla_ros.tasks.recording import record_demonstrations
from blockvla_ros.tasks.spec import ACTION_NAMES, STATE_NAMES

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # the session fixture records bags and exports a policy (~30 s)

H, D, EXECUTE = 4, 3, 2
COMBOS = [('mcap', 'raw', 'JointTrajectory'), ('sqlite3', 'jpeg', 'JointState'),
          ('mcap', 'png', 'Float32MultiArray'), ('sqlite3', 'raw', 'JointTrajectory')]


@pytest.fixture(scope='session')
def bags(tmp_path_factory):
    """One recorded tabletop episode per (storage, image format, action message) combination."""
    root = tmp_path_factory.mktemp('bags')
    out = {}
    for i, (storage, image_format, action_msg) in enumerate(COMBOS):
        [path] = record_demonstrations(root / f'{storage}_{image_format}_{action_msg}', tasks=['touch_red'],
                                       episodes_per_task=1, seed=i, storage=storage, image_format=image_format,
                                       action_msg=action_msg, progress=False)
        out[(storage, image_format, action_msg)] = path
    return out


@pytest.fixture(scope='session')
def policy_dir(tmp_path_factory, bags):
    """models/tiny: a random tiny BlockVLA (64 px, patch 16, D=3, S=2, H=4) exported with stats from the bags."""
    import torch

    from blockvla_ros.export.policy_writer import export_policy
    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.policy import BlockVLAPolicy

    root = tmp_path_factory.mktemp('policies')
    actions, states = [], []
    for path in bags.values():
        rec = _read_bag(path)
        actions.append(rec['actions'])
        states.append(rec['states'])
    cfg = tiny_config(state_dim=2, image_size=64, chunk_len=H, block_size=3, action_names=ACTION_NAMES,
                      state_names=STATE_NAMES, control_rate_hz=10.0)  # the bags' rate: replay's default
    torch.manual_seed(0)
    BlockVLAPolicy(cfg).save(root / 'ckpt')
    NormStats.from_data(np.concatenate(actions), np.concatenate(states)).save(root / 'ckpt' / 'stats.json')
    export_policy(root / 'ckpt', root / 'models' / 'tiny', parity_samples=1, progress=False)
    return root / 'models'


def _read_bag(path):
    """Independent reader: per-tick image (RGB), state, action, instruction, straight from rosbags."""
    by_topic = {}
    with AnyReader([path]) as reader:
        for conn, t, raw in reader.messages():
            by_topic.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype), conn.msgtype))
    images = []
    for _, msg, msgtype in sorted(by_topic.get('/camera/image_raw', []) +
                                  by_topic.get('/camera/image_raw/compressed', []), key=lambda x: x[0]):
        if msgtype.endswith('/Image'):
            images.append(np.asarray(msg.data, np.uint8).reshape(msg.height, msg.width, 3))
        else:
            images.append(cv2.cvtColor(cv2.imdecode(np.asarray(msg.data, np.uint8), cv2.IMREAD_COLOR),
                                       cv2.COLOR_BGR2RGB))
    actions = []
    for _, msg, msgtype in sorted(by_topic.get('/joint_command', []), key=lambda x: x[0]):
        if msgtype.endswith('JointTrajectory'):
            actions.append(msg.points[0].positions)
        elif msgtype.endswith('JointState'):
            actions.append(msg.position)
        else:
            actions.append(msg.data)
    states = [m.position for _, m, _ in sorted(by_topic['/joint_states'], key=lambda x: x[0])]
    return {'images': np.stack(images), 'states': np.asarray(states, np.float32),
            'actions': np.asarray(actions, np.float64) if actions else None,
            'instruction': by_topic['/instruction'][0][1].data}


def _expected(runner, rec, execute=EXECUTE):
    """Chunks at ticks 0, E, 2E, ... and their errors, computed with plain numpy."""
    T = len(rec['images'])
    starts = list(range(0, T, execute))
    preds = [runner.predict(rec['images'][t], rec['instruction'], state=rec['states'][t]) for t in starts]
    chunks = np.stack([p.actions for p in preds]).astype(np.float64)
    abs_err, sq_err, by_step, exec_err = [], [], [[] for _ in range(H)], []
    for t, chunk in zip(starts, chunks):
        for h in range(H):
            if t + h < T and rec['actions'] is not None:
                e = chunk[h] - rec['actions'][t + h]
                abs_err.append(np.abs(e))
                sq_err.append(e ** 2)
                by_step[h].append(np.abs(e))
                if h < execute:
                    exec_err.append(np.abs(e))
    seams = [np.abs(chunks[i][0] - chunks[i - 1][execute]) for i in range(1, len(chunks))]
    return {'starts': starts, 'chunks': chunks, 'nfe': [p.nfe for p in preds], 'mae': np.mean(abs_err, axis=0),
            'mse': np.mean(sq_err, axis=0), 'pairs': len(abs_err), 'exec_mae': np.mean(exec_err, axis=0),
            'by_step': [np.mean(s, axis=0) for s in by_step], 'seams': np.asarray(seams)}


def _run(capsys, *args):
    code = cli.main([*map(str, args), '--quiet'])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_action_limits_clip_as_in_the_node(bags, policy_dir, tmp_path, capsys):
    """--action-lower/--action-upper go through the node's postprocess_chunk: every executed action is inside them
    and the clipped values are counted."""
    out = tmp_path / 'clipped'
    code, _, stderr = _run(capsys, '--bag', next(iter(bags.values())), '--policy', 'tiny', '--policy-dir', policy_dir,
                           '--out', out, '--action-lower=-0.05,-0.05,-0.05', '--action-upper=0.05,0.05,0.05',
                           '--max-plots', 0)
    assert code == 0, stderr
    report = json.loads((out / 'report.json').read_text())
    assert report['settings']['rate_hz'] == 10.0  # the policy's trained rate
    assert report['settings']['action_limits'] == {'lower': [-0.05] * 3, 'upper': [0.05] * 3}
    assert report['variants'][0]['overall']['actions_clipped'] > 0
    code, _, stderr = _run(capsys, '--bag', next(iter(bags.values())), '--policy', 'tiny', '--policy-dir', policy_dir,
                           '--out', out, '--action-lower=-1,0', '--action-upper=1,1')
    assert code != 0 and 'one lower and one upper value per action' in stderr


def test_report_numbers_match_an_independent_computation(bags, policy_dir, tmp_path, capsys):
    from blockvla_ros.runtime.runner import PolicyRunner

    out = tmp_path / 'report'
    args = []
    for path in bags.values():
        args += ['--bag', path]
    code, stdout, stderr = _run(capsys, *args, '--policy', 'tiny', '--policy-dir', policy_dir, '--out', out,
                                '--execute-steps', EXECUTE, '--max-plots', 2)
    assert code == 0, stderr
    assert 'x real time' in stdout and 'replay speed' in stdout
    report = json.loads((out / 'report.json').read_text())
    [variant] = report['variants']
    runner = PolicyRunner.load(policy_dir / 'tiny')
    pooled_abs, pooled_pairs, nfes = np.zeros(D), 0, []
    for path in bags.values():
        rec = _read_bag(path)
        exp = _expected(runner, rec)
        got = variant['per_bag'][str(path)]
        assert got['chunks'] == len(exp['starts']) and got['ticks'] == len(rec['images'])
        assert got['errors']['pairs'] == exp['pairs']
        for i, name in enumerate(ACTION_NAMES):
            assert got['errors']['per_dim'][name]['mae'] == pytest.approx(exp['mae'][i], rel=1e-5, abs=1e-6)
            assert got['errors']['per_dim'][name]['mse'] == pytest.approx(exp['mse'][i], rel=1e-5, abs=1e-6)
            assert got['executed_errors']['per_dim'][name]['mae'] == pytest.approx(exp['exec_mae'][i], rel=1e-5,
                                                                                   abs=1e-6)
            assert got['seam_jump']['per_dim'][name]['max'] == pytest.approx(exp['seams'][:, i].max(), abs=1e-6)
            for h in range(H):
                assert got['errors']['by_step']['mae'][h][i] == pytest.approx(exp['by_step'][h][i], rel=1e-5, abs=1e-6)
        assert got['errors']['gripper']['mae'] == pytest.approx(exp['mae'][2], rel=1e-5, abs=1e-6)
        assert got['errors']['arm']['mae'] == pytest.approx(exp['mae'][:2].mean(), rel=1e-5, abs=1e-6)
        assert got['nfe']['mean'] == pytest.approx(np.mean(exp['nfe']))
        assert got['latency_ms']['total']['p50'] > 0
        pooled_abs += exp['mae'] * exp['pairs']
        pooled_pairs += exp['pairs']
        nfes += exp['nfe']
    overall = variant['overall']
    assert overall['errors']['pairs'] == pooled_pairs
    for i, name in enumerate(ACTION_NAMES):
        assert overall['errors']['per_dim'][name]['mae'] == pytest.approx(pooled_abs[i] / pooled_pairs, rel=1e-5)
    assert overall['nfe']['total'] == sum(nfes)
    assert variant['speed']['realtime_factor'] > 0
    md = (out / 'report.md').read_text()
    assert 'arm MAE / MSE (all steps)' in md and 'gripper' in md
    assert {'error_vs_horizon.png', 'latency.png'} <= set(report['plots'])
    for name in report['plots']:
        assert (out / name).read_bytes()[:4] == b'\x89PNG'


def test_two_decoders_side_by_side(bags, policy_dir, tmp_path, capsys):
    bag = bags[('mcap', 'raw', 'JointTrajectory')]
    out = tmp_path / 'cmp'
    code, stdout, stderr = _run(capsys, '--bag', bag, '--policy', 'tiny', '--policy-dir', policy_dir, '--out', out,
                                '--decoder', 'blockdiff', '--decoder', 'ar', '--max-plots', 1)
    assert code == 0, stderr
    report = json.loads((out / 'report.json').read_text())
    assert [v['label'] for v in report['variants']] == ['blockdiff', 'ar']
    assert [v['policy']['decoder'] for v in report['variants']] == ['blockdiff', 'ar']
    ar = report['variants'][1]['overall']
    assert ar['nfe']['min'] == ar['nfe']['max'] == H * D  # AR: one pass per action token
    assert all(v['overall']['errors']['pairs'] > 0 for v in report['variants'])
    assert '| figure | blockdiff | ar |' in (out / 'report.md').read_text()
    assert stdout.count('replay speed') == 2


def test_two_policies_side_by_side(bags, policy_dir, tmp_path, capsys):
    import shutil
    dirs = tmp_path / 'models'
    shutil.copytree(policy_dir / 'tiny', dirs / 'tiny')
    shutil.copytree(policy_dir / 'tiny', dirs / 'tiny_copy')  # same weights: identical figures expected
    out = tmp_path / 'cmp'
    code, stdout, stderr = _run(capsys, '--bag', bags[('sqlite3', 'raw', 'JointTrajectory')], '--policy', 'tiny',
                                '--policy', 'tiny_copy', '--policy-dir', dirs, '--out', out, '--max-plots', 1)
    assert code == 0, stderr
    report = json.loads((out / 'report.json').read_text())
    a, b = report['variants']
    assert (a['label'], b['label']) == ('tiny', 'tiny_copy')
    assert a['policy']['folder'].endswith('tiny') and b['policy']['folder'].endswith('tiny_copy')
    assert a['overall']['errors'] == b['overall']['errors'] and a['overall']['errors']['pairs'] > 0
    assert '| figure | tiny | tiny_copy |' in (out / 'report.md').read_text()


def test_a_second_replay_into_the_same_folder_leaves_no_plots_of_the_first(bags, policy_dir, tmp_path, capsys):
    """The folder held the first run's trajectory plots of bags the second report does not cover; files the first
    report did not write (the user's own) stay."""
    out = tmp_path / 'again'
    base = ['--policy', 'tiny', '--policy-dir', policy_dir, '--out', out, '--warmup', 0]
    two = [a for path in list(bags.values())[:2] for a in ('--bag', path)]
    assert _run(capsys, *two, *base)[0] == 0
    first = set(json.loads((out / 'report.json').read_text())['plots'])
    (out / 'notes.txt').write_text('mine')
    assert _run(capsys, *two[:2], *base)[0] == 0
    second = set(json.loads((out / 'report.json').read_text())['plots'])
    assert first - second, 'the second run should cover fewer episodes'
    assert {p.name for p in out.iterdir()} == second | {'report.json', 'report.md', 'notes.txt'}


def _without_topic(src, dst, topic):
    """Copy a bag without one topic (rosbags Reader -> Writer, same storage)."""
    typestore = get_typestore(Stores.LATEST)
    with Reader(src) as reader, Writer(dst, version=9) as writer:
        conns = {}
        for c in reader.connections:
            if c.topic != topic:
                conns[c.id] = writer.add_connection(c.topic, c.msgtype, typestore=typestore)
        for c, t, raw in reader.messages():
            if c.id in conns:
                writer.write(conns[c.id], t, raw)


def test_bag_without_actions_still_predicts_and_says_why(bags, policy_dir, tmp_path, capsys):
    bag = tmp_path / 'no_actions'
    _without_topic(bags[('mcap', 'png', 'Float32MultiArray')], bag, '/joint_command')
    out = tmp_path / 'out'
    code, stdout, stderr = _run(capsys, '--bag', bag, '--policy', 'tiny', '--policy-dir', policy_dir, '--out', out)
    assert code == 0, stderr
    assert 'no recorded actions: error not computed' in stdout
    report = json.loads((out / 'report.json').read_text())
    overall = report['variants'][0]['overall']
    assert overall['errors'] is None and overall['error_note'] == 'no recorded actions: error not computed'
    assert overall['chunks'] > 0 and overall['latency_ms']['total']['max'] > 0 and overall['nfe']['min'] > 0
    assert "no action topic '/joint_command'" in report['bags'][0]['no_actions_reason']
    assert 'error not computed' in (out / 'report.md').read_text()
    assert any(p.startswith('trajectory_') for p in report['plots']) and 'latency.png' in report['plots']
    assert 'error_vs_horizon.png' not in report['plots']


def test_bad_input_gives_a_clear_error(bags, policy_dir, tmp_path, capsys, monkeypatch):
    bag = bags[('mcap', 'raw', 'JointTrajectory')]
    base = ['--policy', 'tiny', '--policy-dir', policy_dir, '--out', tmp_path / 'out', '--warmup', 0]
    code, _, err = _run(capsys, '--bag', bag, '--image-topic', '/front_camera', *base)
    assert code == 2 and str(bag) in err and "'/front_camera' is not in the bag" in err
    [mcap] = list(bag.glob('*.mcap'))
    truncated = tmp_path / 'truncated.mcap'
    truncated.write_bytes(mcap.read_bytes()[:len(mcap.read_bytes()) // 2])
    garbage = tmp_path / 'garbage.mcap'
    garbage.write_bytes(b'not a bag at all' * 10)
    for path in (truncated, garbage):
        code, _, err = _run(capsys, '--bag', path, *base)
        assert code == 2 and str(path) in err and ('corrupt' in err or 'truncated' in err), err
    code, _, err = _run(capsys, '--bag', tmp_path / 'missing', *base)
    assert code == 2 and 'missing' in err and 'does not exist' in err
    code, _, err = _run(capsys, '--bag', bag, '--policy', 'nope', '--policy-dir', policy_dir, '--out', tmp_path / 'o')
    assert code == 2 and "'nope' not found" in err
    export_here = tmp_path / 'cwd' / 'models' / 'mine'  # blockvla-export --out models/mine, outside the checkout
    export_here.mkdir(parents=True)
    (export_here / 'policy.yaml').write_text('{}')
    monkeypatch.chdir(tmp_path / 'cwd')
    code, _, err = _run(capsys, '--bag', bag, '--policy', 'mine', '--out', tmp_path / 'o')
    assert code == 2 and "'mine' not found" in err and '--policy models/mine or --policy-dir models' in err, err
    code, _, err = _run(capsys, '--bag', bag, *base, '--execute-steps', H + 1)
    assert code == 2 and 'execute_steps' in err
    assert not (tmp_path / 'out').exists()


@pytest.mark.ros
def test_live_path_player_node_recorder(bags, policy_dir, tmp_path):
    """bag player + the real policy node (sim time) + recorder over loopback: the output bag holds the node's
    chunks, and the first one continues an offline prediction on one of the bag's observations."""
    from blockvla_ros.evaluation.live import run_live
    from blockvla_ros.runtime.runner import PolicyRunner

    bag = bags[('sqlite3', 'jpeg', 'JointState')]
    result = run_live(bag, 'tiny', tmp_path / 'live', policy_dirs=[str(policy_dir)], control_rate_hz=10.0,
                      settle_s=1.0)
    assert result.output_bag == tmp_path / 'live' and result.counts['/action_chunk'] > 0
    assert result.counts['/action'] > 0 and result.counts['/diagnostics'] > 0
    chunks = []
    with AnyReader([result.output_bag]) as reader:
        conns = [c for c in reader.connections if c.topic == '/action_chunk']
        assert conns[0].msgtype == 'trajectory_msgs/msg/JointTrajectory'
        for c, t, raw in reader.messages(connections=conns):
            chunks.append((t, reader.deserialize(raw, c.msgtype)))
    rec = _read_bag(bag)
    t0, t_end = 1_700_000_000 * 10**9, 1_700_000_000 * 10**9 + len(rec['images']) * 100_000_000
    for t, msg in chunks:
        assert list(msg.joint_names) == ACTION_NAMES and 1 <= len(msg.points) <= H
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert t0 <= stamp <= t_end and t0 <= t <= t_end  # sim time from the player's /clock
    runner = PolicyRunner.load(policy_dir / 'tiny')
    first = np.array([p.positions for p in chunks[0][1].points])  # [k, D] remaining part of the first chunk
    # the node pairs the newest image with the newest state, which may be one tick apart
    T = len(rec['images'])
    offline = [runner.predict(rec['images'][k], rec['instruction'], state=rec['states'][j]).actions
               for k in range(T) for j in range(max(k - 1, 0), min(k + 2, T))]
    assert any(np.allclose(first, pred[H - len(first):], atol=1e-5) for pred in offline)


@pytest.mark.ros
def test_live_path_fails_fast_when_the_node_cannot_configure(bags, policy_dir, tmp_path):
    """A policy folder the node refuses (tampered weights): the harness reports the node's reason at once instead
    of waiting out the start-up timeout for publishers that never come."""
    import shutil

    from blockvla_ros.evaluation.live import LiveReplayError, run_live

    dirs = tmp_path / 'policies'
    shutil.copytree(policy_dir / 'tiny', dirs / 'tiny')
    onnx = sorted((dirs / 'tiny').glob('*.onnx'))[0]
    onnx.write_bytes(onnx.read_bytes()[:-1] + b'\0')
    bag = bags[('sqlite3', 'jpeg', 'JointState')]
    with pytest.raises(LiveReplayError, match='could not configure its policy') as info:
        run_live(bag, 'tiny', tmp_path / 'live', policy_dirs=[str(dirs)], control_rate_hz=10.0,
                 startup_timeout_s=600.0)
    assert 'configure failed' in str(info.value) and not (tmp_path / 'live').exists()


FOREIGN = {'/camera/image_raw/compressed': '/cam_front/color/image_raw/compressed',
           '/instruction': '/task_description'}


def _as_recorded_elsewhere(src, dst):
    """The bag under other topic names and without recorded QoS, as bags written by other tools come."""
    typestore = get_typestore(Stores.LATEST)
    with Reader(src) as reader, Writer(dst, version=9) as writer:
        conns = {c.id: writer.add_connection(FOREIGN.get(c.topic, c.topic), c.msgtype, typestore=typestore)
                 for c in reader.connections}
        for c, t, raw in reader.messages():
            writer.write(conns[c.id], t, raw)


@pytest.mark.ros
def test_live_replay_cli_plays_a_bag_recorded_elsewhere(bags, policy_dir, tmp_path, capsys):
    """blockvla-live-replay takes the bag's topic names, and its node matches the bag's volatile instruction
    publisher: with the node's default transient-local subscription the instruction never arrived and the node held
    for the whole bag (0 actions)."""
    from blockvla_ros.evaluation import live

    bag = tmp_path / 'elsewhere'
    _as_recorded_elsewhere(bags[('sqlite3', 'jpeg', 'JointState')], bag)
    assert live.recorded_instruction_qos(bag, '/task_description') == 'volatile'
    assert live.recorded_instruction_qos(bags[('sqlite3', 'jpeg', 'JointState')], '/instruction') == 'transient_local'
    code = live.main(['--bag', str(bag), '--policy', 'tiny', '--policy-dir', str(policy_dir), '--out',
                      str(tmp_path / 'live'), '--control-rate-hz', '10', '--settle-s', '1',
                      '--image-topic', '/cam_front/color/image_raw', '--instruction-topic', '/task_description'])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert ' /action ' in out.out and ' /action 0,' not in out.out and '/action_chunk 0' not in out.out, out.out


@pytest.mark.ros
def test_live_replay_of_a_bag_the_node_cannot_act_on_says_why(bags, policy_dir, tmp_path, capsys):
    """The policy reads joint states and the bag has none: the node holds throughout. The run reported only the
    topics it recorded ('/diagnostics 9') and exit code 0; now the hold reason from the node's diagnostics."""
    from blockvla_ros.evaluation import live

    bag = tmp_path / 'no_state'
    _without_topic(bags[('sqlite3', 'jpeg', 'JointState')], bag, '/joint_states')
    code = live.main(['--bag', str(bag), '--policy', 'tiny', '--policy-dir', str(policy_dir), '--out',
                      str(tmp_path / 'live'), '--control-rate-hz', '10', '--settle-s', '0.5'])
    err = capsys.readouterr().err
    assert code == 1 and 'published no action' in err and 'no usable joint state' in err, err
    assert 'shutting down' not in err  # the harness's own stop is no reason


def _reversed_joint_states(src, dst):
    """The bag with its JointState states and actions listing their joints in the opposite order, after one more
    joint (a pan-tilt unit's)."""
    typestore = get_typestore(Stores.LATEST)
    with Reader(src) as reader, Writer(dst, version=9) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=typestore) for c in reader.connections}
        for c, t, raw in reader.messages():
            if c.msgtype == 'sensor_msgs/msg/JointState':
                m = typestore.deserialize_cdr(raw, c.msgtype)
                m.name = m.name[::-1] + ['pan']
                m.position, m.velocity = np.append(m.position[::-1], 0.5), np.append(m.velocity[::-1], 0.0)
                m.effort = np.zeros(len(m.name))
                raw = typestore.serialize_cdr(m, c.msgtype)
            writer.write(conns[c.id], t, raw)


def test_states_and_actions_are_matched_to_the_policy_by_name(bags, policy_dir, tmp_path, capsys):
    """A robot whose driver lists the joints in another order than the training recordings: the node reads
    joint_states by name, replay took the columns by position (other predictions, errors against the wrong
    dimension). The same bag with its joints listed the other way round replays to the same chunks and errors."""
    from blockvla_ros.evaluation.replay import ReplaySettings, load_bags, replay_variant
    from blockvla_ros.io.bag_reader import TopicMap
    from blockvla_ros.runtime.runner import PolicyRunner

    src = bags[('sqlite3', 'jpeg', 'JointState')]
    _reversed_joint_states(src, tmp_path / 'reversed')
    runner = PolicyRunner.load(policy_dir / 'tiny')
    topics = TopicMap(state='/joint_states')
    runs = [replay_variant(runner, load_bags([path], topics, 10.0, progress=False),
                           ReplaySettings(10.0, EXECUTE, 1), progress=False).episodes[0]
            for path in (src, tmp_path / 'reversed')]
    np.testing.assert_allclose(runs[1].chunks, runs[0].chunks, atol=1e-6)
    np.testing.assert_allclose(runs[1].recorded, runs[0].recorded)
    reports = []
    for name, path in (('same', src), ('reversed', tmp_path / 'reversed')):  # the CLI reads bags with more joints
        code, _, err = _run(capsys, '--bag', path, '--policy', 'tiny', '--policy-dir', policy_dir, '--warmup', 0,
                            '--out', tmp_path / name, '--action-topic', '/joint_command')
        assert code == 0, err
        reports.append(json.loads((tmp_path / name / 'report.json').read_text())['variants'][0]['overall'])
    assert reports[1]['errors'] == reports[0]['errors'] and reports[0]['errors']['pairs'] > 0


def test_real_time_chunking_feeds_the_previous_plan(bags, policy_dir):
    """--known-steps K: each new chunk starts with the K actions the previous chunk planned for its ticks."""
    from blockvla_ros.evaluation.replay import ReplaySettings, load_bags, replay_variant
    from blockvla_ros.io.bag_reader import TopicMap
    from blockvla_ros.runtime.runner import PolicyRunner

    runner = PolicyRunner.load(policy_dir / 'tiny')
    loaded = load_bags([bags[('mcap', 'raw', 'JointTrajectory')]], TopicMap(state='/joint_states'), 10.0,
                       action_dim=D, state_dim=2, progress=False)
    [ep] = replay_variant(runner, loaded, ReplaySettings(10.0, EXECUTE, 1), progress=False).episodes
    assert len(ep.starts) >= 3 and np.all(np.diff(ep.starts) == EXECUTE)
    for i in range(1, len(ep.starts)):
        np.testing.assert_allclose(ep.chunks[i, 0], ep.chunks[i - 1, EXECUTE], atol=1e-6)
    # the seam is measured at the first step the new chunk decided itself
    jumps = np.abs(ep.chunks[1:, 1] - ep.chunks[:-1, EXECUTE + 1])
    np.testing.assert_allclose(ep.seams.max, jumps.max(axis=0), atol=1e-9)
    with pytest.raises(ValueError, match='known_steps'):
        replay_variant(runner, loaded, ReplaySettings(10.0, H, 1), progress=False)
