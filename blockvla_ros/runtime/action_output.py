"""What happens to a predicted chunk before a robot sees it, shared by the node and offline replay (no rclpy).

- ``ActionLimits`` + ``postprocess_chunk``: the robot's limits per action dimension (the node's
  ``action_limits.lower`` / ``action_limits.upper`` parameters, ``blockvla-replay --action-lower/--action-upper``).
  The policy's own range (policy.yaml ``actions.low/high``, the training data's 1st/99th percentiles) is not a
  limit: decoded actions are bin centres inside it by construction, so clamping to it never clips anything.
- ``hold_action``: a true hold: zero for ``delta`` dimensions (no motion), the last target for ``absolute`` ones.
- ``TrajectoryMap``: which dimensions go out as JointTrajectory points (absolute targets only) and under which of
  the robot's joint names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..model.config import ACTION_KINDS


@dataclass(frozen=True)
class ActionLimits:
    """Lower and upper bound per action dimension (physical units, float64)."""

    lower: np.ndarray  # [D]
    upper: np.ndarray  # [D]

    @classmethod
    def parse(cls, lower: Sequence[float], upper: Sequence[float], names: Sequence[str]) -> Optional['ActionLimits']:
        """Both empty: no limits (None). Otherwise one finite value per action name each, lower <= upper;
        ValueError naming the problem."""
        lower, upper, names = list(lower or []), list(upper or []), list(names)
        if not lower and not upper:
            return None
        if len(lower) != len(names) or len(upper) != len(names):
            raise ValueError(f'action limits need one lower and one upper value per action {names}: got '
                             f'{len(lower)} lower and {len(upper)} upper values')
        try:
            lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f'action limits must be numbers: {e}') from None
        bad = [n for n, a, b in zip(names, lo, hi) if not (math.isfinite(a) and math.isfinite(b) and a <= b)]
        if bad:
            raise ValueError(f'action limits of {bad} are not finite numbers with lower <= upper '
                             f'(lower {lower}, upper {upper})')
        return cls(lo, hi)

    def describe(self, names: Sequence[str]) -> str:
        return ', '.join(f'{n} [{a:g}, {b:g}]' for n, a, b in zip(names, self.lower, self.upper))


def postprocess_chunk(actions: np.ndarray, known: int, limits: Optional[ActionLimits]) -> tuple[np.ndarray, int]:
    """The one post-processing step between the decoder and a robot: ``actions`` [H, D] -> (float32 [H, D], number
    of values clipped). The first ``known`` rows (already committed to the robot: real-time chunking) pass through
    unchanged; the rest are clipped to ``limits`` (None: unchanged)."""
    out = np.array(actions, dtype=np.float32)  # [H, D], a copy
    if limits is None or known >= len(out):
        return out, 0
    free = out[known:].astype(np.float64)  # [H - k, D]
    clipped = np.clip(free, limits.lower, limits.upper)
    changed = int(np.count_nonzero(clipped != free))
    out[known:] = clipped
    return out, changed


def hold_action(last: np.ndarray, kinds: Sequence[str]) -> np.ndarray:
    """What a hold commands after ``last`` [D]: 0 for delta dimensions, ``last`` for absolute ones."""
    delta = np.asarray([k == 'delta' for k in kinds], dtype=bool)
    return np.where(delta, 0.0, np.asarray(last, dtype=np.float32)).astype(np.float32)


@dataclass(frozen=True)
class TrajectoryMap:
    """Action dimensions published as JointTrajectory points, and the robot joint name of each."""

    indices: tuple  # action dimensions, in the order of ``joint_names``
    joint_names: tuple
    off_reason: str = ''  # why nothing is published (indices empty)

    @property
    def enabled(self) -> bool:
        return bool(self.indices)

    @classmethod
    def build(cls, action_names: Sequence[str], kinds: Sequence[str], mapping: Sequence[str]) -> 'TrajectoryMap':
        """``mapping``: entries '<action name>=<robot joint name>' (the node's ``trajectory_joints``). Empty: every
        dimension under its own name when all are absolute, else nothing (a delta is not a position).
        ValueError for an unknown action, a delta dimension, a malformed entry or a joint named twice."""
        names, kinds = list(action_names), list(kinds)
        unknown_kinds = [k for k in kinds if k not in ACTION_KINDS]
        if unknown_kinds or len(kinds) != len(names):
            raise ValueError(f'action kinds {kinds} do not describe the actions {names}')
        if not mapping:
            deltas = [n for n, k in zip(names, kinds) if k == 'delta']
            if deltas:
                return cls((), (), f'the policy\'s actions {deltas} are deltas, not joint positions; map its absolute '
                                   'dimensions to joints with trajectory_joints to publish them')
            return cls(tuple(range(len(names))), tuple(names))
        indices, joints = [], []
        for entry in mapping:
            action, sep, joint = str(entry).partition('=')
            action, joint = action.strip(), joint.strip()
            if not sep or not action or not joint:
                raise ValueError(f"trajectory_joints entry {entry!r} is not '<action name>=<joint name>'")
            if action not in names:
                raise ValueError(f'trajectory_joints maps {action!r}, which is not one of the policy\'s actions '
                                 f'{names}')
            i = names.index(action)
            if kinds[i] != 'absolute':
                raise ValueError(f'trajectory_joints maps {action!r}, a {kinds[i]} action: only absolute targets can '
                                 'be joint positions')
            if i in indices or joint in joints:
                raise ValueError(f'trajectory_joints maps {action!r} or joint {joint!r} twice')
            indices.append(i)
            joints.append(joint)
        return cls(tuple(indices), tuple(joints))
