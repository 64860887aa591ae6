"""GraphEngine: the Engine over a policy folder's exported graphs (shared by ONNX Runtime and TensorRT).

    vision.onnx    pixels -> image_tokens                                   (once per prediction)
    backbone.onnx  embeds, positions, mask, logit_rows, past_key_i / past_value_i -> logits (of logit_rows), new_kv
                                                                            (every pass; dynamic n, past, m)
    tables.safetensors                                                      (numpy lookups: runtime.tables)

The cache is one preallocated [layers, 2, kv_heads, T_max, head_dim] buffer; each `past_*` input is bound once to
its layer's slice of it (a view, no copy), and only the slots a pass commits are written into it. Per token count
n, a backend binds one set of I/O buffers the first time it sees n and reuses them afterwards, so nothing is
allocated per pass.
"""
from __future__ import annotations

import logging

import numpy as np

from .engine import Engine
from .policy_folder import PolicyFolderError, PolicySpec, TensorSpec
from .tables import Tables, TablesError

log = logging.getLogger(__name__)


def check_io(spec: TensorSpec, shape, dtype, where: str) -> None:
    """A backend's view of a tensor must equal what policy.yaml records (same dims and symbols, same dtype)."""
    norm = [d if isinstance(d, str) else int(d) for d in shape]
    want = [d if isinstance(d, str) else int(d) for d in spec.shape]
    if norm != want or np.dtype(dtype) != np.dtype(spec.dtype):
        raise PolicyFolderError(f'{where}: tensor {spec.name!r} is {norm} {np.dtype(dtype)}, policy.yaml says '
                                f'{want} {spec.dtype}')


class GraphEngine(Engine):
    """Opens the tables and checks them against the policy; backends add the two graph calls."""

    def __init__(self, spec: PolicySpec, reuse_text_kv: bool = True):
        self.spec = spec
        cfg = spec.config
        path = spec.folder / spec.tables
        try:  # their layout and sizes were checked when the folder loaded (policy_folder.check_tables)
            tables = Tables.open(path, dtype=np.dtype(spec.float_dtype))
        except (TablesError, OSError) as e:
            raise PolicyFolderError(f'{path}: {e}') from e
        backbone = spec.graphs['backbone']
        rows = backbone.tensor('mask').shape[0]
        if rows != max(len(cfg.attention_windows), 1):
            raise PolicyFolderError(f'{spec.folder}: backbone.onnx takes {rows} mask rows, config.attention_windows '
                                    f'{cfg.attention_windows} needs {max(len(cfg.attention_windows), 1)}')
        self.past_names = [t.name for t in backbone.inputs if t.name.startswith('past_')]
        self._start()
        super().__init__(cfg, spec.kv_shape, tables, reuse_instruction=reuse_text_kv)

    def _start(self) -> None:
        """Runs before the cache is allocated (e.g. open the sessions, decide host or device buffers)."""

    def past_views(self) -> list:
        """(name, layer, k_or_v) for every past input, in graph order."""
        return [(name, int(name.rsplit('_', 1)[1]), 0 if name.startswith('past_key') else 1)
                for name in self.past_names]
