"""Aligning message streams on control ticks: pure numpy, no bag access.

A tick at time t takes, from each stream, the latest message whose stamp is <= t + period/2
(ties: the one recorded last). With observations and actions stamped at the control rate this
picks exactly the message of each tick, whatever the phase of the tick clock.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def period_ns(rate_hz: float) -> float:
    """Control period in nanoseconds (float, so that ticks do not drift for odd rates)."""
    if not rate_hz > 0:
        raise ValueError(f'rate_hz must be > 0, got {rate_hz}')
    return 1e9 / float(rate_hz)


def tick_times(start_ns: int, end_ns: int, rate_hz: float) -> np.ndarray:
    """int64 ticks start_ns + round(k * period) for k = 0, 1, ... while tick <= end_ns."""
    if end_ns < start_ns:
        return np.zeros(0, dtype=np.int64)
    period = period_ns(rate_hz)
    count = int(np.floor((end_ns - start_ns) / period)) + 1
    ticks = start_ns + np.rint(np.arange(count) * period).astype(np.int64)
    return ticks[ticks <= end_ns]


def sort_by_stamp(stamps_ns: np.ndarray) -> np.ndarray:
    """Stable order by stamp (recording order breaks ties, so 'latest' is the last recorded)."""
    return np.argsort(np.asarray(stamps_ns, dtype=np.int64), kind='stable')


def latest_indices(sorted_stamps_ns: np.ndarray, ticks_ns: np.ndarray, rate_hz: float,
                   lower_ns: int | None = None, upper_ns: int | None = None) -> np.ndarray:
    """Per tick, the index into ``sorted_stamps_ns`` of the latest stamp <= tick + period/2.

    Only stamps in [lower_ns, upper_ns) count; -1 where no stamp qualifies.
    """
    stamps = np.asarray(sorted_stamps_ns, dtype=np.int64)
    limit = np.asarray(ticks_ns, dtype=np.int64) + int(period_ns(rate_hz) // 2)
    if upper_ns is not None:
        limit = np.minimum(limit, upper_ns - 1)
    index = np.searchsorted(stamps, limit, side='right') - 1
    if lower_ns is not None:
        first = int(np.searchsorted(stamps, lower_ns, side='left'))
        index[index < first] = -1
    return index


@dataclass
class AlignedSegment:
    """One instruction segment on the tick grid, after dropping unusable ticks."""

    ticks_ns: np.ndarray  # int64 [T] kept tick times
    image_index: np.ndarray  # int64 [T] index into the sorted image stamps
    rows: dict[str, np.ndarray]  # 'action' / 'state' -> float32 [T, D]
    stats: dict[str, int]  # ticks_total, ticks, dropped_no_action, dropped_nan_<role>
    skipped: str = ''  # why the segment yields no episode ('' when it does)


def align_segment(start_ns: int, end_ns: int | None, rate_hz: float, first_seen_ns: int, last_obs_ns: int,
                  image_stamps: np.ndarray, vectors: dict[str, tuple[np.ndarray, np.ndarray]],
                  max_image_age_ns: int | None = None) -> AlignedSegment:
    """Ticks of the segment [start_ns, end_ns) and what each takes from every stream.

    Ticks start at max(start_ns, first_seen_ns) (an observation exists); they end half a period
    after the last observation (last_obs_ns) or the segment's last action. ``vectors`` maps
    'action' / 'state' to (sorted stamps [N], values [N, D]). Actions only count from half a
    period before the segment start to its end; ticks without one, or with a non-finite action
    or state, are dropped and counted. With ``max_image_age_ns``, the segment also ends at the first
    gap longer than that in the camera stream, and ticks whose newest image is older are dropped
    (both counted as ``dropped_stale_image``): e.g. a stray action stamped across the pause between
    two episodes would otherwise repeat the last image and action over the whole pause.
    """
    half = int(period_ns(rate_hz) // 2)
    last = last_obs_ns
    if 'action' in vectors:
        stamps = vectors['action'][0]
        in_segment = stamps >= start_ns - half
        if end_ns is not None:
            in_segment &= stamps < end_ns
        inside = stamps[in_segment]
        if inside.size == 0:
            return _empty('no action messages')
        last = min(last, int(inside[-1]))
    stop = last + half if end_ns is None else min(last + half, end_ns - 1)
    ticks = tick_times(max(start_ns, first_seen_ns), stop, rate_hz)
    if ticks.size == 0:
        return _empty('no complete observation')
    stats = {'ticks_total': int(ticks.size)}
    if max_image_age_ns is not None:  # the segment ends before a gap in the camera stream, never across it
        gap_end = _before_gap(np.asarray(image_stamps, np.int64), ticks, rate_hz, max_image_age_ns)
        ticks = ticks[ticks <= gap_end + half]
    keep = np.ones(ticks.size, dtype=bool)
    rows = {}
    for role in ('action', 'state'):
        if role not in vectors:
            continue
        stamps, values = vectors[role]
        bounds = (start_ns - half, end_ns) if role == 'action' else (None, None)
        index = latest_indices(stamps, ticks, rate_hz, *bounds)
        if role == 'action':
            stats['dropped_no_action'] = int(np.sum(index < 0))
            keep &= index >= 0
        picked = values[np.maximum(index, 0)]  # [N, D] -> [T, D]; rows without a message are dropped below
        finite = np.all(np.isfinite(picked), axis=1)
        stats[f'dropped_nan_{role}'] = int(np.sum(keep & ~finite))
        keep &= finite
        rows[role] = picked
    image_index = latest_indices(image_stamps, ticks, rate_hz)
    if max_image_age_ns is not None:
        age = ticks - np.asarray(image_stamps, np.int64)[np.maximum(image_index, 0)]
        stale = (image_index < 0) | (age > max_image_age_ns)
        keep &= ~stale
        stats['dropped_stale_image'] = stats['ticks_total'] - ticks.size + int(np.sum(stale))
    stats['ticks'] = int(keep.sum())
    return AlignedSegment(ticks[keep], image_index[keep], {r: v[keep] for r, v in rows.items()}, stats,
                          '' if keep.any() else 'every tick was dropped')


def _before_gap(image_stamps: np.ndarray, ticks: np.ndarray, rate_hz: float, max_gap_ns: int) -> int:
    """The stamp of the last image before the first gap longer than max_gap_ns among the images the ticks see, or
    between the last of them and the last tick (the last tick when there is no gap)."""
    first, last = latest_indices(image_stamps, ticks[[0, -1]], rate_hz)
    seen = np.append(image_stamps[max(first, 0):last + 1], ticks[-1])  # the last tick closes the last gap
    gaps = np.nonzero(np.diff(seen) > max_gap_ns)[0]
    return int(seen[gaps[0]]) if gaps.size else int(ticks[-1])


def _empty(reason: str) -> AlignedSegment:
    return AlignedSegment(np.zeros(0, np.int64), np.zeros(0, np.int64), {}, {'ticks_total': 0, 'ticks': 0}, reason)
