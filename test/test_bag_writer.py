"""RecordingWriter: real rosbag2 files (mcap and sqlite3) read back with rosbags AnyReader."""
import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.interfaces import QosDurability

from blockvla_ros.io.bag_writer import COMPRESSED_FORMATS, RecordingWriter, TopicNames

ACTION_NAMES = ['ee_dx', 'ee_dy', 'gripper']
STATE_NAMES = ['ee_x', 'ee_y']
T0 = 1_700_000_000_123_456_789
DT = 100_000_000


def _frames(n=3, h=24, w=32):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8)
    # smooth images (upscaled noise) so JPEG stays close to the original
    return [cv2.resize(np.roll(base, k, axis=1), (w, h), interpolation=cv2.INTER_LINEAR) for k in range(n)]


def _write_episode(path, frames, **kw):
    actions = [np.array([0.1 * k, -0.2, float(k % 2)]) for k in range(len(frames))]
    with RecordingWriter(path, **kw) as w:
        w.write_instruction(T0, 'touch the red block')
        for k, rgb in enumerate(frames):
            t = T0 + k * DT
            w.write_image(t, rgb)
            w.write_state(t, [0.5, -0.25 + k], STATE_NAMES)
            w.write_action(t, actions[k], ACTION_NAMES)
        assert not path.exists()    # only the temporary sibling exists while writing
    return w, actions


def _read(path):
    out = {}
    with AnyReader([path]) as reader:
        conns = {c.topic: c for c in reader.connections}
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, reader.deserialize(raw, conn.msgtype)))
    return conns, out


def _stamp(msg):
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('image_format', ['raw', 'jpeg', 'png'])
def test_images_state_instruction_round_trip(tmp_path, storage, image_format):
    frames = _frames()
    path = tmp_path / 'episode'
    writer, actions = _write_episode(path, frames, storage=storage, image_format=image_format)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['episode']     # no temp dir left behind
    assert any(path.glob('episode*.mcap' if storage == 'mcap' else 'episode*.db3'))
    conns, msgs = _read(path)
    image_topic = '/camera/image_raw' if image_format == 'raw' else '/camera/image_raw/compressed'
    assert {t: c.msgtype for t, c in conns.items()} == {
        image_topic: 'sensor_msgs/msg/Image' if image_format == 'raw' else 'sensor_msgs/msg/CompressedImage',
        '/instruction': 'std_msgs/msg/String',
        '/joint_states': 'sensor_msgs/msg/JointState',
        '/joint_command': 'trajectory_msgs/msg/JointTrajectory',
    }
    assert {t: len(m) for t, m in msgs.items()} == {image_topic: 3, '/instruction': 1, '/joint_states': 3,
                                                    '/joint_command': 3}
    assert dict(writer.counts) == {t: len(m) for t, m in msgs.items()}
    stamps = [T0 + k * DT for k in range(3)]
    for topic in (image_topic, '/joint_states', '/joint_command'):
        assert [t for t, _ in msgs[topic]] == stamps                 # bag time = stamp
        assert [_stamp(m) for _, m in msgs[topic]] == stamps         # obs and action share the stamp
    assert msgs['/instruction'][0][1].data == 'touch the red block'
    qos = conns['/instruction'].ext.offered_qos_profiles
    assert qos and qos[0].durability == QosDurability.TRANSIENT_LOCAL
    for rgb, (_, msg) in zip(frames, msgs[image_topic]):
        assert msg.header.frame_id == 'camera'
        if image_format == 'raw':
            assert (msg.encoding, msg.height, msg.width, msg.step) == ('rgb8', 24, 32, 96)
            decoded = msg.data.reshape(msg.height, msg.width, 3)
        else:
            assert msg.format == COMPRESSED_FORMATS[image_format]
            decoded = cv2.cvtColor(cv2.imdecode(msg.data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        if image_format == 'jpeg':
            err = np.abs(decoded.astype(int) - rgb).mean()
            assert err < 12 and np.abs(decoded.astype(int) - rgb[..., ::-1]).mean() > 3 * err   # lossy, not swapped
        else:
            assert np.array_equal(decoded, rgb)
    for k, (_, st) in enumerate(msgs['/joint_states']):
        assert list(st.name) == STATE_NAMES and np.allclose(st.position, [0.5, -0.25 + k])
    for a, (_, act) in zip(actions, msgs['/joint_command']):
        assert list(act.joint_names) == ACTION_NAMES and len(act.points) == 1
        assert np.allclose(act.points[0].positions, a)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('action_msg', ['JointTrajectory', 'JointState', 'Float32MultiArray'])
def test_action_message_types(tmp_path, storage, action_msg):
    topics = TopicNames(action='/robot/command')
    _, actions = _write_episode(tmp_path / 'b', _frames(2), storage=storage, action_msg=action_msg,
                                topics=topics, version=8 if storage == 'sqlite3' else 9)
    conns, msgs = _read(tmp_path / 'b')
    expected_type = {'JointTrajectory': 'trajectory_msgs/msg/JointTrajectory',
                     'JointState': 'sensor_msgs/msg/JointState',
                     'Float32MultiArray': 'std_msgs/msg/Float32MultiArray'}[action_msg]
    assert conns['/robot/command'].msgtype == expected_type
    got = msgs['/robot/command']
    assert [t for t, _ in got] == [T0, T0 + DT]
    for a, (_, msg) in zip(actions, got):
        if action_msg == 'JointTrajectory':
            values, names = msg.points[0].positions, list(msg.joint_names)
        elif action_msg == 'JointState':
            values, names = msg.position, list(msg.name)
        else:
            values, names = msg.data, msg.layout.dim[0].label.split(',')
            assert msg.data.dtype == np.float32 and msg.layout.dim[0].size == 3
        assert names == ACTION_NAMES and np.allclose(values, a, atol=1e-6)
        if action_msg != 'Float32MultiArray':
            assert _stamp(msg) in (T0, T0 + DT)


def test_exception_leaves_no_bag_and_no_temp_dir(tmp_path):
    path = tmp_path / 'out' / 'broken'
    with pytest.raises(ZeroDivisionError):
        with RecordingWriter(path) as w:
            w.write_instruction(T0, 'touch the red block')
            w.write_image(T0, _frames(1)[0])
            1 / 0
    assert not path.exists()
    assert list((tmp_path / 'out').iterdir()) == []
    # a bad message inside the block also aborts the whole bag
    with pytest.raises(ValueError):
        with RecordingWriter(path, storage='sqlite3') as w:
            w.write_image(T0, _frames(1)[0])
            w.write_state(T0, [1.0, 2.0], ['only_one'])
    assert list((tmp_path / 'out').iterdir()) == []


def test_existing_path_is_refused(tmp_path):
    (tmp_path / 'taken').mkdir()
    with pytest.raises(FileExistsError, match='taken.*already exists'):
        RecordingWriter(tmp_path / 'taken')
    # a path that appears while writing is not overwritten either
    w = RecordingWriter(tmp_path / 'late').open()
    w.write_instruction(T0, 'touch the red block')
    (tmp_path / 'late').mkdir()
    with pytest.raises(FileExistsError, match='appeared while writing'):
        w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['late', 'taken']
    assert list((tmp_path / 'late').iterdir()) == []


def test_bad_arguments_and_messages_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="storage.*'rosbag'"):
        RecordingWriter(tmp_path / 'a', storage='rosbag')
    with pytest.raises(ValueError, match="image_format.*'bmp'"):
        RecordingWriter(tmp_path / 'a', image_format='bmp')
    with pytest.raises(ValueError, match="action_msg.*'Twist'"):
        RecordingWriter(tmp_path / 'a', action_msg='Twist')
    with pytest.raises(ValueError, match='version'):
        RecordingWriter(tmp_path / 'a', version=7)
    with pytest.raises(ValueError, match="TopicNames.state: 'joint states'"):
        TopicNames(state='joint states')
    w = RecordingWriter(tmp_path / 'a')
    with pytest.raises(RuntimeError, match='not open'):
        w.write_instruction(T0, 'hello')
    with w:
        with pytest.raises(ValueError, match=r'/camera/image_raw: .*uint8 RGB, got float32'):
            w.write_image(T0, np.zeros((8, 8, 3), np.float32))
        with pytest.raises(ValueError, match=r'/camera/image_raw: .*got uint8 \(8, 8\)'):
            w.write_image(T0, np.zeros((8, 8), np.uint8))
        with pytest.raises(ValueError, match=r'/joint_command: 3 values but 2 names'):
            w.write_action(T0, [0, 0, 1], ['ee_dx', 'ee_dy'])
        with pytest.raises(ValueError, match='/joint_command: non-finite'):
            w.write_action(T0, [0, np.nan, 1], ACTION_NAMES)
        with pytest.raises(ValueError, match='/joint_states: names must be a list'):
            w.write_state(T0, [0.0], 'ee_x')
        with pytest.raises(ValueError, match='t_ns must be a non-negative int'):
            w.write_state(-1, [0.0, 0.0], STATE_NAMES)
        with pytest.raises(ValueError, match='t_ns must be a non-negative int'):
            w.write_state(1.5, [0.0, 0.0], STATE_NAMES)
        with pytest.raises(ValueError, match='/instruction: instruction must be a non-empty str'):
            w.write_instruction(T0, '  ')
        w.write_instruction(T0, 'touch the red block')
        w.set_metadata('blockvla.note', 'kept')
    assert dict(w.counts) == {'/instruction': 1}    # rejected messages were not written
    assert 'blockvla.note: kept' in (tmp_path / 'a' / 'metadata.yaml').read_text()
