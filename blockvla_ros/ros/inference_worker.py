"""One background thread that runs at most one inference job at a time (never on the ROS executor)."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

log = logging.getLogger(__name__)


class InferenceWorker:
    """``submit(job)`` hands a callable to the worker thread unless one is already queued or running.

    Exceptions raised by a job are passed to ``on_error`` (and logged); the thread keeps serving.
    """

    def __init__(self, on_error: Callable[[Exception], None], name: str = 'blockvla-inference'):
        self._on_error = on_error
        self._cond = threading.Condition()
        self._job: Optional[Callable[[], None]] = None
        self._running = False
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running or self._job is not None

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (and nothing queued) when the worker is busy or stopped."""
        with self._cond:
            if self._stopped or self._running or self._job is not None:
                return False
            self._job = job
            self._cond.notify()
            return True

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running (True) or ``timeout`` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._running and self._job is None, timeout)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop after the running job (a job cannot be interrupted); True when the thread ended in time."""
        with self._cond:
            self._stopped = True
            self._job = None
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._job is not None)
                if self._stopped:
                    return
                job, self._job, self._running = self._job, None, True
            try:
                job()
            except Exception as e:  # a failing inference must never end the worker
                log.debug('inference job failed', exc_info=True)
                try:
                    self._on_error(e)
                except Exception:
                    log.exception('inference error handler failed')
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
