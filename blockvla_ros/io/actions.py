"""Action / proprio-state messages -> float vectors, and message stamps. Duck-typed, ROS-free.

Supported (rclpy or rosbags messages):
    trajectory_msgs/msg/JointTrajectory  first point's ``positions``; names = ``joint_names``
    sensor_msgs/msg/JointState           ``position`` (or ``velocity``); names = ``name``
    std_msgs/msg/Float32MultiArray       ``data``; names = ``dim_0 .. dim_{D-1}``
    std_msgs/msg/Float64MultiArray       same
"""
from __future__ import annotations

from typing import Any

import numpy as np

JOINT_TRAJECTORY = 'trajectory_msgs/msg/JointTrajectory'
JOINT_STATE = 'sensor_msgs/msg/JointState'
FLOAT32_ARRAY = 'std_msgs/msg/Float32MultiArray'
FLOAT64_ARRAY = 'std_msgs/msg/Float64MultiArray'
VECTOR_TYPES = (JOINT_TRAJECTORY, JOINT_STATE, FLOAT32_ARRAY, FLOAT64_ARRAY)
JOINT_STATE_FIELDS = ('position', 'velocity')


def generic_names(width: int) -> list[str]:
    """Names for vectors whose message carries none (``dim_0`` ...)."""
    return [f'dim_{i}' for i in range(width)]


def vector_from_message(msg: Any, msgtype: str, field: str = 'position') -> tuple[np.ndarray | None, list[str]]:
    """(float32 [D] vector, names) from one message; vector is None when the message holds none.

    A JointTrajectory without points, or a JointState whose ``field`` array is empty, holds none
    (e.g. a "hold" command). ``field`` ('position' | 'velocity') only applies to JointState.
    """
    if msgtype == JOINT_TRAJECTORY:
        points = list(msg.points)
        if not points:
            return None, list(msg.joint_names)
        values, names = points[0].positions, list(msg.joint_names)
    elif msgtype == JOINT_STATE:
        if field not in JOINT_STATE_FIELDS:
            raise ValueError(f'JointState field must be one of {JOINT_STATE_FIELDS}, got {field!r}')
        values, names = getattr(msg, field), list(msg.name)
    elif msgtype in (FLOAT32_ARRAY, FLOAT64_ARRAY):
        values, names = msg.data, []
    else:
        raise ValueError(f'unsupported action/state message type {msgtype!r}; supported: {", ".join(VECTOR_TYPES)}')
    vector = np.asarray(values, dtype=np.float32).reshape(-1)  # float64 sequence -> [D] float32
    if vector.size == 0:
        return None, names
    if not names:
        names = generic_names(vector.size)
    return vector, names


def header_stamp_ns(msg: Any) -> int | None:
    """``header.stamp`` in ns, or None when the message has no header or an unset (zero) stamp."""
    header = getattr(msg, 'header', None)
    if header is None:
        return None
    stamp = header.stamp
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return ns if ns != 0 else None
