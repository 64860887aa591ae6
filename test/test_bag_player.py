"""blockvla-bag-play over loopback DDS: real bags (mcap, sqlite3; raw and compressed images) -> rclpy
subscribers receive every message unchanged, in recorded order, no faster than recorded, with /clock;
the bag recorder node writes what it hears back into a bag."""
import array
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosbags.highlevel import AnyReader

from rosbags.typesys import Stores, get_typestore

from blockvla_ros.io.bag_writer import RecordingWriter
from blockvla_ros.ros.bag_player_node import PlaybackClock, message_class

pytestmark = pytest.mark.ros

T0 = 1_700_000_000 * 1_000_000_000
DT = 100_000_000
N = 8
NAMES = ['ee_dx', 'ee_dy', 'gripper']
ENV = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')


def _write_bag(path, storage, image_format, action_msg):
    rng = np.random.default_rng(1)
    with RecordingWriter(path, storage=storage, image_format=image_format, action_msg=action_msg) as w:
        w.write_instruction(T0, 'touch the red block')
        for k in range(N):
            t = T0 + k * DT
            w.write_image(t, rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            w.write_state(t, [0.1 * k, -0.1 * k], ['ee_x', 'ee_y'])
            w.write_action(t, [0.5, -0.5, float(k % 2)], NAMES)
    with AnyReader([path]) as reader:
        return [(c.topic, c.msgtype, t, raw) for c, t, raw in reader.messages()]


def _plain(msg):
    """A rosbags or rclpy message as nested dicts / lists, for equality checks."""
    if isinstance(msg, (np.ndarray, array.array)):
        return [float(x) if isinstance(x, (float, np.floating)) else int(x) for x in msg]
    if isinstance(msg, (bytes, bytearray)):
        return list(msg)
    if isinstance(msg, (list, tuple)):
        return [_plain(m) for m in msg]
    if hasattr(msg, '__dataclass_fields__'):
        return {k: _plain(getattr(msg, k)) for k in msg.__dataclass_fields__ if k != '__msgtype__'}
    if hasattr(msg, 'get_fields_and_field_types'):
        return {k: _plain(getattr(msg, k)) for k in msg.get_fields_and_field_types()}
    return msg


def _player(bag, *args):
    return subprocess.Popen([sys.executable, '-m', 'blockvla_ros.ros.bag_player_node', str(bag), *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _exit_or_dump(proc, grace):
    """The process's output once it exits; still running after `grace` s: SIGABRT (its faulthandler prints every
    thread's stack into the output) and fail with that output, so a hang is diagnosable from the CI log."""
    try:
        return proc.communicate(timeout=grace)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(6)
        out = proc.communicate(timeout=30)[0]
        pytest.fail(f'still running {grace} s after SIGINT; its output and stacks:\n{out}')


def _finish(proc, timeout=60):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


class _Listener:
    """In-process rclpy node that keeps every received message with its arrival time."""

    def __init__(self, topics: dict[str, str]):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = Node('listener', context=self.ctx)
        self.got = {t: [] for t in topics}
        self.clock = []
        for topic, msgtype in topics.items():
            latched = topic == '/instruction'
            qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            self.node.create_subscription(
                message_class(msgtype), topic,
                lambda m, t=topic: self.got[t].append((time.monotonic(), m)), qos)
        self.node.create_subscription(message_class('rosgraph_msgs/msg/Clock'), '/clock',
                                      lambda m: self.clock.append(m.clock.sec * 10**9 + m.clock.nanosec), 100)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)

    def spin_until(self, done, proc, limit_s=60):
        end = time.monotonic() + limit_s
        while not done() and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
        proc.poll()

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


@pytest.mark.parametrize('storage,image_format,action_msg', [
    ('mcap', 'raw', 'JointTrajectory'),
    ('sqlite3', 'jpeg', 'JointState'),
    ('mcap', 'png', 'Float32MultiArray'),
])
def test_player_republishes_bag_with_recorded_timing_and_clock(tmp_path, storage, image_format, action_msg):
    bag = tmp_path / 'bag'
    recorded = _write_bag(bag, storage, image_format, action_msg)
    topics = {topic: msgtype for topic, msgtype, _, _ in recorded}
    image_topic = next(t for t in topics if t.startswith('/camera'))
    listener = _Listener(topics)
    try:
        launched = time.monotonic()
        rate = 2.0
        proc = _player(bag, '--rate', str(rate), '--wait-for-subscribers', *sorted(topics), '--linger', '0.5')
        want = {t: sum(1 for r in recorded if r[0] == t) for t in topics}
        last = T0 + (N - 1) * DT
        listener.spin_until(lambda: all(len(listener.got[t]) >= n for t, n in want.items())
                            and last in listener.clock, proc)
        log = _finish(proc)
    finally:
        listener.close()
    assert 'published %d messages' % len(recorded) in log
    typestore = get_typestore(Stores.LATEST)
    for topic, msgtype in topics.items():
        sent = [_plain(typestore.deserialize_cdr(raw, msgtype)) for t, _, _, raw in recorded if t == topic]
        got = [_plain(msg) for _, msg in listener.got[topic]]
        assert got == sent, topic  # every field: header stamps, pixels, actions, in recorded order
    # never faster than recorded: the last image cannot arrive before (span / rate) after launch
    span_s = (N - 1) * DT / 1e9
    assert listener.got[image_topic][-1][0] - launched >= span_s / rate
    # /clock carried bag time: non-decreasing, from the first to the last recorded stamp
    clock = np.array(listener.clock)
    assert clock.size >= N and np.all(np.diff(clock) >= 0)
    assert clock.min() >= T0 and clock.max() == T0 + (N - 1) * DT


def test_recorder_writes_what_the_player_plays(tmp_path):
    bag = tmp_path / 'bag'
    _write_bag(bag, 'mcap', 'raw', 'JointTrajectory')
    out, ready = tmp_path / 'out', tmp_path / 'ready'
    recorder = subprocess.Popen(  # -X faulthandler: a recorder stuck after SIGINT dumps its stacks on SIGABRT
        [sys.executable, '-X', 'faulthandler', '-m', 'blockvla_ros.ros.bag_recorder_node', '--out', str(out),
         '--storage', 'sqlite3',
         '--ready-file', str(ready), '/joint_command', '/camera/image_raw', '--ros-args', '-p', 'use_sim_time:=true'],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    player = _player(bag, '--rate', '4', '--wait-for-subscribers', '/joint_command', '/camera/image_raw')
    try:
        end = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < end and recorder.poll() is None:
            time.sleep(0.05)
        assert ready.read_text().split() == ['/camera/image_raw', '/joint_command']
        _finish(player)
    finally:
        recorder.send_signal(2)  # SIGINT: the recorder closes the bag and moves it into place
        log = _exit_or_dump(recorder, grace=90)
        player.kill() if player.poll() is None else None
    assert recorder.returncode == 0, log
    with AnyReader([out]) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == {
            '/camera/image_raw': 'sensor_msgs/msg/Image', '/joint_command': 'trajectory_msgs/msg/JointTrajectory'}
        got = {}
        for c, t, raw in reader.messages():
            got.setdefault(c.topic, []).append((t, reader.deserialize(raw, c.msgtype)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bag', 'out', 'ready']  # no temp dir left
    actions = [m.points[0].positions.tolist() for _, m in got['/joint_command']]
    assert actions == [[0.5, -0.5, float(k % 2)] for k in range(N)]
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for _, m in got['/camera/image_raw']]
    assert stamps == [T0 + k * DT for k in range(N)]
    # stored with the sim time the player's /clock gave the recorder: inside the bag's time range, ordered
    times = np.array([t for t, _ in got['/camera/image_raw']])
    assert times.min() >= T0 and times.max() <= T0 + (N - 1) * DT and np.all(np.diff(times) >= 0)


def test_player_errors_name_the_file(tmp_path):
    broken = tmp_path / 'broken.mcap'
    broken.write_bytes(b'\x89MCAP0\r\n' + b'\0' * 40)
    for path, needle in ((tmp_path / 'missing', 'does not exist'), (broken, 'cannot open bag')):
        proc = _player(path)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, out
        assert str(path) in out and needle in out
    bag = tmp_path / 'bag'
    _write_bag(bag, 'mcap', 'raw', 'JointTrajectory')
    proc = _player(bag, '--topics', '/nope')
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "topics ['/nope'] are not in the bag" in out and str(bag) in out


def test_player_plays_a_directory_of_bags_in_turn(tmp_path):
    """`blockvla-bag-play data/demo_recording` style: a dataset directory plays bag after bag."""
    bags = [_write_bag(tmp_path / 'set' / name, 'mcap', 'raw', 'JointTrajectory') for name in ('ep0', 'ep1')]
    listener = _Listener({'/joint_command': 'trajectory_msgs/msg/JointTrajectory'})
    try:
        proc = _player(tmp_path / 'set', '--rate', '10', '--wait-for-subscribers', '/joint_command', '--linger', '0')
        expected = sum(1 for bag in bags for m in bag if m[0] == '/joint_command')
        listener.spin_until(lambda: len(listener.got['/joint_command']) >= expected, proc)
        out = _finish(proc)
    finally:
        listener.close()
    assert '2 bag(s)' in out and len(listener.got['/joint_command']) == expected == 2 * N
    (tmp_path / 'empty' / 'notes').mkdir(parents=True)
    proc = _player(tmp_path / 'empty')  # nothing playable: the message says what to pass
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and 'no rosbag2 recordings found' in out


def test_playback_clock_maps_bag_time_to_wall_time():
    clock = PlaybackClock(bag0_ns=T0, wall0=100.0, rate=2.0)
    assert clock.deadline(T0) == 100.0
    assert clock.deadline(T0 + 1_000_000_000) == pytest.approx(100.5)
    assert clock.bag_now(100.5) == T0 + 1_000_000_000
    with pytest.raises(ImportError, match='not installed'):
        message_class('nonexistent_msgs/msg/Thing')


def test_bag_cannot_choose_what_gets_imported(tmp_path):
    """Issue 13 item 8: a bag declaring `unittest/__main__/X` or a module that exists on the path but is not a
    message package gets that topic skipped with a warning; nothing it names is imported, the rest plays."""
    evil = tmp_path / 'pylib' / 'evil_pkg' / 'msg'
    evil.mkdir(parents=True)
    marker = tmp_path / 'imported'
    for init in (evil.parent / '__init__.py', evil / '__init__.py'):
        init.write_text(f'open({str(marker)!r}, "w").write("imported")\n')
    bag = tmp_path / 'bag'
    typestore = get_typestore(Stores.LATEST)
    from rosbags.rosbag2 import Writer
    FAKE_HASH = 'RIHS01_' + '0' * 64
    with Writer(bag, version=9) as writer:
        good = writer.add_connection('/instruction', 'std_msgs/msg/String', typestore=typestore)
        writer.write(good, T0, typestore.serialize_cdr(typestore.types['std_msgs/msg/String'](data='hi'),
                                                       'std_msgs/msg/String'))
        for i, msgtype in enumerate(('unittest/__main__/X', 'evil_pkg/msg/Boom', 'antigravity/msg/X',
                                     'os/msg/System')):
            conn = writer.add_connection(f'/evil{i}', msgtype, msgdef='string data', rihs01=FAKE_HASH)
            writer.write(conn, T0 + DT * (i + 1), b'\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00')
    metadata = bag / 'metadata.yaml'  # no type hash (as older writers leave it): rosbags then accepts any name
    metadata.write_text(metadata.read_text().replace(FAKE_HASH, "''"))
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path / 'pylib'), ENV.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-m', 'blockvla_ros.ros.bag_player_node', str(bag), '--linger', '0'],
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not marker.exists(), 'a module named by the bag was imported'
    assert "skipping /evil0: unexpected message type name 'unittest/__main__/X'" in out
    assert "skipping /evil1: message type evil_pkg/msg/Boom is not installed" in out
    assert 'published 1 messages' in out
    for msgtype in ('evil_pkg/msg/Boom', 'unittest/msg/X', 'os/msg/System'):
        with pytest.raises(ImportError):
            message_class(msgtype)
    assert 'evil_pkg' not in sys.modules
    assert message_class('sensor_msgs/msg/JointState').__name__ == 'JointState'
