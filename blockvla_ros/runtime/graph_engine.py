"""GraphEngine: the Engine over a policy folder's exported graphs (shared by ONNX Runtime and TensorRT).

Buffers are bound once per graph and reused for every call; a few are shared between graphs so nothing is
copied between them:

    vision        pixels -> image_tokens (shared)
    prefill       text_ids, text_valid, image_tokens, (state) -> logits, kv [.., P, ..]
    text_prefill  text_ids, text_valid -> text_kv (shared; rerun only when the instruction changes)
    obs_prefill   image_tokens, text_kv, text_valid, (state) -> logits, kv [.., P - Lt, ..]
    step_<n>      tokens, positions, kv (= the KV cache buffer), kv_valid (= cache.valid) -> logits, new_kv

With `reuse_text_kv` (and a text-first prefix) the instruction's K/V is computed once and reused while the
instruction does not change; otherwise the one-call `prefill` graph runs.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import numpy as np

from .engine import Engine, PrefixInputs
from .policy_folder import PolicyFolderError, PolicySpec, TensorSpec

log = logging.getLogger(__name__)

SHARED_INPUTS = ('image_tokens', 'text_kv', 'kv', 'kv_valid')  # bound to engine-wide buffers
SHARED_OUTPUTS = ('image_tokens', 'text_kv')


class GraphCall(ABC):
    """One loaded graph with its I/O buffers bound once."""

    @abstractmethod
    def feed(self, name: str, array: np.ndarray) -> None:
        """Copy a host array into the bound input `name` (a no-op when it already is that buffer)."""

    @abstractmethod
    def run(self) -> None:
        ...

    @abstractmethod
    def host(self, name: str) -> np.ndarray:
        """Output `name` as a host array (valid until the next run; copy it to keep it)."""

    @abstractmethod
    def buffer(self, name: str):
        """Output `name` in the backend's buffer type (numpy or device array), for cache writes."""


def check_io(spec: TensorSpec, shape, dtype, where: str) -> None:
    """A backend's view of a tensor must equal what policy.yaml records (static shapes, same dtype)."""
    if [int(d) for d in shape] != [int(d) for d in spec.shape] or np.dtype(dtype) != np.dtype(spec.dtype):
        raise PolicyFolderError(f'{where}: tensor {spec.name!r} is {list(shape)} {np.dtype(dtype)}, '
                                f'policy.yaml says {spec.shape} {spec.dtype}')


class GraphEngine(Engine):
    """Implements prefill/step over the graphs; backends implement `_open(key)` and the buffer type."""

    def __init__(self, spec: PolicySpec, reuse_text_kv: bool = True):
        self.spec = spec
        self.reuse_text_kv = bool(reuse_text_kv) and spec.split_prefill and spec.config.prefix_order == 'text_first'
        self._graphs: dict = {}
        self._shared: dict = {}
        self._text_key = None
        self.text_kv_reused = False  # whether the last prefill reused the instruction's K/V
        self._start()
        super().__init__(spec.config, spec.kv_shape)
        self._shared['kv'] = self.cache.buffer
        layers, kv_heads, head_dim = spec.kv_shape
        self._prefix_kv = (self._alloc((layers, 2, kv_heads, spec.config.prefix_len, head_dim))
                           if self.reuse_text_kv else None)

    # --- backend hooks ----------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Runs before the cache is allocated (e.g. decide host or device buffers)."""

    @abstractmethod
    def _open(self, key: str) -> GraphCall:
        """Load graph `key` of the policy folder and bind its buffers (use `shared_buffer` for SHARED names)."""

    @abstractmethod
    def _new_buffer(self, spec: TensorSpec):
        """A zeroed buffer for a shared tensor."""

    # --- graphs and shared buffers ----------------------------------------------------------------------------
    def graph(self, key: str) -> GraphCall:
        g = self._graphs.get(key)
        if g is None:
            if key not in self.spec.graphs:
                raise PolicyFolderError(f'{self.spec.folder}: graph {key!r} is not in policy.yaml')
            g = self._graphs[key] = self._open(key)
        return g

    def open_all(self) -> None:
        """Load every graph now (sessions/engines are otherwise opened on first use)."""
        for key in self.spec.graphs:
            self.graph(key)

    def shared_buffer(self, spec: TensorSpec):
        if spec.name == 'kv_valid':
            return self.cache.valid
        buf = self._shared.get(spec.name)
        if buf is None:
            buf = self._shared[spec.name] = self._new_buffer(spec)
        elif tuple(buf.shape) != tuple(spec.shape):
            raise PolicyFolderError(f'{self.spec.folder}: shared tensor {spec.name!r} is {list(buf.shape)} in one '
                                    f'graph and {spec.shape} in another')
        return buf

    # --- Engine hooks -----------------------------------------------------------------------------------------
    def _prefill(self, prefix: PrefixInputs):
        vision = self.graph('vision')
        vision.feed('pixels', prefix.pixels)
        vision.run()  # -> shared image_tokens
        if self.reuse_text_kv:
            return self._split_prefill(prefix)
        self.text_kv_reused = False
        g = self.graph('prefill')
        g.feed('text_ids', prefix.text_ids)
        g.feed('text_valid', prefix.text_valid)
        if self.config.state_dim:
            g.feed('state', prefix.state)
        g.run()
        return g.host('logits')[0].copy(), g.buffer('kv')

    def _split_prefill(self, prefix: PrefixInputs):
        lt = self.config.max_text_tokens
        key = prefix.text_ids.tobytes() + prefix.text_valid.tobytes()
        self.text_kv_reused = key == self._text_key
        if not self.text_kv_reused:
            t = self.graph('text_prefill')
            t.feed('text_ids', prefix.text_ids)
            t.feed('text_valid', prefix.text_valid)
            t.run()  # -> shared text_kv
            self._prefix_kv[:, :, :, :lt] = t.buffer('text_kv')
            self._text_key = key
        g = self.graph('obs_prefill')
        g.feed('text_valid', prefix.text_valid)
        if self.config.state_dim:
            g.feed('state', prefix.state)
        g.run()
        self._prefix_kv[:, :, :, lt:] = g.buffer('kv')
        return g.host('logits')[0].copy(), self._prefix_kv

    def _step(self, tokens: np.ndarray, positions: np.ndarray):
        g = self.graph(self.spec.step_key(tokens.shape[1]))
        g.feed('tokens', tokens)
        g.feed('positions', positions)
        g.feed('kv_valid', self.cache.valid)
        g.run()
        return g.host('logits')[0].copy(), g.buffer('new_kv')  # logits [1, n, V] -> [n, V]

    def forget_instruction(self) -> None:
        """Drop the reused instruction K/V (the next prefill recomputes it)."""
        self._text_key = None
