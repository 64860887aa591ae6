"""The one post-processing step between the decoder and a robot, the true hold, and the trajectory mapping."""
import numpy as np
import pytest

from blockvla_ros.runtime.action_output import ActionLimits, TrajectoryMap, hold_action, postprocess_chunk

NAMES = ['ee_dx', 'ee_dy', 'gripper']
KINDS = ['delta', 'delta', 'absolute']


def test_limits_clip_the_free_rows_and_count_real_clips():
    limits = ActionLimits.parse([-0.5, -0.5, 0.0], [0.5, 0.5, 1.0], NAMES)
    chunk = np.array([[0.9, 0.0, 0.5], [0.1, -0.7, 1.5], [0.2, 0.3, 0.4]], np.float32)  # [H=3, D=3]
    out, clipped = postprocess_chunk(chunk, known=1, limits=limits)
    assert clipped == 2  # -0.7 and 1.5; row 0 is already committed and passes unchanged
    assert out[0].tolist() == pytest.approx([0.9, 0.0, 0.5])
    assert out[1].tolist() == pytest.approx([0.1, -0.5, 1.0]) and out[2].tolist() == pytest.approx([0.2, 0.3, 0.4])
    assert postprocess_chunk(chunk, 0, None)[1] == 0
    assert chunk[1, 1] == pytest.approx(-0.7)  # the input is not modified


@pytest.mark.parametrize('lower, upper, message', [
    ([-1, -1], [1, 1, 1], 'one lower and one upper value per action'),
    ([1, -1, 0], [-1, 1, 1], "['ee_dx']"),
    ([float('nan'), -1, 0], [1, 1, 1], 'not finite'),
    ([-1e400, -1, 0], [1, 1, 1], 'not finite'),
])
def test_bad_limits_are_refused_with_a_reason(lower, upper, message):
    with pytest.raises(ValueError, match=message.replace('[', r'\[').replace(']', r'\]')):
        ActionLimits.parse(lower, upper, NAMES)
    assert ActionLimits.parse([], [], NAMES) is None


def test_a_hold_stops_deltas_and_keeps_absolute_targets():
    assert hold_action(np.array([0.3, -0.2, 1.0]), KINDS).tolist() == [0.0, 0.0, 1.0]
    assert hold_action(np.array([0.3, -0.2]), ['absolute', 'absolute']).tolist() == pytest.approx([0.3, -0.2])


def test_trajectory_carries_absolute_targets_under_the_robot_joint_names():
    off = TrajectoryMap.build(NAMES, KINDS, [])
    assert not off.enabled and 'ee_dx' in off.off_reason
    grip = TrajectoryMap.build(NAMES, KINDS, ['gripper = finger_joint'])
    assert grip.indices == (2,) and grip.joint_names == ('finger_joint',)
    joints = TrajectoryMap.build(['j0', 'j1'], ['absolute', 'absolute'], [])
    assert joints.indices == (0, 1) and joints.joint_names == ('j0', 'j1')
    for mapping, message in ((['ee_dx=shoulder'], 'delta'), (['elbow=elbow_joint'], 'not one of'),
                             (['gripper'], 'is not'), (['gripper=a', 'gripper=b'], 'twice')):
        with pytest.raises(ValueError, match=message):
            TrajectoryMap.build(NAMES, KINDS, mapping)
