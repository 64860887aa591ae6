"""record_episode: the tick loop and ending shared by the tabletop and Meta-World recorders (real rosbag2 files)."""
import numpy as np
import pytest
import yaml
from rosbags.highlevel import AnyReader

from blockvla_ros.io.bag_writer import RecordingWriter
from blockvla_ros.io.episode_recording import INSTRUCTION_PERIOD_NS, RECORDING_START_NS, record_episode

STATE_NAMES = ['ee_x', 'ee_y']
ACTION_NAMES = ['ee_dx', 'ee_dy', 'gripper']
STEP_NS = 400_000_000   # 2.5 Hz: the instruction is re-sent every third tick (0, 1.2 s, 2.4 s)


def _ticks(n, outcome):
    image = np.zeros((8, 8, 3), np.uint8)
    for k in range(n):
        outcome['steps'] = k + 1
        yield 'touch the red block', image, np.array([0.1 * k, 0.2]), np.array([0.0, 0.1, float(k % 2)])


def _topic_stamps(path):
    out = {}
    with AnyReader([path]) as reader:
        for conn, t, _ in reader.messages():
            out.setdefault(conn.topic, []).append(t)
    return out, yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']


def test_a_successful_episode_is_one_bag_with_stamped_ticks_and_metadata_read_after_the_last_tick(tmp_path):
    outcome = {}
    path = record_episode(RecordingWriter(tmp_path / 'ep'), _ticks(7, outcome), STEP_NS, STATE_NAMES, ACTION_NAMES,
                          lambda: {'steps': outcome['steps'], 'task': 'touch_red'}, lambda: True)
    assert path == tmp_path / 'ep' and path.is_dir()
    stamps, meta = _topic_stamps(path)
    ticks = [RECORDING_START_NS + k * STEP_NS for k in range(7)]
    assert stamps['/camera/image_raw'] == ticks and stamps['/joint_states'] == ticks
    assert stamps['/instruction'] == [t for t in ticks if (t - RECORDING_START_NS) % (3 * STEP_NS) == 0]
    assert 3 * STEP_NS >= INSTRUCTION_PERIOD_NS > 2 * STEP_NS
    custom = meta['custom_data']
    assert custom['blockvla.steps'] == '7' and custom['blockvla.task'] == 'touch_red'


def test_a_failed_episode_or_an_exception_leaves_nothing(tmp_path):
    assert record_episode(RecordingWriter(tmp_path / 'failed'), _ticks(3, {}), STEP_NS, STATE_NAMES, ACTION_NAMES,
                          dict, lambda: False) is None

    def broken():
        yield from _ticks(2, {})
        raise RuntimeError('simulator died')
    with pytest.raises(RuntimeError, match='simulator died'):
        record_episode(RecordingWriter(tmp_path / 'broken'), broken(), STEP_NS, STATE_NAMES, ACTION_NAMES,
                       dict, lambda: True)
    assert list(tmp_path.iterdir()) == []
