"""Open-loop metrics of predicted action chunks against recorded actions: pure numpy, physical units.

Conventions (one episode, T ticks at the control rate, chunks of H steps x D dims):
- chunk i starts at tick ``starts[i]``; its step h is compared with the recorded action at tick
  ``starts[i] + h`` (steps past the episode end are not compared);
- the *executed* trajectory is what a robot executing ``execute_steps`` of each chunk would send:
  tick t takes the latest chunk started at or before t (if t is still inside it);
- the *seam jump* of chunk i > 0 is |chunk_i[k] - chunk_{i-1}[j]| with k = ``offset`` (the first step
  the new chunk decided itself; 0 without real-time chunking) and j = starts[i] + k - starts[i-1], the
  previous chunk's plan for the same tick; when the previous chunk planned nothing that far
  (execute_steps = H), j is its last step, i.e. the jump between consecutive commanded actions.
Sums and counts are kept (``ErrorStats``) so that per-bag and overall figures pool every compared
pair exactly instead of averaging averages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def check_chunks(chunks: np.ndarray, starts: np.ndarray, n_ticks: int) -> tuple[np.ndarray, np.ndarray]:
    """chunks float [N, H, D] and strictly increasing int starts [N] within [0, n_ticks); else ValueError."""
    chunks = np.asarray(chunks, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if chunks.ndim != 3:
        raise ValueError(f'chunks must be [N, H, D], got shape {chunks.shape}')
    if chunks.shape[0] != starts.shape[0]:
        raise ValueError(f'{chunks.shape[0]} chunks but {starts.shape[0]} start ticks')
    if starts.size and (starts.min() < 0 or starts.max() >= n_ticks or np.any(np.diff(starts) <= 0)):
        raise ValueError(f'chunk start ticks must increase strictly within [0, {n_ticks}), got {starts.tolist()}')
    return chunks, starts


def recorded_windows(recorded: np.ndarray, starts: np.ndarray, horizon: int) -> np.ndarray:
    """The recorded actions each chunk is compared with: [N, H, D], NaN past the episode end."""
    recorded = np.asarray(recorded, dtype=np.float64)
    n_ticks, dim = recorded.shape
    index = np.asarray(starts, np.int64)[:, None] + np.arange(horizon)[None, :]  # [N, H]
    padded = np.concatenate([recorded, np.full((1, dim), np.nan)])  # [T + 1, D]; row T = "no action"
    return padded[np.minimum(index, n_ticks)]  # [N, H] -> [N, H, D]


def executed_trajectory(chunks: np.ndarray, starts: np.ndarray, n_ticks: int, execute_steps: int) -> np.ndarray:
    """[T, D] the actions a robot would send; NaN on ticks no chunk covers."""
    chunks, starts = check_chunks(chunks, starts, n_ticks)
    _, horizon, dim = chunks.shape
    out = np.full((n_ticks, dim), np.nan)
    for i, start in enumerate(starts):
        stop = start + min(horizon, execute_steps)
        if i + 1 < len(starts):
            stop = min(stop, starts[i + 1])
        stop = min(stop, n_ticks)
        out[start:stop] = chunks[i, :stop - start]
    return out


def seam_jumps(chunks: np.ndarray, starts: np.ndarray, offset: int = 0) -> np.ndarray:
    """[N - 1, D] |new chunk's step ``offset`` - the previous chunk's plan for that tick (or its last
    step when it planned nothing that far)|, one row per seam."""
    chunks = np.asarray(chunks, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.int64)
    horizon = chunks.shape[1] if chunks.ndim == 3 else 0
    if not 0 <= offset < max(horizon, 1):
        raise ValueError(f'seam offset must be in [0, {horizon}), got {offset}')
    rows = []
    for i in range(1, len(starts)):
        j = min(int(starts[i] - starts[i - 1]) + offset, horizon - 1)
        rows.append(np.abs(chunks[i, offset] - chunks[i - 1, j]))
    return np.asarray(rows).reshape(-1, chunks.shape[-1])


@dataclass
class ErrorStats:
    """Sums of |error| and error^2 per dimension, overall and per horizon step (add with ``merge``)."""

    horizon: int
    dim: int
    sum_abs: np.ndarray = field(default=None)  # [D]
    sum_sq: np.ndarray = field(default=None)  # [D]
    count: int = 0  # compared (tick, dim-vector) pairs
    step_sum_abs: np.ndarray = field(default=None)  # [H, D]
    step_sum_sq: np.ndarray = field(default=None)  # [H, D]
    step_count: np.ndarray = field(default=None)  # [H]

    def __post_init__(self):
        zeros = {'sum_abs': (self.dim,), 'sum_sq': (self.dim,), 'step_sum_abs': (self.horizon, self.dim),
                 'step_sum_sq': (self.horizon, self.dim)}
        for name, shape in zeros.items():
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(shape))
        if self.step_count is None:
            self.step_count = np.zeros(self.horizon, dtype=np.int64)

    def add(self, predicted: np.ndarray, recorded: np.ndarray) -> None:
        """predicted / recorded [N, H, D]; pairs where recorded is NaN are skipped."""
        err = np.asarray(predicted, np.float64) - np.asarray(recorded, np.float64)  # [N, H, D]
        valid = ~np.isnan(recorded).any(axis=-1)  # [N, H]
        err = np.where(valid[..., None], err, 0.0)
        self.sum_abs += np.abs(err).sum(axis=(0, 1))
        self.sum_sq += (err ** 2).sum(axis=(0, 1))
        self.count += int(valid.sum())
        self.step_sum_abs += np.abs(err).sum(axis=0)
        self.step_sum_sq += (err ** 2).sum(axis=0)
        self.step_count += valid.sum(axis=0)

    def merge(self, other: ErrorStats) -> ErrorStats:
        if (other.horizon, other.dim) != (self.horizon, self.dim):
            raise ValueError(f'cannot merge error stats of shape H={other.horizon}, D={other.dim} '
                             f'into H={self.horizon}, D={self.dim}')
        return ErrorStats(self.horizon, self.dim, self.sum_abs + other.sum_abs, self.sum_sq + other.sum_sq,
                          self.count + other.count, self.step_sum_abs + other.step_sum_abs,
                          self.step_sum_sq + other.step_sum_sq, self.step_count + other.step_count)

    @property
    def mae(self) -> np.ndarray:
        """[D] mean absolute error (NaN without pairs)."""
        return self.sum_abs / self.count if self.count else np.full(self.dim, np.nan)

    @property
    def mse(self) -> np.ndarray:
        return self.sum_sq / self.count if self.count else np.full(self.dim, np.nan)

    @property
    def mae_by_step(self) -> np.ndarray:
        """[H, D]; NaN for steps never compared."""
        with np.errstate(invalid='ignore', divide='ignore'):
            return self.step_sum_abs / np.where(self.step_count > 0, self.step_count, np.nan)[:, None]

    @property
    def mse_by_step(self) -> np.ndarray:
        with np.errstate(invalid='ignore', divide='ignore'):
            return self.step_sum_sq / np.where(self.step_count > 0, self.step_count, np.nan)[:, None]


@dataclass
class SeamStats:
    """Sum, max and count of seam jumps per dimension (add with ``merge``)."""

    dim: int
    sum: np.ndarray = field(default=None)  # [D]
    max: np.ndarray = field(default=None)  # [D]
    count: int = 0

    def __post_init__(self):
        self.sum = np.zeros(self.dim) if self.sum is None else self.sum
        self.max = np.zeros(self.dim) if self.max is None else self.max

    def add(self, jumps: np.ndarray) -> None:
        """jumps [M, D] from ``seam_jumps``."""
        if len(jumps):
            self.sum = self.sum + jumps.sum(axis=0)
            self.max = np.maximum(self.max, jumps.max(axis=0))
            self.count += len(jumps)

    def merge(self, other: SeamStats) -> SeamStats:
        return SeamStats(self.dim, self.sum + other.sum, np.maximum(self.max, other.max), self.count + other.count)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count if self.count else np.full(self.dim, np.nan)


def gripper_dims(names: list[str]) -> list[int]:
    """Indices of dimensions whose name says gripper (reported separately from the arm)."""
    return [i for i, name in enumerate(names) if 'gripper' in name.lower()]


def percentiles(values) -> dict[str, float] | None:
    """{mean, p50, p90, p95, p99, max} of a sample, None when empty."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return None
    out = {'mean': float(v.mean())}
    out.update({f'p{q}': float(np.percentile(v, q)) for q in PERCENTILES})
    out['max'] = float(v.max())
    return out


def count_summary(values) -> dict[str, float] | None:
    """{mean, min, max, total} of integer counts (NFEs, graph calls), None when empty."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return None
    return {'mean': float(v.mean()), 'min': int(v.min()), 'max': int(v.max()), 'total': int(v.sum())}


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def error_summary(stats: ErrorStats, names: list[str]) -> dict:
    """JSON-ready: per-dimension MAE/MSE, the arm (non-gripper) mean, the gripper separately, per step."""
    mae, mse = stats.mae, stats.mse
    grip = gripper_dims(names)
    arm = [i for i in range(stats.dim) if i not in grip]
    out = {
        'pairs': int(stats.count),
        'per_dim': {n: {'mae': _finite(mae[i]), 'mse': _finite(mse[i])} for i, n in enumerate(names)},
        'arm': {'dims': [names[i] for i in arm],
                'mae': _finite(mae[arm].mean()) if arm and stats.count else None,
                'mse': _finite(mse[arm].mean()) if arm and stats.count else None},
        'gripper': None,
        'by_step': {'mae': [[_finite(x) for x in row] for row in stats.mae_by_step],
                    'mse': [[_finite(x) for x in row] for row in stats.mse_by_step],
                    'pairs': [int(c) for c in stats.step_count]},
    }
    if grip:
        out['gripper'] = {'dims': [names[i] for i in grip],
                          'mae': _finite(mae[grip].mean()) if stats.count else None,
                          'mse': _finite(mse[grip].mean()) if stats.count else None}
    return out


def seam_summary(stats: SeamStats, names: list[str]) -> dict:
    return {'seams': int(stats.count),
            'per_dim': {n: {'mean': _finite(stats.mean[i]) if stats.count else None,
                            'max': _finite(stats.max[i]) if stats.count else None} for i, n in enumerate(names)}}
