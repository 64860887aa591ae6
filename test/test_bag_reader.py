"""rosbag2 episode reader on real bags written here with rosbags, in mcap AND sqlite3."""
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from blockvla_ros.io.bag_reader import BagError, Episode, TopicMap, iter_bag_paths, list_topics, read_episodes

TS = get_typestore(Stores.LATEST)
T = TS.types
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
T0 = 1_700_000_000 * 10**9  # a wall-clock-like start stamp
MS = 10**6
H, W = 6, 8
ACTION_NAMES = ['shoulder', 'elbow', 'gripper']


# ---- bag writing helpers (rosbags directly, independent of the project's writer) ----------------

def write_bag(path, storage, records):
    """records: (topic, msgtype, bag_time_ns, msg). Written in bag-time order, version 9."""
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as writer:
        connections = {}
        for topic, msgtype, bag_ns, msg in sorted(records, key=lambda r: r[2]):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=TS)
            writer.write(connections[topic], bag_ns, TS.serialize_cdr(msg, msgtype))
    return path


def header(ns):
    return T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=ns // 10**9, nanosec=ns % 10**9),
                                    frame_id='cam')


def frame(index):
    """A small RGB frame whose pixels say which message it is (and which channel is which)."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :, 0] = index % 256
    rgb[:, :, 1] = 255 - index % 256
    rgb[:, :, 2] = 40
    return rgb


def image_record(ns, rgb, kind, bag_ns=None, topic=None):
    bag_ns = ns if bag_ns is None else bag_ns
    if kind == 'raw':  # rgb8 with 2 bytes of row padding, built by hand
        height, width = rgb.shape[:2]
        rows = np.concatenate([rgb.reshape(height, width * 3), np.zeros((height, 2), np.uint8)], axis=1)
        msg = T['sensor_msgs/msg/Image'](header=header(ns), height=height, width=width, encoding='rgb8',
                                         is_bigendian=0, step=width * 3 + 2, data=rows.reshape(-1))
        return (topic or '/camera/image_raw', 'sensor_msgs/msg/Image', bag_ns, msg)
    ok, data = cv2.imencode('.png' if kind == 'png' else '.jpg', rgb[:, :, ::-1])
    msg = T['sensor_msgs/msg/CompressedImage'](header=header(ns), format=f'rgb8; {kind} compressed bgr8',
                                               data=data.reshape(-1))
    return (topic or '/camera/image_raw/compressed', 'sensor_msgs/msg/CompressedImage', bag_ns, msg)


def instruction_record(bag_ns, text, topic='/instruction'):
    return (topic, 'std_msgs/msg/String', bag_ns, T['std_msgs/msg/String'](data=text))


def vector_record(ns, values, kind, names=ACTION_NAMES, topic='/joint_command', bag_ns=None):
    values = np.asarray(values, np.float64)
    bag_ns = ns if bag_ns is None else bag_ns
    empty = np.zeros(0, np.float64)
    if kind == 'trajectory':
        point = T['trajectory_msgs/msg/JointTrajectoryPoint'](
            positions=values, velocities=empty, accelerations=empty, effort=empty,
            time_from_start=T['builtin_interfaces/msg/Duration'](sec=0, nanosec=0))
        later = T['trajectory_msgs/msg/JointTrajectoryPoint'](  # only the first point is the action
            positions=values + 100, velocities=empty, accelerations=empty, effort=empty,
            time_from_start=T['builtin_interfaces/msg/Duration'](sec=0, nanosec=100_000_000))
        msg = T['trajectory_msgs/msg/JointTrajectory'](header=header(ns), joint_names=list(names),
                                                       points=[point, later])
        return (topic, 'trajectory_msgs/msg/JointTrajectory', bag_ns, msg)
    if kind in ('position', 'velocity'):
        other = values - 50
        msg = T['sensor_msgs/msg/JointState'](
            header=header(ns), name=list(names), position=values if kind == 'position' else other,
            velocity=values if kind == 'velocity' else other, effort=empty)
        return (topic, 'sensor_msgs/msg/JointState', bag_ns, msg)
    msgtype = 'std_msgs/msg/Float64MultiArray' if kind == 'float64' else 'std_msgs/msg/Float32MultiArray'
    layout = T['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0)
    msg = T[msgtype](layout=layout, data=values if kind == 'float64' else values.astype(np.float32))
    return (topic, msgtype, bag_ns, msg)


def action_value(k):
    return [k + 0.25, -k - 0.5, 0.125 * k]


def lockstep_records(image_kind='raw', action_kind='trajectory', ticks=10, switch=6, state=True, actions=True):
    """Writer-like recording at 10 Hz: observation k and action k share stamp T0 + k*100 ms.
    Instruction 'pick up the red block' from tick 0 (repeated at 3), 'stack the blue block' from `switch`."""
    records = []
    for k in range(ticks):
        stamp = T0 + k * 100 * MS
        records.append(image_record(stamp, frame(k), image_kind, bag_ns=stamp + 2 * MS))
        if state:
            records.append(vector_record(stamp, [k, -k], 'position', names=['j0', 'j1'], topic='/joint_states',
                                         bag_ns=stamp + 1 * MS))
        if actions:
            records.append(vector_record(stamp, action_value(k), action_kind, bag_ns=stamp + 3 * MS))
    for k, text in ((0, 'pick up the red block'), (3, 'pick up the red block'),
                    (switch, 'stack the blue block'), (switch + 2, 'stack the blue block')):
        records.append(instruction_record(T0 + k * 100 * MS, text))
    return records


STATE_MAP = TopicMap(state='/joint_states')


# ---- reading: formats, image kinds, action types ------------------------------------------------

@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('image_kind', ['raw', 'png', 'jpeg'])
def test_lockstep_episodes(tmp_path, storage, image_kind):
    bag = write_bag(tmp_path / 'bag', storage, lockstep_records(image_kind))
    episodes = read_episodes(bag, STATE_MAP, rate_hz=10)
    assert [e.instruction for e in episodes] == ['pick up the red block', 'stack the blue block']
    for episode, ks in zip(episodes, (range(0, 6), range(6, 10))):
        ks = list(ks)
        assert isinstance(episode, Episode) and len(episode) == len(ks)
        assert episode.bag_path == str(bag)
        assert episode.stamps_ns.dtype == np.int64
        np.testing.assert_array_equal(episode.stamps_ns, [T0 + k * 100 * MS for k in ks])
        assert episode.images.shape == (len(ks), H, W, 3) and episode.images.dtype == np.uint8
        expected_images = np.stack([frame(k) for k in ks])
        tolerance = 3 if image_kind == 'jpeg' else 0
        assert np.abs(episode.images.astype(int) - expected_images).max() <= tolerance
        assert episode.actions.dtype == np.float32 and episode.actions.shape == (len(ks), 3)
        np.testing.assert_allclose(episode.actions, [action_value(k) for k in ks])
        np.testing.assert_array_equal(episode.states, [[k, -k] for k in ks])
        assert episode.action_names == ACTION_NAMES and episode.state_names == ['j0', 'j1']
        assert episode.stats['ticks'] == len(ks)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('action_kind', ['trajectory', 'position', 'velocity', 'float32', 'float64'])
def test_each_action_message_type(tmp_path, storage, action_kind):
    bag = write_bag(tmp_path / 'bag', storage, lockstep_records('raw', action_kind, state=False))
    field = 'velocity' if action_kind == 'velocity' else 'position'
    episodes = read_episodes(bag, TopicMap(action_field=field), rate_hz=10)
    actions = np.concatenate([e.actions for e in episodes])
    np.testing.assert_allclose(actions, [action_value(k) for k in range(10)], rtol=1e-6)
    expected_names = ['dim_0', 'dim_1', 'dim_2'] if action_kind.startswith('float') else ACTION_NAMES
    assert episodes[0].action_names == expected_names
    assert episodes[0].states is None and episodes[0].state_names == []


def test_single_mcap_file_and_list_topics(tmp_path):
    bag = write_bag(tmp_path / 'bag', 'mcap', lockstep_records('png'))
    mcap_file = next(bag.glob('*.mcap'))
    assert list_topics(mcap_file) == {
        '/camera/image_raw/compressed': 'sensor_msgs/msg/CompressedImage',
        '/joint_states': 'sensor_msgs/msg/JointState',
        '/joint_command': 'trajectory_msgs/msg/JointTrajectory', '/instruction': 'std_msgs/msg/String'}
    episodes = read_episodes(mcap_file, STATE_MAP, rate_hz=10)
    assert [len(e) for e in episodes] == [6, 4]


# ---- alignment against an independent brute-force computation ----------------------------------

def brute_force(segments, images, states, actions, rate_hz):
    """Per segment: tick list, picked image/state/action indices, straight from the documented rule."""
    period = 1e9 / rate_hz
    half = int(period // 2)
    out = []
    for start, end in segments:
        acts = [s for s in actions if s >= start - half and (end is None or s < end)]
        last = min(max(images), max(states), max(acts))
        t0 = max(start, min(images), min(states))
        ticks, k = [], 0
        while True:
            t = t0 + round(k * period)
            if t > last + half or (end is not None and t >= end):
                break
            ticks.append(t)
            k += 1

        def latest(stamps, t, lo=None, hi=None):
            ok = [i for i, s in enumerate(stamps)
                  if s <= t + half and (lo is None or s >= lo) and (hi is None or s < hi)]
            return max(ok, key=lambda i: stamps[i]) if ok else None

        rows = [(t, latest(images, t), latest(states, t), latest(actions, t, start - half, end)) for t in ticks]
        out.append([r for r in rows if r[3] is not None])
    return out


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_alignment_with_jitter_and_reordering(tmp_path, storage):
    # images 30 Hz with jitter, received out of stamp order (alternating 2 ms / 40 ms delay)
    images = [T0 + 10 * MS + round(i * 1e9 / 30) + ((i * 7) % 5 - 2) * MS for i in range(78)]
    states = [T0 - 5 * MS + i * 20 * MS for i in range(180)]  # 50 Hz
    actions = [T0 + 50 * MS + k * 100 * MS for k in range(26)]  # 10 Hz, other phase
    records = [image_record(s, frame(i), 'raw', bag_ns=s + (40 if i % 2 else 2) * MS) for i, s in enumerate(images)]
    records += [vector_record(s, [i, 0.5], 'position', names=['j0', 'j1'], topic='/joint_states')
                for i, s in enumerate(states)]
    records += [vector_record(s, [k, 2 * k, -k], 'float32') for k, s in enumerate(actions)]
    instructions = [(0, 'pick'), (900, 'pick'), (1550, 'place'), (2000, 'place')]
    records += [instruction_record(T0 + ms * MS, text) for ms, text in instructions]
    bag = write_bag(tmp_path / 'bag', storage, records)

    episodes = read_episodes(bag, STATE_MAP, rate_hz=10)
    expected = brute_force([(T0, T0 + 1550 * MS), (T0 + 1550 * MS, None)], images, states, actions, 10)
    assert [e.instruction for e in episodes] == ['pick', 'place']
    for episode, rows in zip(episodes, expected):
        assert len(rows) > 5
        np.testing.assert_array_equal(episode.stamps_ns, [r[0] for r in rows])
        np.testing.assert_array_equal(episode.images[:, 0, 0, 0], [r[1] % 256 for r in rows])
        np.testing.assert_array_equal(episode.states[:, 0], [r[2] for r in rows])
        np.testing.assert_array_equal(episode.actions[:, 0], [r[3] for r in rows])
    # the first 'place' tick is the instruction change itself, and takes the action stamped there
    assert episodes[1].stamps_ns[0] == T0 + 1550 * MS and episodes[1].actions[0, 0] == 15


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_actions_do_not_cross_instruction_boundaries(tmp_path, storage):
    """Images at 10 Hz (image k at k*100 ms). Expected values below are worked out by hand."""
    def bag(name, change_ms, second_actions_ms):
        records = [image_record(T0 + k * 100 * MS, frame(k), 'raw') for k in range(12)]
        records += [vector_record(T0 + k * 100 * MS, [k, 0, 0], 'float32') for k in range(6)]  # 0..500 ms
        records += [vector_record(T0 + ms * MS, [10 + j, 0, 0], 'float32') for j, ms in enumerate(second_actions_ms)]
        records += [instruction_record(T0, 'A'), instruction_record(T0 + change_ms * MS, 'B')]
        return read_episodes(write_bag(tmp_path / name, storage, records), rate_hz=10)

    def ms(episode):
        return list((episode.stamps_ns - T0) // MS)

    # 'B' at 520 ms, its first action at 530 ms: A's last tick (500) must not take it
    a, b = bag('late_change', 520, range(530, 1031, 100))
    assert ms(a) == [0, 100, 200, 300, 400, 500] and list(a.actions[:, 0]) == [0, 1, 2, 3, 4, 5]
    assert ms(b) == [520, 620, 720, 820, 920, 1020] and list(b.actions[:, 0]) == [10, 11, 12, 13, 14, 15]
    assert list(b.images[:, 0, 0, 0]) == [5, 6, 7, 8, 9, 10]
    # 'B' at 560 ms, its first action at 630 ms: B's first tick (560) has no action of its own -> dropped
    a, b = bag('early_change', 560, range(630, 1031, 100))
    assert ms(a) == [0, 100, 200, 300, 400, 500]
    assert ms(b) == [660, 760, 860, 960, 1060] and list(b.actions[:, 0]) == [10, 11, 12, 13, 14]
    assert list(b.images[:, 0, 0, 0]) == [7, 8, 9, 10, 11]
    assert b.stats['dropped_no_action'] == 1 and b.stats['ticks_total'] == 6


def test_nan_action_ticks_are_dropped_and_counted(tmp_path, caplog):
    records = lockstep_records('raw', 'float32')
    for i, record in enumerate(records):
        if record[0] == '/joint_command' and record[3].data[0] == 2.25:  # tick 2
            records[i] = vector_record(T0 + 200 * MS, [np.nan, 0, 0], 'float32', bag_ns=record[2])
    bag = write_bag(tmp_path / 'bag', 'mcap', records)
    with caplog.at_level(logging.WARNING, logger='blockvla_ros.io.bag_reader'):
        episodes = read_episodes(bag, STATE_MAP, rate_hz=10)
    first = episodes[0]
    assert first.stats['dropped_nan_action'] == 1 and first.stats['ticks'] == 5 and first.stats['ticks_total'] == 6
    np.testing.assert_array_equal(first.stamps_ns, [T0 + k * 100 * MS for k in (0, 1, 3, 4, 5)])
    np.testing.assert_array_equal(first.images[:, 0, 0, 0], [0, 1, 3, 4, 5])
    assert np.isfinite(first.actions).all()
    assert 'dropped_nan_action' in caplog.text and str(bag) in caplog.text


def test_empty_instruction_separates_identical_tasks(tmp_path):
    records = [r for r in lockstep_records(state=False) if r[0] != '/instruction']
    records += [instruction_record(T0, 'pick'), instruction_record(T0 + 300 * MS, ''),
                instruction_record(T0 + 400 * MS, 'pick')]
    episodes = read_episodes(write_bag(tmp_path / 'bag', 'sqlite3', records), rate_hz=10)
    assert [e.instruction for e in episodes] == ['pick', 'pick']
    assert [len(e) for e in episodes] == [3, 6]


def test_sim_time_headers_need_bag_time(tmp_path, caplog):
    """Header stamps in sim time (5 s + ...) but bag times in wall time: the header-less instruction
    cannot be placed among the images unless everything uses bag time."""
    sim0 = 5 * 10**9
    records = []
    for k in range(10):
        wall, sim = T0 + k * 100 * MS, sim0 + k * 100 * MS
        records.append(image_record(sim, frame(k), 'raw', bag_ns=wall))
        records.append(vector_record(sim, action_value(k), 'trajectory', bag_ns=wall))
    records.append(instruction_record(T0, 'pick'))
    bag = write_bag(tmp_path / 'bag', 'mcap', records)
    with caplog.at_level(logging.WARNING, logger='blockvla_ros.io.bag_reader'):
        assert read_episodes(bag, rate_hz=10) == []
    assert 'use_header_stamps=False' in caplog.text
    (episode,) = read_episodes(bag, rate_hz=10, use_header_stamps=False)
    np.testing.assert_array_equal(episode.stamps_ns, [T0 + k * 100 * MS for k in range(10)])
    np.testing.assert_allclose(episode.actions, [action_value(k) for k in range(10)])


def test_bag_without_actions(tmp_path):
    bag = write_bag(tmp_path / 'bag', 'mcap', lockstep_records('jpeg', actions=False))
    with pytest.raises(BagError, match=r"action topic '/joint_command' is not in the bag") as info:
        read_episodes(bag, STATE_MAP)
    message = str(info.value)
    assert str(bag) in message and '/joint_states [sensor_msgs/msg/JointState]' in message
    assert '/camera/image_raw/compressed [sensor_msgs/msg/CompressedImage]' in message
    episodes = read_episodes(bag, STATE_MAP, rate_hz=10, require_actions=False)
    assert [len(e) for e in episodes] == [6, 4]
    assert all(e.actions is None and e.action_names == [] for e in episodes)
    np.testing.assert_array_equal(episodes[1].states[:, 0], [6, 7, 8, 9])


# ---- errors name the file and the problem -------------------------------------------------------

@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_truncated_and_corrupt_bags(tmp_path, storage):
    bag = write_bag(tmp_path / 'bag', storage, lockstep_records())
    data_file = next(f for f in bag.iterdir() if f.name != 'metadata.yaml')
    data = data_file.read_bytes()
    data_file.write_bytes(data[:len(data) // 2])
    with pytest.raises(BagError, match='corrupt or truncated') as info:
        read_episodes(bag)
    assert str(bag) in str(info.value)
    data_file.write_bytes(b'')
    with pytest.raises(BagError, match=str(bag)):
        list_topics(bag)


def test_garbage_and_non_bags(tmp_path):
    garbage = tmp_path / 'garbage.mcap'
    garbage.write_bytes(b'this is not an mcap file' * 10)
    with pytest.raises(BagError, match=f'{garbage}: cannot open bag'):
        read_episodes(garbage)
    text = tmp_path / 'notes.txt'
    text.write_text('hello')
    with pytest.raises(BagError, match=f'{text}: not a rosbag2 bag'):
        read_episodes(text)
    with pytest.raises(BagError, match=f'{tmp_path}: not a rosbag2 bag.*also take a directory of bags'):
        read_episodes(tmp_path)
    with pytest.raises(BagError, match='does not exist'):
        read_episodes(tmp_path / 'missing')
    bag = write_bag(tmp_path / 'bag', 'sqlite3', lockstep_records())
    (bag / 'metadata.yaml').unlink()
    with pytest.raises(BagError, match='no metadata.yaml.*reindex'):
        read_episodes(bag)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_empty_bag(tmp_path, storage):
    path = tmp_path / 'empty'
    with Writer(path, version=9, storage_plugin=STORAGES[storage]) as writer:
        writer.add_connection('/camera/image_raw', 'sensor_msgs/msg/Image', typestore=TS)
    with pytest.raises(BagError, match=f'{path}: bag is empty'):
        read_episodes(path)


def test_mapped_topic_problems(tmp_path):
    bag = write_bag(tmp_path / 'bag', 'mcap', lockstep_records(state=False))
    missing = r"state topic '/joint_states' is not in the bag.*/instruction \[std_msgs/msg/String\]"
    with pytest.raises(BagError, match=missing):
        read_episodes(bag, STATE_MAP)
    with pytest.raises(BagError, match=r"image topic '/cam' is not in the bag") as info:
        read_episodes(bag, TopicMap(image='/cam'))
    assert 'data.topics.image' in str(info.value) and '--image-topic' in str(info.value)  # where to map it
    with pytest.raises(BagError, match=r"action topic '/instruction' has type std_msgs/msg/String"):
        read_episodes(bag, TopicMap(action='/instruction'))
    with pytest.raises(BagError, match=f"{bag}: action topic '/joint_command' has width 3, expected 7"):
        read_episodes(bag, action_dim=7)
    assert len(read_episodes(bag, action_dim=3)) == 2
    with pytest.raises(ValueError, match='action_field'):
        TopicMap(action_field='effort')


def two_joint_state_publishers() -> list:
    """Lock-step records without a state, plus /joint_states from two publishers each tick: a gripper's 'finger'
    (= -k) 30 ms before an arm's 'j0', 'j1' (= k, 2k)."""
    records = lockstep_records(state=False)
    for k in range(10):
        stamp = T0 + k * 100 * MS
        records.append(vector_record(stamp - 30 * MS, [-k], 'position', names=['finger'], topic='/joint_states'))
        records.append(vector_record(stamp - 5 * MS, [k, 2 * k], 'position', names=['j0', 'j1'],
                                     topic='/joint_states'))
    return records


def test_joint_states_of_several_publishers_are_merged_by_name(tmp_path):
    """An arm driver and a gripper driver both publishing /joint_states, each its own joints (the node merges them by
    name too); the bag was refused ('state names change within the bag')."""
    records = two_joint_state_publishers()
    bag = write_bag(tmp_path / 'bag', 'mcap', records)
    episodes = read_episodes(bag, STATE_MAP)
    assert [len(ep) for ep in episodes] == [6, 4] and episodes[0].state_names == ['finger', 'j0', 'j1']
    states = np.concatenate([ep.states for ep in episodes])
    np.testing.assert_array_equal(states, [[-k, k, 2 * k] for k in range(10)])
    records.append(vector_record(T0 + 420 * MS, [1.0, 2.0], 'position', names=['finger'], topic='/joint_states'))
    bag = write_bag(tmp_path / 'bad', 'mcap', records)  # a JointState whose names and positions differ in length
    with pytest.raises(BagError, match='2 positions for 1 names'):
        read_episodes(bag, STATE_MAP)


def test_state_names_pick_joints_of_the_joint_states_by_name(tmp_path):
    """A policy reading 2 of the 3 joints two publishers share on /joint_states, in its own order: the state waits
    only for those joints, and a name the topic lacks is an error naming the joints it has."""
    records = two_joint_state_publishers()
    bag = write_bag(tmp_path / 'bag', 'mcap', records)
    episodes = read_episodes(bag, STATE_MAP, state_names=['j1', 'j0'])
    assert episodes[0].state_names == ['j1', 'j0']
    np.testing.assert_array_equal(np.concatenate([ep.states for ep in episodes]), [[2 * k, k] for k in range(10)])
    with pytest.raises(BagError, match=r"\['wrist'\].*'/joint_states'.*\['finger', 'j0', 'j1'\]"):
        read_episodes(bag, STATE_MAP, state_names=['j0', 'wrist'])


def test_action_width_change_within_bag(tmp_path):
    records = lockstep_records('raw', 'float32', state=False)
    records.append(vector_record(T0 + 450 * MS, [1.0, 2.0, 3.0, 4.0], 'float32'))
    bag = write_bag(tmp_path / 'bag', 'sqlite3', records)
    with pytest.raises(BagError, match=f'{bag}: action width changes within the bag.*3 at stamp.*4 at stamp'):
        read_episodes(bag)


def test_broken_image_names_topic_and_stamp(tmp_path):
    records = lockstep_records('raw', state=False)
    bad = T['sensor_msgs/msg/Image'](header=header(T0), height=H, width=W, encoding='yuv422', is_bigendian=0,
                                     step=W * 2, data=np.zeros(H * W * 2, np.uint8))
    records = [r for r in records if not (r[0] == '/camera/image_raw' and r[3].header.stamp.nanosec == T0 % 10**9
                                          and r[3].header.stamp.sec == T0 // 10**9)]
    records.append(('/camera/image_raw', 'sensor_msgs/msg/Image', T0, bad))
    bag = write_bag(tmp_path / 'bag', 'mcap', records)
    with pytest.raises(BagError, match=f"{bag}: image on /camera/image_raw at stamp {T0} ns: unknown image encoding"):
        read_episodes(bag)
    with pytest.raises(BagError, match='too large'):
        read_episodes(write_bag(tmp_path / 'bag2', 'mcap', lockstep_records(state=False)), max_pixels=H * W - 1)
    records = lockstep_records(state=False)
    records.append(image_record(T0 + 350 * MS, np.zeros((H + 2, W, 3), np.uint8), 'raw'))
    with pytest.raises(BagError, match=rf'at stamp {T0 + 350 * MS} ns: size \(8, 8, 3\) differs'):
        read_episodes(write_bag(tmp_path / 'bag3', 'sqlite3', records))


# ---- datasets -----------------------------------------------------------------------------------

def test_iter_bag_paths(tmp_path, caplog):
    root = tmp_path / 'dataset'
    write_bag(root / 'b_bag', 'sqlite3', lockstep_records())
    single = write_bag(tmp_path / 'tmp_a', 'mcap', lockstep_records())
    shutil.move(next(single.glob('*.mcap')), root / 'a_single.mcap')
    write_bag(root / 'nested' / 'c_bag', 'mcap', lockstep_records())
    broken = write_bag(root / 'd_broken', 'sqlite3', lockstep_records())
    (broken / 'metadata.yaml').unlink()
    (root / 'README.txt').write_text('not a bag')
    with caplog.at_level(logging.WARNING):
        paths = list(iter_bag_paths(root))
    assert paths == [root / 'a_single.mcap', root / 'b_bag', root / 'nested' / 'c_bag']
    assert 'd_broken' in caplog.text and 'reindex' in caplog.text
    assert list(iter_bag_paths(root / 'b_bag')) == [root / 'b_bag']
    assert sum(len(read_episodes(p, STATE_MAP)) for p in paths) == 6
    (tmp_path / 'void').mkdir()
    with pytest.raises(BagError, match='no rosbag2 recordings found'):
        list(iter_bag_paths(tmp_path / 'void'))
    (tmp_path / 'void' / 'lab.bag').write_bytes(b'#ROSBAG V2.0\n')  # ROS 1 recordings: say how to convert them
    for path in (tmp_path / 'void', tmp_path / 'void' / 'lab.bag'):
        with pytest.raises(BagError, match='ROS 1') as info:
            list(iter_bag_paths(path))
        assert 'rosbags-convert --src' in str(info.value) and 'lab.bag' in str(info.value)


def test_importing_io_loads_no_rclpy():
    code = ('import sys, blockvla_ros.io.bag_reader, blockvla_ros.io.images; '
            'bad = [m for m in sys.modules if m.startswith("rclpy") or m.endswith("_msgs")]; '
            'assert not bad, bad')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_empty_action_topic_without_required_actions_gives_episodes_without_actions(tmp_path):
    """A bag whose action topic exists but holds nothing replays like a bag without the topic."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from blockvla_ros.io.bag_reader import BagError, TopicMap, read_episodes

    ts = get_typestore(Stores.ROS2_HUMBLE)
    Image, String = ts.types['sensor_msgs/msg/Image'], ts.types['std_msgs/msg/String']
    JT = ts.types['trajectory_msgs/msg/JointTrajectory']
    Header, Time = ts.types['std_msgs/msg/Header'], ts.types['builtin_interfaces/msg/Time']
    path = tmp_path / 'no_actions'
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        img = w.add_connection('/camera/image_raw', Image.__msgtype__, typestore=ts)
        ins = w.add_connection('/instruction', String.__msgtype__, typestore=ts)
        w.add_connection('/joint_command', JT.__msgtype__, typestore=ts)
        for i in range(5):
            t = 1_000_000_000 + i * 100_000_000
            msg = Image(header=Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id='cam'), height=4,
                        width=4, encoding='rgb8', is_bigendian=0, step=12, data=np.full(48, i, np.uint8))
            w.write(img, t, ts.serialize_cdr(msg, Image.__msgtype__))
            if i == 0:
                w.write(ins, t, ts.serialize_cdr(String(data='touch red'), String.__msgtype__))
    episodes = read_episodes(path, TopicMap(), 10.0, require_actions=False)
    assert len(episodes) == 1 and episodes[0].actions is None and len(episodes[0].images) == 5
    with pytest.raises(BagError, match='has no messages'):
        read_episodes(path, TopicMap(), 10.0)
