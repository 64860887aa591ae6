"""Deterministic open-loop replay: recorded episodes -> the policy runner, stepped on recorded time.

Every ``execute_steps`` ticks of the control clock the runner predicts a chunk from that tick's
observation (image, instruction, state), as the robot would; nothing waits for real time. The
episodes come from ``io.bag_reader.read_episodes``, so images go through the node's conversion, and
predictions go through ``PolicyRunner.predict``, the node's inference call.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from blockvla_ros.evaluation import metrics
from blockvla_ros.io.bag_reader import BagError, Episode, TopicMap, iter_bag_paths, list_topics, read_episodes

logger = logging.getLogger(__name__)


@dataclass
class ReplaySettings:
    """How the replay steps through recorded time."""

    rate_hz: float = 10.0  # control rate the recorded episodes are sampled at
    execute_steps: int | None = None  # ticks between predictions; None: the chunk length H
    known_steps: int = 0  # real-time chunking: previous-chunk actions fed in as already decided

    def resolve(self, horizon: int) -> ReplaySettings:
        """Settings with execute_steps filled in and checked against the chunk length."""
        execute = horizon if self.execute_steps is None else int(self.execute_steps)
        if not 1 <= execute <= horizon:
            raise ValueError(f'execute_steps must be in [1, {horizon}] (the chunk length), got {execute}')
        if not 0 <= self.known_steps or execute + self.known_steps > horizon:
            raise ValueError(f'known_steps must be >= 0 with execute_steps + known_steps <= {horizon} '
                             f'(the chunk length), got known_steps={self.known_steps}, execute_steps={execute}')
        if not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise ValueError(f'rate_hz must be a positive number, got {self.rate_hz}')
        return ReplaySettings(float(self.rate_hz), execute, int(self.known_steps))


@dataclass
class BagEpisodes:
    """The episodes of one bag, plus why errors cannot be computed for it (if so)."""

    path: str
    episodes: list[Episode]
    topics: dict[str, str]  # filled only for bags without recorded actions (to say what they hold)
    no_actions_reason: str = ''  # '' when the bag has recorded actions


@dataclass
class EpisodeReplay:
    """One policy over one episode: every predicted chunk and what it is compared with."""

    bag_path: str
    episode_index: int
    instruction: str
    stamps_ns: np.ndarray  # int64 [T]
    recorded: np.ndarray | None  # float [T, D]
    starts: np.ndarray  # int64 [N] tick of each prediction
    chunks: np.ndarray  # float32 [N, H, D]
    nfe: np.ndarray  # int [N]
    calls: np.ndarray  # int [N]
    latency_ms: dict[str, np.ndarray]  # total / prefill / decode / wall -> [N]
    executed: np.ndarray  # float [T, D] what the robot would have sent
    errors: metrics.ErrorStats | None  # every chunk step vs the recorded action of its tick
    executed_errors: metrics.ErrorStats | None  # executed trajectory vs recorded (steps < execute_steps)
    seams: metrics.SeamStats

    @property
    def n_ticks(self) -> int:
        return int(self.stamps_ns.shape[0])


@dataclass
class VariantReplay:
    """One policy/decoder over all bags."""

    label: str
    description: dict[str, Any]
    action_names: list[str]
    horizon: int
    episodes: list[EpisodeReplay] = field(default_factory=list)
    wall_s: float = 0.0  # replay loop only (bag reading is shared by all variants)
    recorded_s: float = 0.0  # recorded time stepped through

    @property
    def realtime_factor(self) -> float:
        return self.recorded_s / self.wall_s if self.wall_s > 0 else float('inf')


def load_bags(paths: list[str | Path], topic_map: TopicMap, rate_hz: float, action_dim: int | None = None,
              state_dim: int | None = None, progress: bool | None = None) -> list[BagEpisodes]:
    """Read every bag under ``paths`` (bag dirs, .mcap/.db3 files, or dataset dirs) into episodes.

    A bag without the action topic still replays (errors are then not computed); a missing image /
    instruction / state topic, a corrupt or truncated file raises BagError naming the file.
    """
    found = [path for given in paths for path in iter_bag_paths(given)]
    if not found:
        raise BagError(f'no bags found in {", ".join(map(str, paths))}')
    bags = []
    for path in tqdm(found, desc='reading bags', unit='bag', disable=None if progress is None else not progress):
        episodes = read_episodes(path, topic_map, rate_hz, require_actions=False, action_dim=action_dim,
                                 state_dim=state_dim, progress=False)
        reason, topics = '', {}
        if topic_map.action is None:
            reason = 'no action topic was given'
        elif not episodes or any(ep.actions is None for ep in episodes):
            topics = list_topics(path)  # opened again only to say what the bag holds instead
            if topic_map.action not in topics:
                reason = f'the bag has no action topic {topic_map.action!r} (topics: {", ".join(sorted(topics))})'
        if not episodes:
            logger.warning('%s: no episodes to replay', path)
        bags.append(BagEpisodes(str(path), episodes, topics, reason))
    return bags


def _ticks(episode: Episode, execute_steps: int) -> list[int]:
    return list(range(0, len(episode), execute_steps))


def replay_episode(runner: Any, episode: Episode, settings: ReplaySettings, episode_index: int = 0,
                   on_chunk=None) -> EpisodeReplay:
    """Predict a chunk every ``execute_steps`` ticks of ``episode`` and compare with its actions."""
    cfg = runner.config
    horizon, dim = int(cfg.chunk_len), int(cfg.action_dim)
    s = settings.resolve(horizon)
    needs_state = bool(getattr(cfg, 'state_dim', 0))
    if needs_state and episode.states is None:
        raise BagError(f'{episode.bag_path}: policy {runner.name!r} needs a {cfg.state_dim}-dim state but the '
                       f'episode has none (map a state topic)')
    if episode.actions is not None and episode.actions.shape[1] != dim:
        raise BagError(f'{episode.bag_path}: recorded actions have {episode.actions.shape[1]} dims, '
                       f'policy {runner.name!r} predicts {dim}')
    starts, chunks, nfe, calls = [], [], [], []
    lat = {'total': [], 'prefill': [], 'decode': [], 'wall': []}
    for t in _ticks(episode, s.execute_steps):
        known = None
        if s.known_steps and chunks:
            k = t - starts[-1]  # the previous chunk's step planned for tick t
            known = chunks[-1][k:k + s.known_steps]  # [K, D]
        state = episode.states[t] if needs_state else None
        began = time.perf_counter()
        try:
            pred = runner.predict(episode.images[t], episode.instruction, state=state, known_actions=known)
        except ValueError as err:  # e.g. an instruction longer than the policy accepts: say where
            raise ValueError(f'{episode.bag_path}: episode {episode_index} ({episode.instruction!r}), tick {t}: '
                             f'policy {runner.name!r} refused the observation: {err}') from err
        wall_ms = 1e3 * (time.perf_counter() - began)
        actions = np.asarray(pred.actions, dtype=np.float32)
        if actions.shape != (horizon, dim):
            raise ValueError(f'policy {runner.name!r} returned actions of shape {actions.shape}, '
                             f'expected ({horizon}, {dim})')
        starts.append(t)
        chunks.append(actions)
        nfe.append(int(pred.nfe))
        calls.append(int(pred.calls))
        timings = dict(pred.timings or {})
        lat['total'].append(float(timings.get('total_ms', wall_ms)))
        lat['prefill'].append(float(timings.get('prefill_ms', np.nan)))
        lat['decode'].append(float(timings.get('decode_ms', np.nan)))
        lat['wall'].append(wall_ms)
        if on_chunk is not None:
            on_chunk()
    starts_a = np.asarray(starts, np.int64)
    chunks_a = np.stack(chunks) if chunks else np.zeros((0, horizon, dim), np.float32)  # N x [H, D] -> [N, H, D]
    executed = metrics.executed_trajectory(chunks_a, starts_a, len(episode), s.execute_steps)
    seams = metrics.SeamStats(dim)
    seams.add(metrics.seam_jumps(chunks_a, starts_a, offset=s.known_steps))
    errors = executed_errors = None
    if episode.actions is not None:
        windows = metrics.recorded_windows(episode.actions, starts_a, horizon)  # [N, H, D]
        errors = metrics.ErrorStats(horizon, dim)
        errors.add(chunks_a, windows)
        executed_errors = metrics.ErrorStats(horizon, dim)
        keep = np.arange(horizon) < s.execute_steps  # [H]: the steps a robot would execute
        executed_errors.add(np.where(keep[None, :, None], chunks_a, 0.0), np.where(keep[None, :, None], windows, np.nan))
    return EpisodeReplay(
        bag_path=episode.bag_path, episode_index=episode_index, instruction=episode.instruction,
        stamps_ns=episode.stamps_ns, recorded=episode.actions, starts=starts_a, chunks=chunks_a,
        nfe=np.asarray(nfe), calls=np.asarray(calls), latency_ms={k: np.asarray(v) for k, v in lat.items()},
        executed=executed, errors=errors, executed_errors=executed_errors, seams=seams)


def replay_variant(runner: Any, bags: list[BagEpisodes], settings: ReplaySettings, label: str | None = None,
                   progress: bool | None = None) -> VariantReplay:
    """Replay every episode of ``bags`` through one runner."""
    cfg = runner.config
    s = settings.resolve(int(cfg.chunk_len))
    label = label or runner.name
    result = VariantReplay(label, dict(runner.describe()), list(runner.action_names), int(cfg.chunk_len))
    total = sum(len(_ticks(ep, s.execute_steps)) for bag in bags for ep in bag.episodes)
    began = time.perf_counter()
    with tqdm(total=total, desc=f'replay {label}', unit='chunk', disable=None if progress is None else not progress) as bar:
        for bag in bags:
            for i, episode in enumerate(bag.episodes):
                result.episodes.append(replay_episode(runner, episode, s, i, on_chunk=lambda: bar.update(1)))
                result.recorded_s += len(episode) / s.rate_hz
                elapsed = time.perf_counter() - began
                bar.set_postfix_str(f'{result.recorded_s / max(elapsed, 1e-9):.1f}x real time')
    result.wall_s = time.perf_counter() - began
    logger.info('%s: replayed %.1f s of recordings in %.2f s (%.1fx real time)', label, result.recorded_s,
                result.wall_s, result.realtime_factor)
    return result
