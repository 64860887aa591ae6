"""The latest camera image, instruction and joint state, validated and timestamped (no rclpy here).

The node's callbacks convert a message and store the result here; the control tick asks :meth:`InputStore.
hold_reason` whether the inputs are good enough to act on, and the inference worker takes an
:meth:`InputStore.snapshot`. Rejected messages never raise out of a callback: they are counted and their reason
is kept for /diagnostics.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Observation:
    """What one inference runs on."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    stamp: float  # image time (s, node clock): the header stamp, or the receive time for a zero stamp
    instruction: str
    state: Optional[np.ndarray]  # [S] float32 or None
    image_seq: int  # increments with every accepted image


@dataclass
class InputCounters:
    images: int = 0
    images_rejected: int = 0
    images_unstamped: int = 0  # zero header stamp: the receive time was used
    instructions: int = 0
    instructions_rejected: int = 0
    joint_states: int = 0
    joint_states_rejected: int = 0
    last_image_error: str = ''
    last_instruction_error: str = ''
    last_joint_state_error: str = ''


class InputStore:
    """Thread-safe latest inputs. ``state_names`` / ``state_dim`` describe the policy's proprioception."""

    def __init__(self, max_instruction_chars: int = 1000, state_dim: int = 0,
                 state_names: Sequence[str] = ()):
        self.max_instruction_chars = int(max_instruction_chars)
        self.state_dim = int(state_dim)
        self.state_names = list(state_names)
        self.counters = InputCounters()
        self._lock = threading.Lock()
        self._image: Optional[np.ndarray] = None
        self._image_stamp: Optional[float] = None
        self._image_seq = 0
        self._instruction: Optional[str] = None
        self._state: Optional[np.ndarray] = None
        self._state_error = 'no joint state received yet'
        self._joints: dict[str, float] = {}  # policy state name -> latest position (merged over messages)
        self._joint_times: dict[str, float] = {}  # policy state name (or '' for unnamed state) -> receive time

    # --- writers (executor thread) --------------------------------------------------------------------------
    def set_image(self, rgb: np.ndarray, stamp: Optional[float], received: float) -> None:
        """Store a converted image; a zero/None stamp falls back to the receive time (counted)."""
        with self._lock:
            if not stamp:
                self.counters.images_unstamped += 1
                stamp = received
            self._image, self._image_stamp = rgb, float(stamp)
            self._image_seq += 1
            self.counters.images += 1

    def reject_image(self, reason: str) -> None:
        with self._lock:
            self.counters.images_rejected += 1
            self.counters.last_image_error = reason

    def set_instruction(self, text: str) -> Optional[str]:
        """Accept or refuse an instruction; returns the refusal reason (None when accepted).

        An empty or blank instruction clears the task (the node holds); one that is too long is refused and
        also clears the task, since the sender asked for something the node will not do.
        """
        text = str(text).strip()
        reason = None
        if not text:
            reason = 'empty instruction: the task is cleared, holding'
        elif len(text) > self.max_instruction_chars:
            reason = (f'instruction of {len(text)} characters is longer than max_instruction_chars '
                      f'{self.max_instruction_chars}: refused, holding')
        with self._lock:
            if reason:
                self._instruction = None
                self.counters.instructions_rejected += 1
                self.counters.last_instruction_error = reason
            else:
                self._instruction = text
                self.counters.instructions += 1
        return reason

    def set_joint_state(self, names: Sequence[str], positions: Sequence[float],
                        received: Optional[float] = None) -> Optional[str]:
        """Select the policy's state from a JointState: by name when the policy names its state inputs, merged over
        messages (several publishers share /joint_states, each with its own joints; a message with none of the
        policy's joints changes nothing), else the first state_dim positions. A malformed message or a NaN / inf
        value clears the state (the node holds) until good values replace it. ``received`` (node clock) dates the
        joints it carries, for :meth:`hold_reason`'s staleness check."""
        if self.state_dim == 0:
            return None
        positions = np.asarray(positions, dtype=np.float32).reshape(-1)
        names = list(names)
        if not self.state_names:
            if len(positions) < self.state_dim:
                return self._refuse(f'joint state has {len(positions)} positions, the policy needs {self.state_dim}')
            return self._accept(positions[:self.state_dim], {}, received)
        if len(positions) != len(names):
            return self._refuse(f'joint state has {len(names)} names but {len(positions)} positions')
        wanted = set(self.state_names)
        got = {n: float(v) for n, v in zip(names, positions) if n in wanted}
        if not got:
            return None  # another publisher's joints (a gripper, a base)
        bad = sorted(n for n, v in got.items() if not np.isfinite(v))
        if bad:
            with self._lock:
                for n in bad:
                    self._joints.pop(n, None)
            return self._refuse(f'joint state positions of {bad} are NaN or inf')
        return self._accept(None, got, received)

    def _accept(self, state: Optional[np.ndarray], joints: dict, received: Optional[float]) -> Optional[str]:
        if state is not None and not np.all(np.isfinite(state)):
            return self._refuse('joint state positions contain NaN or inf')
        with self._lock:
            self.counters.joint_states += 1
            if received is not None:
                for name in (joints or ('',)):
                    self._joint_times[name] = float(received)
            if state is None:
                self._joints.update(joints)
                missing = [n for n in self.state_names if n not in self._joints]
                if missing:
                    self._state, self._state_error = None, f'joint states so far lack the policy state inputs {missing}'
                    return None
                state = np.array([self._joints[n] for n in self.state_names], np.float32)
            self._state, self._state_error = state, ''
        return None

    def _refuse(self, reason: str) -> str:
        with self._lock:
            self.counters.joint_states_rejected += 1
            self.counters.last_joint_state_error = reason
            self._state, self._state_error = None, reason
        return reason

    # --- readers (control tick, worker, diagnostics) --------------------------------------------------------
    def image_age(self, now: float) -> Optional[float]:
        with self._lock:
            return None if self._image_stamp is None else now - self._image_stamp

    @property
    def instruction(self) -> Optional[str]:
        with self._lock:
            return self._instruction

    def joint_state_age(self, now: float) -> Optional[float]:
        """Seconds since the policy's oldest state input was last received (None: no dated state yet)."""
        with self._lock:
            return self._joint_state_age(now)[0]

    def _joint_state_age(self, now: float) -> tuple:
        keys = self.state_names or ['']
        times = [self._joint_times.get(k) for k in keys]
        if not self.state_dim or any(t is None for t in times):
            return None, []
        oldest = min(times)
        return now - oldest, [k for k, t in zip(keys, times) if t == oldest and k]

    def hold_reason(self, now: float, max_image_age_s: float,
                    max_joint_state_age_s: float = 0.0) -> Optional[str]:
        """Why the node must hold now (None when the inputs are usable). ``max_joint_state_age_s`` > 0 also holds
        when a state input was last received longer ago (its publisher stopped: a driver died)."""
        with self._lock:
            if self._image_stamp is None:
                why = 'no camera image received yet'
                if self.counters.last_image_error:
                    why += f' (last image rejected: {self.counters.last_image_error})'
                return why
            age = now - self._image_stamp
            if age > max_image_age_s:
                why = f'camera stale: last image is {age:.2f} s old > max_image_age_s {max_image_age_s:g}'
                if self.counters.last_image_error:
                    why += f' (last image rejected: {self.counters.last_image_error})'
                return why
            if age < -max_image_age_s:
                return (f'camera stamp is {-age:.2f} s in the future of the node clock '
                        '(clock mismatch or use_sim_time?)')
            if self._instruction is None:
                return ('no instruction' + (f' ({self.counters.last_instruction_error})'
                                            if self.counters.last_instruction_error else ''))
            if self.state_dim and self._state is None:
                return f'no usable joint state: {self._state_error}'
            if self.state_dim and max_joint_state_age_s > 0:
                age, names = self._joint_state_age(now)
                if age is not None and age > max_joint_state_age_s:
                    which = f' ({", ".join(names)})' if names else ''
                    return (f'joint state stale{which}: last received {age:.2f} s ago > max_joint_state_age_s '
                            f'{max_joint_state_age_s:g}')
            return None

    def snapshot(self) -> Optional[Observation]:
        """The latest image + instruction (+ state), or None when one is missing."""
        with self._lock:
            if self._image is None or self._instruction is None or (self.state_dim and self._state is None):
                return None
            return Observation(self._image, self._image_stamp, self._instruction,
                               None if self._state is None else self._state.copy(), self._image_seq)
