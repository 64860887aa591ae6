"""The running policy and its hot swap (no rclpy here).

``validate`` is what the node's parameter set-callback runs: resolve the name inside the policy directories,
verify the folder's manifest, and check the action space against the running policy; it loads nothing.
``start_swap`` loads and warms the new policy on a background thread; the inference worker calls
``take_pending`` before each chunk, so the swap happens between chunks and the old policy serves until then.
A failed load leaves the old policy running and is reported through ``on_swap_done``.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..runtime.policy_folder import PolicyFolderError, PolicySpec, load_policy_folder, resolve_policy

log = logging.getLogger(__name__)


class IncompatiblePolicyError(ValueError):
    """A replacement policy whose action space (or state inputs) differs from the running one."""


def check_compatible(new: PolicySpec, running: Any) -> None:
    """Raise IncompatiblePolicyError unless ``new`` can replace ``running`` (a PolicyRunner) without a restart."""
    cfg, old = new.config, running.config
    problems = []
    if cfg.action_dim != old.action_dim:
        problems.append(f'action_dim {cfg.action_dim} != running {old.action_dim}')
    if list(new.action_names) != list(running.action_names):
        problems.append(f'action names {list(new.action_names)} != running {list(running.action_names)}')
    if cfg.state_dim != old.state_dim or list(cfg.state_names) != list(old.state_names):
        problems.append(f'state inputs {cfg.state_dim} {list(cfg.state_names)} != running '
                        f'{old.state_dim} {list(old.state_names)}')
    if problems:
        raise IncompatiblePolicyError(f'policy {new.name!r} ({new.folder}) cannot replace {running.name!r}: '
                                      + '; '.join(problems))


class PolicyManager:
    """Loads PolicyRunners with one set of engine options; holds the current one and at most one pending."""

    def __init__(self, policy_dirs: Sequence[str], engine: str, *, decoder: Optional[str] = None,
                 overrides: Optional[dict] = None, require_gpu: bool = False, threads: Optional[int] = None,
                 warmup_runs: int = 2, on_swap_done: Optional[Callable[[str, Optional[str]], None]] = None):
        self.policy_dirs = [str(d) for d in policy_dirs]
        self.engine = engine
        self.load_kwargs = dict(engine=engine, decoder=decoder or None, overrides=overrides or None,
                                require_gpu=require_gpu, threads=threads or None)
        self.warmup_runs = int(warmup_runs)
        self.on_swap_done = on_swap_done
        self._lock = threading.Lock()
        self.current: Optional[Any] = None
        self._pending: Optional[Any] = None
        self._loading: Optional[str] = None
        self._loader: Optional[threading.Thread] = None
        self.last_swap_error = ''
        self.swaps = 0
        self.load_seconds: Optional[float] = None

    # --- validation (cheap enough for a parameter callback: hashes, no model) -----------------------------
    def inspect(self, name: str) -> PolicySpec:
        """Resolve ``name`` inside the policy directories and verify its folder (PolicyFolderError if not)."""
        return load_policy_folder(resolve_policy(name, self.policy_dirs))

    def validate(self, name: str) -> PolicySpec:
        """Everything the set-callback checks before a swap; raises ValueError with the reason."""
        with self._lock:
            if self._loading is not None:
                raise ValueError(f'policy {self._loading!r} is still loading; try again when it is done')
        spec = self.inspect(name)
        if self.current is not None:
            check_compatible(spec, self.current)
        return spec

    def is_running(self, name: str) -> bool:
        """True when ``name`` resolves to the folder of the running policy (a no-op swap)."""
        if self.current is None:
            return False
        try:
            return resolve_policy(name, self.policy_dirs) == Path(self.current.folder).resolve()
        except PolicyFolderError:
            return False

    # --- loading ------------------------------------------------------------------------------------------
    def _load(self, name: str) -> Any:
        from ..runtime.runner import PolicyRunner

        folder = resolve_policy(name, self.policy_dirs)
        start = time.monotonic()
        log.info('loading policy %s from %s on %s', name, folder, self.engine)
        runner = PolicyRunner.load(folder, **self.load_kwargs)
        log.info('warming up %s (%d runs)', runner.name, self.warmup_runs)
        if self.warmup_runs > 0:
            runner.warmup(self.warmup_runs)
        self.load_seconds = time.monotonic() - start
        log.info('policy %s ready in %.2f s', runner.name, self.load_seconds)
        # Everything loaded so far lives as long as the policy: move it out of the collector's reach, so a
        # full collection (tens of ms with the GIL held, stalling the control thread) stays short. Frozen objects
        # are still freed by reference counting: loading, warming and dropping the demo runner six times left RSS
        # flat and, after gc.unfreeze(), nothing unreachable, so a swapped-out runner is not kept alive by this.
        gc.collect()
        gc.freeze()
        return runner

    def load(self, name: str) -> Any:
        """Blocking load + warm-up (lifecycle configure); becomes the current policy."""
        runner = self._load(name)
        with self._lock:
            self.current, self._pending = runner, None
        return runner

    def start_swap(self, name: str) -> None:
        """Load ``name`` in the background; it becomes current at the next ``take_pending``."""
        with self._lock:
            if self._loading is not None:
                raise ValueError(f'policy {self._loading!r} is still loading')
            self._loading = name
            self._loader = threading.Thread(target=self._swap_thread, args=(name,), daemon=True,
                                            name='blockvla-policy-loader')
            self._loader.start()

    def _swap_thread(self, name: str) -> None:
        error = None
        try:
            runner = self._load(name)
            if self.current is not None:
                check_compatible(runner, self.current)
            with self._lock:
                self._pending = runner
        except Exception as e:  # the old policy keeps running; the reason goes to diagnostics
            error = f'{type(e).__name__}: {e}'
            log.error('policy swap to %r failed, keeping %r: %s', name,
                      getattr(self.current, 'name', None), error)
        with self._lock:
            self._loading = None
            self.last_swap_error = error or ''
        if self.on_swap_done is not None:
            self.on_swap_done(name, error)

    def take_pending(self) -> Any:
        """Promote a loaded replacement (between chunks); returns the policy to use for the next chunk."""
        with self._lock:
            if self._pending is not None:
                old, self.current, self._pending = self.current, self._pending, None
                self.swaps += 1
                log.info('swapped policy %s -> %s', getattr(old, 'name', None), self.current.name)
            return self.current

    @property
    def loading(self) -> Optional[str]:
        with self._lock:
            return self._loading

    def wait_loaded(self, timeout: float) -> bool:
        """Wait for a background load to finish (tests, shutdown)."""
        loader = self._loader
        if loader is not None:
            loader.join(timeout)
        return self.loading is None

    def close(self) -> None:
        self.wait_loaded(30.0)
        with self._lock:
            self.current = self._pending = None
