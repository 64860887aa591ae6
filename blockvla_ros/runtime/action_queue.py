"""ActionQueue: the timed, thread-safe chunk queue between the inference worker and the control tick.

Time model (seconds on one clock, the node's clock in the ROS node):

- every action has a planned time on one grid of spacing ``dt = 1 / control_rate_hz``, whose slots are the
  control ticks: the first :meth:`pop` (the node's first tick, before any chunk exists) sets the grid's phase, or
  the first chunk's observation stamp where chunks come first (offline use); it is kept until :meth:`reset`;
- a chunk computed from an observation stamped ``t_obs`` plans action ``i`` for ``snap(t_obs) + i * dt``
  (action 0 belongs to the moment the image was taken, as in the training data);
- the control tick calls :meth:`pop` once per period and gets the action planned for its own slot (the grid slot
  nearest to it), or None (hold). Each slot runs at most once: a tick consumes its slot whether it ran an action or
  held, heads planned for earlier slots are dropped (after a stall the robot jumps to the present plan instead of
  replaying the past, and never runs the plan one tick behind its time);
- a new chunk (:meth:`push_chunk`) replaces the queued plan from the first slot no tick has consumed yet. Its
  actions for earlier slots (the measured delay: image age + waiting + inference) are dropped;
- real-time chunking: :meth:`plan_request` returns the actions already planned (executed or still queued)
  for ``snap(t_obs) + i * dt`` up to the expected arrival time of the new chunk. The node can pass them to the
  runner as ``known_actions`` so the new chunk starts with exactly these and continues them.

The seam jump of a push is ``max |first new action to execute - the action it replaces|`` (the old head, or
the last executed action when the queue had run dry): a chunk-seam jerk metric, kept in :class:`QueueStats`.
"""
from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class TimedAction:
    """One planned action."""

    time: float  # planned time (s)
    action: np.ndarray  # [D] float32
    chunk_id: int  # which push it came from (1, 2, ...)
    index: int  # its index inside that chunk
    obs_stamp: float  # stamp of the observation the chunk was computed from


@dataclass(frozen=True)
class RequestPlan:
    """What the next inference should assume: its chunk starts at ``start_time`` and begins with ``known``."""

    start_time: float  # planned time of the new chunk's action 0 (obs stamp snapped to the grid)
    known: np.ndarray  # [k, D] float32: actions already planned for start_time + i * dt, i < k (may be k = 0)


@dataclass(frozen=True)
class PushResult:
    accepted: bool
    dropped: int  # actions of the new chunk whose time had passed
    queued: int  # queue depth after the push
    seam_jump: Optional[float]  # see module docstring; None when there was nothing to compare with
    reason: str = ''


@dataclass
class QueueStats:
    chunks_pushed: int = 0
    chunks_rejected: int = 0  # arrived after their last action's time
    dropped_overdue: int = 0  # actions of new chunks whose time had passed on arrival
    dropped_late: int = 0  # queued actions dropped by pop() because the tick came too late for them
    replaced: int = 0  # queued actions replaced by a newer chunk
    popped: int = 0
    empty_pops: int = 0
    seam_last: Optional[float] = None
    seam_max: float = 0.0
    seam_sum: float = 0.0
    seam_count: int = 0

    @property
    def seam_mean(self) -> Optional[float]:
        return self.seam_sum / self.seam_count if self.seam_count else None


class ActionQueue:
    """Thread-safe timed action queue; one producer (the inference worker), one consumer (the control tick)."""

    def __init__(self, dt: float, action_dim: int, *, history: int = 256):
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise ValueError(f'ActionQueue: dt must be a positive number of seconds, got {dt!r}')
        if not (isinstance(action_dim, int) and action_dim > 0):
            raise ValueError(f'ActionQueue: action_dim must be a positive integer, got {action_dim!r}')
        self.dt = float(dt)
        self.action_dim = action_dim
        self._lock = threading.Lock()
        self._queue: collections.deque[TimedAction] = collections.deque()
        self._history: collections.deque[TimedAction] = collections.deque(maxlen=history)
        self._origin: Optional[float] = None
        self._chunk_id = 0
        self._last_pop_now: Optional[float] = None
        self._last_tick_slot: Optional[int] = None  # the grid slot the last pop consumed (ran or held)
        self.stats = QueueStats()

    # --- grid -----------------------------------------------------------------------------------------------
    def _snap(self, t: float) -> float:
        if self._origin is None:
            return float(t)
        return self._origin + round((t - self._origin) / self.dt) * self.dt

    def _slot(self, t: float) -> int:
        """Grid index of a (snapped) time."""
        return int(round((t - self._origin) / self.dt))

    # --- producer side --------------------------------------------------------------------------------------
    def plan_request(self, obs_stamp: float, now: float, expected_delay_s: float, max_known: int) -> RequestPlan:
        """The start time and RTC prefix for an inference on an observation stamped ``obs_stamp``, asked at ``now``.

        ``known`` holds the contiguous run of planned actions from the start time up to ``now +
        expected_delay_s`` (what will have been executed before the new chunk can arrive), at most
        ``max_known``. Empty when nothing is planned for the start time (first chunk, after a hold).
        """
        with self._lock:
            start = self._snap(obs_stamp)
            known = np.zeros((0, self.action_dim), np.float32)
            if self._origin is None or max_known <= 0:
                return RequestPlan(start, known)
            planned = {self._slot(a.time): a.action for a in self._history}
            planned.update({self._slot(a.time): a.action for a in self._queue})
            first = self._slot(start)
            horizon = now + max(expected_delay_s, 0.0)
            rows = []
            while len(rows) < max_known and start + len(rows) * self.dt < horizon + 1e-9:
                action = planned.get(first + len(rows))
                if action is None:
                    break
                rows.append(action)
            if rows:
                known = np.stack(rows).astype(np.float32)  # k x [D] -> [k, D]
            return RequestPlan(start, known)

    def push_chunk(self, actions: np.ndarray, obs_stamp: float, now: float) -> PushResult:
        """Replace the plan from the queue head on with ``actions`` [H, D] planned from ``obs_stamp``.

        Actions whose time already passed are dropped; a chunk with nothing left is rejected (the old plan
        stays). Non-finite or wrongly shaped actions raise ValueError.
        """
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or actions.shape[1] != self.action_dim or actions.shape[0] == 0:
            raise ValueError(f'push_chunk: actions must be [H, {self.action_dim}], got shape {actions.shape}')
        if not np.all(np.isfinite(actions)):
            raise ValueError('push_chunk: actions contain NaN or inf')
        horizon = actions.shape[0]
        with self._lock:
            if self._origin is None:
                self._origin = float(obs_stamp)
            start = self._snap(obs_stamp)
            first = self._first_free_slot(now) - self._slot(start)  # index of the chunk's first action to run
            keep = [a for a in self._queue if a.time < start - 1e-9]  # old plan before this chunk starts: kept
            first = max(first, 0)
            if first >= horizon:
                self.stats.chunks_rejected += 1
                late = now - (start + (horizon - 1) * self.dt)
                return PushResult(False, horizon, len(self._queue), None,
                                  f'chunk arrived {late:.3f} s after its last action was due')
            self._chunk_id += 1
            new = [TimedAction(start + i * self.dt, actions[i], self._chunk_id, i, float(obs_stamp))
                   for i in range(first, horizon)]
            seam = self._seam(new[0])
            self.stats.replaced += len(self._queue) - len(keep)
            self._queue = collections.deque(keep + new)
            self.stats.chunks_pushed += 1
            self.stats.dropped_overdue += first
            return PushResult(True, first, len(self._queue), seam)

    def _first_free_slot(self, now: float) -> int:
        """The first grid slot no tick has consumed: the one after the last tick's, or, before any tick, the slot
        containing ``now``; never one already executed. Called with the lock held (the grid is set)."""
        if self._last_tick_slot is not None:
            free = self._last_tick_slot + 1
        else:
            free = math.floor((now - self._origin) / self.dt + 1e-9)
        if self._history:
            free = max(free, self._slot(self._history[-1].time) + 1)
        return free

    def _seam(self, first_new: TimedAction) -> Optional[float]:
        """|first new action - what it replaces| (the old plan's action for that slot, else the last executed
        action, i.e. the hold position); recorded in the stats. Called with the lock held."""
        slot = self._slot(first_new.time)
        replaced = next((a.action for a in self._queue if self._slot(a.time) == slot), None)
        if replaced is None and not self._queue and self._history:
            replaced = self._history[-1].action
        if replaced is None:
            return None
        seam = float(np.max(np.abs(first_new.action - replaced)))
        st = self.stats
        st.seam_last, st.seam_max = seam, max(st.seam_max, seam)
        st.seam_sum += seam
        st.seam_count += 1
        return seam

    # --- consumer side --------------------------------------------------------------------------------------
    def pop(self, now: float) -> Optional[TimedAction]:
        """The action planned for this tick's slot (the grid slot nearest to ``now``), or None (hold).

        The tick consumes its slot either way; heads planned for earlier slots are dropped. The first pop on an
        empty grid sets the grid's phase to the tick. A clock that jumps backwards by more than one period (a
        looping bag under sim time) resets the queue.
        """
        with self._lock:
            if self._last_pop_now is not None and now < self._last_pop_now - self.dt:
                self._reset_locked()
            self._last_pop_now = now
            if self._origin is None:
                self._origin = float(now)
            slot = int(round((now - self._origin) / self.dt))
            if self._last_tick_slot is not None:  # a tick never goes back to an earlier slot
                slot = max(slot, self._last_tick_slot)
            self._last_tick_slot = slot
            while self._queue and self._slot(self._queue[0].time) < slot:
                self._queue.popleft()
                self.stats.dropped_late += 1
            if not self._queue or self._slot(self._queue[0].time) > slot:
                self.stats.empty_pops += 1
                return None
            action = self._queue.popleft()
            self._history.append(action)
            self.stats.popped += 1
            return action

    def remaining(self) -> list[TimedAction]:
        """Snapshot of the queued (not yet executed) actions, oldest first."""
        with self._lock:
            return list(self._queue)

    def depth(self) -> int:
        with self._lock:
            return len(self._queue)

    __len__ = depth

    @property
    def last_executed(self) -> Optional[TimedAction]:
        with self._lock:
            return self._history[-1] if self._history else None

    def clear(self) -> int:
        """Drop the queued plan (hold); the grid and the executed history stay. Returns how many were dropped."""
        with self._lock:
            n = len(self._queue)
            self._queue.clear()
            return n

    def reset(self) -> None:
        """Forget everything (plan, history, grid phase); statistics stay."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._queue.clear()
        self._history.clear()
        self._origin = None
        self._last_pop_now = None
        self._last_tick_slot = None


class DelayEstimator:
    """Expected inference delay: the maximum of the last ``window`` measured latencies (as LeRobot's RTC)."""

    def __init__(self, window: int = 10, initial_s: float = 0.0):
        self._values: collections.deque[float] = collections.deque(maxlen=window)
        self._initial = float(initial_s)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            with self._lock:
                self._values.append(float(seconds))

    def expected(self) -> float:
        with self._lock:
            return max(self._values) if self._values else self._initial

    def ticks(self, dt: float) -> int:
        """Expected delay in control periods (rounded up)."""
        return int(math.ceil(self.expected() / dt - 1e-9))
