"""Issue 13 item 11: rosbag2 folders written by other tools are read, and what looks wrong is warned about.

The fixtures are written with the `mcap` + `mcap-ros2-support` libraries (not rosbags): their channels carry no QoS
metadata and their channel ids follow write order, next to a metadata.yaml laid out as `ros2 bag` (Jazzy/Kilted,
version 9) writes it, with the QoS list and type hashes. rosbags' directory reader read such a bag as empty.
"""
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from mcap_ros2.writer import Writer
from rosbags.typesys import Stores, get_typestore

from blockvla_ros.io.bag_reader import TopicMap, list_topics, read_episodes

TS = get_typestore(Stores.LATEST)
T0 = 1_700_000_000 * 10**9
MS = 10**6
H, W = 6, 8
TYPES = {'/camera/image_raw': 'sensor_msgs/msg/Image', '/joint_command': 'sensor_msgs/msg/JointState',
         '/instruction': 'std_msgs/msg/String'}
QOS = [{'history': 'keep_last', 'depth': 10, 'reliability': 'reliable', 'durability': 'volatile',
        'deadline': {'sec': 9223372036, 'nsec': 854775807}, 'lifespan': {'sec': 9223372036, 'nsec': 854775807},
        'liveliness': 'automatic', 'liveliness_lease_duration': {'sec': 9223372036, 'nsec': 854775807},
        'avoid_ros_namespace_conventions': False}]


def _stamp(ns):
    return {'sec': ns // 10**9, 'nanosec': ns % 10**9}


def write_foreign_bag(path: Path, records, metadata_counts=None) -> Path:
    """records: (topic, stamp_ns, payload) with payload an RGB frame, an action vector or an instruction text.
    Written by mcap_ros2 in the given order (log time = header stamp); metadata.yaml as ros2 bag writes it."""
    path.mkdir(parents=True)
    counts = {t: 0 for t in TYPES}
    with open(path / 'recording_0.mcap', 'wb') as f:
        writer = Writer(f)
        order = ['/instruction', '/joint_command', '/camera/image_raw']  # channel ids unlike metadata.yaml's order
        schemas = {t: writer.register_msgdef(TYPES[t], TS.generate_msgdef(TYPES[t], ros_version=2)[0]) for t in order}
        for topic, ns, payload in records:
            if topic == '/camera/image_raw':
                msg = {'header': {'stamp': _stamp(ns), 'frame_id': 'cam'}, 'height': H, 'width': W, 'encoding': 'rgb8',
                       'is_bigendian': 0, 'step': W * 3, 'data': payload.tobytes()}
            elif topic == '/joint_command':
                msg = {'header': {'stamp': _stamp(ns), 'frame_id': ''}, 'name': ['a', 'b'],
                       'position': [float(x) for x in payload], 'velocity': [], 'effort': []}
            else:
                msg = {'data': payload}
            writer.write_message(topic, schemas[topic], msg, log_time=ns, publish_time=ns)
            counts[topic] += 1
        writer.finish()
    counts.update(metadata_counts or {})
    stamps = [ns for _, ns, _ in records]
    n = sum(counts.values())
    info = {
        'version': 9, 'storage_identifier': 'mcap', 'duration': {'nanoseconds': max(stamps) - min(stamps)},
        'starting_time': {'nanoseconds_since_epoch': min(stamps)}, 'message_count': n,
        'topics_with_message_count': [
            {'topic_metadata': {'name': t, 'type': m, 'serialization_format': 'cdr', 'offered_qos_profiles': QOS,
                                'type_description_hash': TS.hash_rihs01(m)}, 'message_count': counts[t]}
            for t, m in TYPES.items()],
        'compression_format': '', 'compression_mode': '', 'relative_file_paths': ['recording_0.mcap'],
        'files': [{'path': 'recording_0.mcap', 'starting_time': {'nanoseconds_since_epoch': min(stamps)},
                   'duration': {'nanoseconds': max(stamps) - min(stamps)}, 'message_count': n}],
        'custom_data': None, 'ros_distro': 'kilted'}
    (path / 'metadata.yaml').write_text(yaml.safe_dump({'rosbag2_bagfile_information': info}, sort_keys=False))
    return path


def frame(k):
    return np.full((H, W, 3), k % 256, np.uint8)


def episode_records(start_ns, ticks, text, first=0):
    """10 Hz: image k, action k = [k, -k] at start + k*100 ms; the instruction at the start."""
    records = [('/instruction', start_ns, text)]
    for k in range(ticks):
        ns = start_ns + k * 100 * MS
        records += [('/camera/image_raw', ns, frame(first + k)), ('/joint_command', ns, [first + k, -(first + k)])]
    return records


ACTIONS = TopicMap(action='/joint_command')


def test_mcap_written_by_another_library_is_read(tmp_path):
    bag = write_foreign_bag(tmp_path / 'bag', episode_records(T0, 12, 'pick up the red block'))
    assert list_topics(bag) == TYPES
    (episode,) = read_episodes(bag, ACTIONS, rate_hz=10)
    assert episode.instruction == 'pick up the red block' and len(episode) == 12
    np.testing.assert_array_equal(episode.actions[:, 0], np.arange(12))
    np.testing.assert_array_equal(episode.images[:, 0, 0, 0], np.arange(12))


def test_metadata_counts_that_disagree_with_the_files_are_warned_about(tmp_path, caplog):
    bag = write_foreign_bag(tmp_path / 'bag', episode_records(T0, 12, 'pick up the red block'),
                            metadata_counts={'/joint_command': 0})
    with caplog.at_level(logging.WARNING):
        (episode,) = read_episodes(bag, ACTIONS, rate_hz=10)
    assert len(episode) == 12
    assert "disagree on message counts (topic: listed, found): {'/joint_command': (0, 12)}" in caplog.text


def test_stamps_out_of_order_between_episodes_warn_instead_of_stretching(tmp_path, caplog):
    """Episode 2's first action is stamped 30 ms before its instruction (the instruction has no header: bag time),
    after an 8 s pause. It falls inside episode 1's segment, which used to stretch episode 1 over the pause,
    repeating its last image and action for ~80 ticks."""
    second = T0 + 9 * 10**9
    records = episode_records(T0, 10, 'pick up the red block')
    records += episode_records(second, 10, 'stack the blue block', first=100)
    records.append(('/joint_command', second - 30 * MS, [100, -100]))
    bag = write_foreign_bag(tmp_path / 'bag', records)
    with caplog.at_level(logging.WARNING):
        first_ep, second_ep = read_episodes(bag, ACTIONS, rate_hz=10)
    assert len(first_ep) == 10 and len(second_ep) == 10  # not 10 + ~80 repeated ticks
    np.testing.assert_array_equal(first_ep.images[:, 0, 0, 0], np.arange(10))
    assert first_ep.stats['dropped_stale_image'] > 70
    assert "segment 'pick up the red block'" in caplog.text and 'after a gap of more than 1 s' in caplog.text
    assert 'stamps out of order' in caplog.text
    with pytest.raises(ValueError):
        read_episodes(bag, ACTIONS, rate_hz=0)
