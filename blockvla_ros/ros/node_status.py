"""The policy node's own status: one small dataclass behind one lock (no rclpy).

Written from three threads (executor callbacks, the control thread, the inference worker); /diagnostics reads a
consistent copy with :meth:`NodeStatus.snapshot`. The other components report their own figures (PolicyManager,
InputStore, ActionQueue, TickMonitor); this holds only what belongs to the node itself.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Optional

RETRY_FIRST_S, RETRY_MAX_S = 0.2, 2.0  # back-off of a failing inference


@dataclass
class StatusValues:
    lifecycle_state: str = 'unconfigured'
    hold_reason: Optional[str] = 'unconfigured'  # None while executing planned actions
    last_error: str = ''
    rate_warning: str = ''  # control_rate_hz differs from the policy's trained rate
    inference_errors: int = 0
    last_inference_error: str = ''
    clipped_values: int = 0  # action values changed by the action limits
    known_last: int = 0  # RTC: actions of the last chunk that were given as known
    fresh_chunks: int = 0  # chunks started without known actions because the instruction changed
    stale_chunks_dropped: int = 0  # chunks computed for an instruction that changed while they were computed
    nfe_last: Optional[int] = None
    qos_incompatible: int = 0
    callback_errors: int = 0  # exceptions caught at a callback boundary (each one a bug to report)
    retry_at: float = 0.0  # no inference before this time (back-off after a failure)
    retry_backoff: float = RETRY_FIRST_S
    extra: dict = field(default_factory=dict)  # component facts fixed at configure (kinds, limits, trajectory)


class NodeStatus:
    """Thread-safe holder of :class:`StatusValues`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._v = StatusValues()

    def snapshot(self) -> StatusValues:
        with self._lock:
            return dataclasses.replace(self._v, extra=dict(self._v.extra))

    def set(self, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                if not hasattr(self._v, key):
                    raise AttributeError(f'NodeStatus has no field {key!r}')
                setattr(self._v, key, value)

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            setattr(self._v, key, getattr(self._v, key) + n)

    def get(self, key: str):
        with self._lock:
            return getattr(self._v, key)

    def change_hold(self, reason: Optional[str]) -> Optional[str]:
        """Set the hold reason; returns the previous one (the caller logs changes, not every tick)."""
        with self._lock:
            previous, self._v.hold_reason = self._v.hold_reason, reason
            return previous

    # --- inference retry back-off ----------------------------------------------------------------------------
    def inference_failed(self, now: float, error: str) -> None:
        with self._lock:
            v = self._v
            v.inference_errors += 1
            v.last_inference_error = error
            v.retry_at = now + v.retry_backoff
            v.retry_backoff = min(v.retry_backoff * 2, RETRY_MAX_S)

    def retry_now(self) -> None:
        """Good news (a chunk arrived, new input): no back-off."""
        with self._lock:
            self._v.retry_at, self._v.retry_backoff = 0.0, RETRY_FIRST_S

    def may_infer(self, now: float) -> bool:
        with self._lock:
            return now >= self._v.retry_at

    def failing(self) -> bool:
        with self._lock:
            return bool(self._v.last_inference_error) and self._v.retry_at > 0
