"""Rolling statistics the policy node reports in /diagnostics (pure Python + numpy, no rclpy)."""
from __future__ import annotations

import collections
import math
import threading
from typing import Optional

import numpy as np


class RollingWindow:
    """The last ``size`` samples of one quantity; thread-safe."""

    def __init__(self, size: int = 500):
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0  # samples ever added

    def add(self, value: float) -> None:
        if value is None or not math.isfinite(value):
            return
        with self._lock:
            self._values.append(float(value))
            self.count += 1

    def values(self) -> np.ndarray:
        with self._lock:
            return np.asarray(self._values, dtype=np.float64)

    def percentile(self, q: float) -> Optional[float]:
        values = self.values()
        return float(np.percentile(values, q)) if values.size else None

    @property
    def last(self) -> Optional[float]:
        with self._lock:
            return self._values[-1] if self._values else None

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


class TickMonitor:
    """Control-loop timing: periods between ticks, missed ticks (a gap of k periods misses k - 1) and rate."""

    def __init__(self, period_s: float, window: int = 1000):
        self.period_s = float(period_s)
        self.periods = RollingWindow(window)  # seconds
        self.missed = 0
        self.ticks = 0
        self._last: Optional[float] = None
        self._lock = threading.Lock()

    def tick(self, t: float) -> None:
        with self._lock:
            self.ticks += 1
            if self._last is not None:
                gap = t - self._last
                if gap < 0:  # the clock went back (sim time restarted): start over
                    self._last = t
                    return
                self.periods.add(gap)
                self.missed += max(0, int(round(gap / self.period_s)) - 1)
            self._last = t

    def rate_hz(self) -> Optional[float]:
        p50 = self.periods.percentile(50)
        return 1.0 / p50 if p50 else None

    def summary_ms(self) -> dict:
        """period p50 / p99 and the p99 of |period - nominal| in milliseconds (None before two ticks)."""
        values = self.periods.values()
        if not values.size:
            return {'period_p50_ms': None, 'period_p99_ms': None, 'period_error_p99_ms': None}
        return {'period_p50_ms': float(np.percentile(values, 50)) * 1e3,
                'period_p99_ms': float(np.percentile(values, 99)) * 1e3,
                'period_error_p99_ms': float(np.percentile(np.abs(values - self.period_s), 99)) * 1e3}
