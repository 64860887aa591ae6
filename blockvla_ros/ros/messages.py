"""numpy <-> ROS message builders for the policy node: trajectories, per-tick actions, diagnostics, stamps.

Conventions (the README's "What the outputs mean for ros2_control"):
- ``action`` (sensor_msgs/JointState): header.stamp = the tick time, name = the policy's action names,
  position = this tick's action in the policy's units: for an ``absolute`` dimension a target (joint position,
  gripper opening), for a ``delta`` dimension the increment to apply during this tick. A hold (no usable input, no
  plan) publishes the true hold, 0 for deltas and the last target for absolutes, with velocity = zeros; policy
  ticks leave velocity empty.
- ``action_chunk`` (trajectory_msgs/JointTrajectory): only the absolute dimensions mapped to robot joints
  (``trajectory_joints``); header.stamp = the tick time; point k is the k-th action from this tick on (k = 0 is the
  action published on ``action`` at the same tick), at time_from_start (k + 1) * dt: the target of the action sent
  at a tick is to be reached one period later.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from sensor_msgs.msg import JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

LEVELS = {'ok': DiagnosticStatus.OK, 'warn': DiagnosticStatus.WARN, 'error': DiagnosticStatus.ERROR,
          'stale': DiagnosticStatus.STALE}


def to_time_msg(nanoseconds: int) -> Time:
    sec, nsec = divmod(int(nanoseconds), 1_000_000_000)
    return Time(sec=sec, nanosec=nsec)


def stamp_seconds(stamp) -> float:
    """builtin_interfaces/Time -> float seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def _duration(seconds: float) -> Duration:
    sec, nsec = divmod(int(round(seconds * 1e9)), 1_000_000_000)
    return Duration(sec=sec, nanosec=nsec)


def trajectory(names: Sequence[str], actions: np.ndarray, stamp_ns: int, dt: float,
               hold: bool = False) -> JointTrajectory:
    """actions [n, D] -> JointTrajectory with n points at (k + 1) * dt (positions only; zero velocity on hold)."""
    msg = JointTrajectory()
    msg.header.stamp = to_time_msg(stamp_ns)
    msg.joint_names = list(names)
    zeros = [0.0] * len(names)
    for k, row in enumerate(np.asarray(actions, dtype=np.float64)):
        point = JointTrajectoryPoint()
        point.positions = row.tolist()
        if hold:
            point.velocities = zeros
        point.time_from_start = _duration((k + 1) * dt)
        msg.points.append(point)
    return msg


def joint_command(names: Sequence[str], action: np.ndarray, stamp_ns: int, hold: bool = False) -> JointState:
    """One tick's action as a JointState (velocity = zeros marks a hold)."""
    msg = JointState()
    msg.header.stamp = to_time_msg(stamp_ns)
    msg.name = list(names)
    msg.position = np.asarray(action, dtype=np.float64).tolist()
    if hold:
        msg.velocity = [0.0] * len(msg.name)
    return msg


def _text(value) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:.4g}'
    return str(value)


def diagnostic_array(stamp_ns: int, name: str, hardware_id: str, level: str, message: str,
                     values: Mapping[str, object]) -> DiagnosticArray:
    """One DiagnosticStatus in a DiagnosticArray; ``values`` become KeyValue strings (None -> '')."""
    status = DiagnosticStatus()
    status.level = LEVELS[level]
    status.name = name
    status.message = message[:1000]
    status.hardware_id = hardware_id
    status.values = [KeyValue(key=str(k), value=_text(v)[:1000]) for k, v in values.items()]
    array = DiagnosticArray()
    array.header.stamp = to_time_msg(stamp_ns)
    array.status = [status]
    return array
