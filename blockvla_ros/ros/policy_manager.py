"""The running policy and its hot swap: one state machine, no rclpy.

    current    the runner in use (and the ``policy`` value that named it)
    requested  what the ``policy`` parameter says now (the last accepted set)
    pending    the name being loaded on the loader thread (at most one load at a time)

Every accepted set calls :meth:`PolicyManager.request`. A load starts when nothing is loading and ``requested`` is not
the running policy; when a load ends, its runner becomes current only if it is still what was requested (a newer
set supersedes it), and the next load starts if ``requested`` moved on meanwhile. A failed load of the requested
policy keeps the old one and asks the node to set the parameter back to it. So at quiescence (nothing loading) the
parameter names the running policy, however fast sets arrive. The inference worker reads ``current`` once per
chunk, so a swap takes effect between chunks.

``validate`` is what the node's parameter set-callback runs: resolve the name inside the policy directories, verify
the folder's manifest, and check the action space against the running policy; it loads nothing.
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
    if cfg.kinds != old.kinds:
        problems.append(f'action kinds {cfg.kinds} != running {old.kinds}')
    if cfg.control_rate_hz != old.control_rate_hz:
        problems.append(f'trained at {cfg.control_rate_hz} Hz, running policy at {old.control_rate_hz} Hz (the tick '
                        'rate is fixed at configure)')
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
    """Loads PolicyRunners with one set of engine options; holds the current one (see the module docstring)."""

    def __init__(self, policy_dirs: Sequence[str], engine: str, *, decoder: Optional[str] = None,
                 overrides: Optional[dict] = None, require_gpu: bool = False, threads: Optional[int] = None,
                 engine_options: Optional[dict] = None, warmup_runs: int = 2,
                 on_swap_done: Optional[Callable[[str, Optional[str], Optional[str]], None]] = None):
        self.policy_dirs = [str(d) for d in policy_dirs]
        self.engine = engine
        self.load_kwargs = dict(engine=engine, decoder=decoder or None, overrides=overrides or None,
                                require_gpu=require_gpu, threads=threads or None,
                                engine_options=dict(engine_options) if engine_options else None)
        self.warmup_runs = int(warmup_runs)
        self.on_swap_done = on_swap_done  # (name, error or None, parameter value to restore or None)
        self._lock = threading.Lock()
        self.current: Optional[Any] = None
        self.current_name: Optional[str] = None
        self.requested: Optional[str] = None
        self.pending: Optional[str] = None
        self._loader: Optional[threading.Thread] = None
        self._closed = False
        self.last_swap_error = ''
        self.swaps = 0
        self.superseded = 0  # loads finished after a newer request (discarded)
        self.load_seconds: Optional[float] = None

    # --- validation (cheap enough for a parameter callback: hashes, no model) -----------------------------
    def inspect(self, name: str) -> PolicySpec:
        """Resolve ``name`` inside the policy directories and verify its folder (PolicyFolderError if not)."""
        return load_policy_folder(resolve_policy(name, self.policy_dirs))

    def validate(self, name: str) -> PolicySpec:
        """Everything the set-callback checks before a swap; raises (ValueError with the reason, or whatever a
        malformed folder makes the loader raise: the caller catches every exception)."""
        spec = self.inspect(name)
        current = self.current
        if current is not None:
            check_compatible(spec, current)
        return spec

    def _names_folder(self, name: Optional[str], folder) -> bool:
        if name is None or folder is None:
            return False
        try:
            return resolve_policy(name, self.policy_dirs) == Path(folder).resolve()
        except (PolicyFolderError, OSError):
            return False

    def is_running(self, name: str) -> bool:
        """True when ``name`` resolves to the folder of the running policy (a no-op swap)."""
        current = self.current
        return current is not None and self._names_folder(name, current.folder)

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
        """Blocking load + warm-up (lifecycle configure); becomes the current and requested policy."""
        runner = self._load(name)
        with self._lock:
            self.current, self.current_name, self.requested = runner, name, name
        return runner

    def request(self, name: str) -> str:
        """The ``policy`` parameter now says ``name``: 'running' (nothing to do), 'loading' (a load started) or
        'queued' (another load is in flight; this one follows it unless a newer request comes first)."""
        with self._lock:
            self.requested = name
            return self._advance_locked()

    def _advance_locked(self) -> str:
        if self.pending is not None:
            return 'queued'
        if self._closed or self.requested is None or (
                self.current is not None and self._names_folder(self.requested, self.current.folder)):
            return 'running'
        self.pending = name = self.requested
        self._loader = threading.Thread(target=self._swap_thread, args=(name,), daemon=True,
                                        name='blockvla-policy-loader')
        self._loader.start()
        return 'loading'

    def _swap_thread(self, name: str) -> None:
        error, runner = None, None
        try:
            runner = self._load(name)
            current = self.current
            if current is not None:
                check_compatible(runner, current)
        except Exception as e:  # the old policy keeps running; the reason goes to diagnostics
            error, runner = f'{type(e).__name__}: {e}', None
            log.error('policy swap to %r failed, keeping %r: %s', name, self.current_name, error)
        restore = None
        with self._lock:
            self.pending = None
            if runner is not None and not self._closed and self.requested == name:
                self.current, self.current_name = runner, name
                self.swaps += 1
                self.last_swap_error = ''
                log.info('policy %r takes over at the next chunk', name)
            elif runner is not None:
                self.superseded += 1
                log.info('policy %r loaded after a newer request (%r): discarded', name, self.requested)
            else:
                self.last_swap_error = f'{name}: {error}'
                if self.requested == name and self.current_name is not None:
                    self.requested = restore = self.current_name  # the parameter goes back to the running one
            self._advance_locked()
        if self.on_swap_done is not None:
            self.on_swap_done(name, error, restore)

    @property
    def loading(self) -> Optional[str]:
        with self._lock:
            return self.pending

    def wait_loaded(self, timeout: float) -> bool:
        """Wait until no load is in flight, following any load that a finished one started (tests, shutdown)."""
        end = time.monotonic() + timeout
        while True:
            loader = self._loader
            if loader is not None:
                loader.join(max(0.0, end - time.monotonic()))
            if self.loading is None:
                return True
            if time.monotonic() >= end:
                return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.wait_loaded(30.0)
        with self._lock:
            self.current = None

    def diagnostics(self) -> dict:
        """What the node reports about its policies (thread-safe)."""
        with self._lock:
            runner = self.current
            out = {'pending_policy': self.pending or '', 'requested_policy': self.requested or '',
                   'policy_swaps': self.swaps, 'policy_loads_superseded': self.superseded,
                   'last_swap_error': self.last_swap_error}
        if runner is not None:
            out['policy'] = runner.name
            out['policy_folder'] = str(runner.folder)
            try:
                describe = dict(runner.describe())
            except Exception as e:  # a describe() bug must not take the diagnostics down
                describe = {'describe_error': str(e)}
            out['backend'] = describe.get('engine', self.engine)
            out.update({f'runtime.{k}': v for k, v in describe.items()})
            out['chunk_len'] = runner.config.chunk_len
            out['action_dim'] = runner.config.action_dim
        return out
