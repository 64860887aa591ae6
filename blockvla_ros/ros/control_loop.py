"""The control tick: a dedicated thread that calls ``tick(now_ns)`` once per period on the node's clock.

Why not an executor timer: the executor also runs image conversion, parameter validation (manifest hashing)
and lifecycle services; any of them would delay a tick. This thread only waits on the clock, so the period
holds while those run. Ticks stay on the grid start + k * period; a tick that comes more than a period late
skips the missed slots (like a ROS timer). Under sim time (use_sim_time) it follows /clock and restarts its
grid when the clock jumps back (a looping bag).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)
MAX_SLEEP_S = 0.1  # longest single sleep: a long period (1e-12 Hz passes every range) neither overflows time.sleep
#                   nor keeps stop() from ending the thread within it


class ControlLoop:
    """``start()`` / ``stop()``; ``tick`` gets the node-clock time of the tick in nanoseconds."""

    def __init__(self, clock, period_s: float, tick: Callable[[int], None],
                 on_error: Callable[[Exception], None], name: str = 'blockvla-control', priority: int = 0):
        self._clock = clock
        self._priority = int(priority)
        self.priority_error = ''  # why the requested real-time priority could not be set (reported in diagnostics)
        self._period_ns = int(round(period_s * 1e9))
        self._tick = tick
        self._on_error = on_error
        self._name = name
        self._stop = threading.Event()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        if self.running:
            return
        self._stop = threading.Event()  # a fresh flag: an old thread still waking up sees its own, set
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop ticking; True when the thread ended within ``timeout`` (a paused sim clock may delay it)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _now(self) -> int:
        return self._clock.now().nanoseconds

    def _sleep_until(self, target_ns: int, stop: threading.Event) -> bool:
        """False when the clock jumped back while waiting (the caller restarts its grid)."""
        start = self._now()
        while not stop.is_set():
            now = self._now()
            if now >= target_ns:
                return True
            if now < start - self._period_ns:
                return False
            if self._clock.ros_time_is_active:  # sim time runs at any speed: poll it
                time.sleep(min(0.001, (target_ns - now) * 1e-9))
            else:  # system time: sleep the rest in one go (precise to ~0.1 ms on Linux), up to MAX_SLEEP_S
                time.sleep(min(MAX_SLEEP_S, (target_ns - now) * 1e-9))
        return False

    def _set_priority(self) -> None:
        """SCHED_FIFO at ``priority`` for this thread only (needs CAP_SYS_NICE or an rtprio limit, as ros2_control)."""
        if self._priority <= 0:
            return
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO, os.sched_param(self._priority))
            log.info('control thread runs SCHED_FIFO priority %d', self._priority)
        except (AttributeError, OSError) as e:  # no permission (ulimit -r), or not Linux
            self.priority_error = (f'cannot set SCHED_FIFO priority {self._priority} ({e}); running with normal '
                                   'priority (grant rtprio, e.g. in /etc/security/limits.conf)')
            log.warning(self.priority_error)

    def _run(self, stop: threading.Event) -> None:
        self._set_priority()
        next_ns = self._now()
        while not stop.is_set():
            next_ns += self._period_ns
            now = self._now()
            if now - next_ns >= self._period_ns:  # fell behind: skip to the next slot of the grid
                next_ns += ((now - next_ns) // self._period_ns) * self._period_ns
            if not self._sleep_until(next_ns, stop):
                if stop.is_set():
                    return
                next_ns = self._now()  # the clock went back: new grid from here
                continue
            if stop.is_set():
                return
            try:
                self._tick(self._now())
            except Exception as e:  # a failing tick must not end the loop
                try:
                    self._on_error(e)
                except Exception:
                    log.exception('control tick error handler failed')
