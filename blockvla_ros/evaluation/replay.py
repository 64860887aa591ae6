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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from blockvla_ros.evaluation import metrics
from blockvla_ros.runtime.action_output import ActionLimits, postprocess_chunk
from blockvla_ros.io.actions import generic_names
from blockvla_ros.io.bag_reader import BagError, Episode, TopicMap, iter_bag_paths, list_topics, read_episodes

logger = logging.getLogger(__name__)


@dataclass
class ReplaySettings:
    """How the replay steps through recorded time."""

    rate_hz: float = 10.0  # control rate the recorded episodes are sampled at
    execute_steps: int | None = None  # ticks between predictions; None: the chunk length H
    known_steps: int = 0  # real-time chunking: previous-chunk actions fed in as already decided
    limits: ActionLimits | None = None  # the robot's action limits, applied as the node applies them

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
        return ReplaySettings(float(self.rate_hz), execute, int(self.known_steps), self.limits)


@dataclass
class BagEpisodes:
    """The episodes of one bag, plus why errors cannot be computed for it (if so)."""

    path: str
    episodes: list[Episode]  # emptied by release() once every policy has replayed them
    topics: dict[str, str]  # filled only for bags without recorded actions (to say what they hold)
    no_actions_reason: str = ''  # '' when the bag has recorded actions
    infos: list[dict] = field(default_factory=list)  # per episode: instruction, ticks, has_actions, action_names
    read_s: float = 0.0  # time spent reading the bag

    def __post_init__(self):
        if not self.infos:
            self.infos = [{'instruction': ep.instruction, 'ticks': len(ep), 'has_actions': ep.actions is not None,
                           'action_names': list(ep.action_names)} for ep in self.episodes]

    def release(self) -> None:
        """Drop the images (the report keeps only ``infos``), so long datasets stream in bounded memory."""
        self.episodes = []


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
    clipped: int = 0  # action values changed by the action limits

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


def find_bags(paths: list[str | Path]) -> list[Path]:
    """Every bag under ``paths`` (bag dirs, .mcap/.db3 files, or dataset dirs); BagError if none."""
    found = [path for given in paths for path in iter_bag_paths(given)]
    if not found:
        raise BagError(f'no bags found in {", ".join(map(str, paths))}')
    return found


def read_bag(path: str | Path, topic_map: TopicMap, rate_hz: float, action_dim: int | None = None,
             state_dim: int | None = None) -> BagEpisodes:
    """One bag's episodes. A bag without the action topic still replays (errors are then not
    computed); a missing image / instruction / state topic, a corrupt or truncated file raises
    BagError naming the file."""
    began = time.perf_counter()
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
    return BagEpisodes(str(path), episodes, topics, reason, read_s=time.perf_counter() - began)


def load_bags(paths: list[str | Path], topic_map: TopicMap, rate_hz: float, action_dim: int | None = None,
              state_dim: int | None = None, progress: bool | None = None) -> list[BagEpisodes]:
    """Every bag under ``paths`` read into memory (see ``replay_bags`` for datasets of any size)."""
    found = find_bags(paths)
    return [read_bag(path, topic_map, rate_hz, action_dim, state_dim)
            for path in tqdm(found, desc='reading bags', unit='bag',
                             disable=None if progress is None else not progress)]


def _ticks(episode: Episode, execute_steps: int) -> list[int]:
    return list(range(0, len(episode), execute_steps))


def _in_policy_order(episode: Episode, cfg: Any, policy: str) -> Episode:
    """The episode's state and action columns in the policy's order of names, as the node reads joint states by name
    (a driver may list the joints in another order, or more of them). Unnamed columns (MultiArray: dim_i) or a
    policy without names stay as they are."""
    import dataclasses

    changes = {}
    for attr, names_attr, want in (('states', 'state_names', list(getattr(cfg, 'state_names', []) or [])),
                                   ('actions', 'action_names', list(getattr(cfg, 'action_names', []) or []))):
        values, got = getattr(episode, attr), list(getattr(episode, names_attr))
        if values is None or not want or not got or got == want or got == generic_names(len(got)) \
                or want == generic_names(len(want)):
            continue
        missing = [n for n in want if n not in got]
        if missing:
            raise BagError(f'{episode.bag_path}: policy {policy!r} reads {attr} {want}; the bag\'s {names_attr} '
                           f'{got} lack {missing}')
        changes[attr] = np.ascontiguousarray(values[:, [got.index(n) for n in want]])  # [T, len(want)]
        changes[names_attr] = want
    return dataclasses.replace(episode, **changes) if changes else episode


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
    episode = _in_policy_order(episode, cfg, runner.name)
    if needs_state and episode.states.shape[1] != cfg.state_dim:
        raise BagError(f'{episode.bag_path}: recorded states have {episode.states.shape[1]} dims, '
                       f'policy {runner.name!r} reads {cfg.state_dim}')
    if episode.actions is not None and episode.actions.shape[1] != dim:
        raise BagError(f'{episode.bag_path}: recorded actions have {episode.actions.shape[1]} dims, '
                       f'policy {runner.name!r} predicts {dim}')
    starts, chunks, nfe, calls = [], [], [], []
    clipped = 0
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
        if known is not None:
            actions[:len(known)] = known  # what was planned stays planned (as in the node)
        actions, n = postprocess_chunk(actions, 0 if known is None else len(known), s.limits)
        clipped += n
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
        executed_errors.add(np.where(keep[None, :, None], chunks_a, 0.0),
                            np.where(keep[None, :, None], windows, np.nan))
    return EpisodeReplay(
        bag_path=episode.bag_path, episode_index=episode_index, instruction=episode.instruction,
        stamps_ns=episode.stamps_ns, recorded=episode.actions, starts=starts_a, chunks=chunks_a,
        nfe=np.asarray(nfe), calls=np.asarray(calls), latency_ms={k: np.asarray(v) for k, v in lat.items()},
        executed=executed, errors=errors, executed_errors=executed_errors, seams=seams, clipped=clipped)


def _replay_bag(runner: Any, result: VariantReplay, bag: BagEpisodes, settings: ReplaySettings, bar) -> None:
    """Append one bag's episode replays to ``result``, timing them."""
    began = time.perf_counter()
    for i, episode in enumerate(bag.episodes):
        result.episodes.append(replay_episode(runner, episode, settings, i, on_chunk=lambda: bar.update(1)))
        result.recorded_s += len(episode) / settings.rate_hz
    result.wall_s += time.perf_counter() - began


def _new_result(runner: Any, label: str | None) -> VariantReplay:
    return VariantReplay(label or runner.name, dict(runner.describe()), list(runner.action_names),
                         int(runner.config.chunk_len))


def _bar(progress: bool | None, desc: str, total: int):
    return tqdm(total=total, desc=desc, unit='chunk', disable=None if progress is None else not progress)


def replay_variant(runner: Any, bags: list[BagEpisodes], settings: ReplaySettings, label: str | None = None,
                   progress: bool | None = None) -> VariantReplay:
    """Replay every episode of ``bags`` (in memory) through one runner."""
    s = settings.resolve(int(runner.config.chunk_len))
    result = _new_result(runner, label)
    total = sum(len(_ticks(ep, s.execute_steps)) for bag in bags for ep in bag.episodes)
    with _bar(progress, f'replay {result.label}', total) as bar:
        for bag in bags:
            _replay_bag(runner, result, bag, s, bar)
    logger.info('%s: replayed %.1f s of recordings in %.2f s (%.1fx real time)', result.label, result.recorded_s,
                result.wall_s, result.realtime_factor)
    return result


@dataclass
class ReplayRun:
    """Every variant over every bag, plus how long reading and the whole run took."""

    variants: list[VariantReplay]
    bags: list[BagEpisodes]  # released: infos only, no images
    read_s: float  # time spent reading bags (overlaps with prediction: read ahead on a thread)
    wall_s: float  # the whole run

    @property
    def recorded_s(self) -> float:
        return sum(v.recorded_s for v in self.variants)

    @property
    def realtime_factor(self) -> float:
        return self.recorded_s / self.wall_s if self.wall_s > 0 else float('inf')


def replay_bags(runners: list[tuple[Any, str | None]], paths: list[str | Path], topic_map: TopicMap,
                settings: ReplaySettings, action_dim: int | None = None, state_dim: int | None = None,
                progress: bool | None = None) -> ReplayRun:
    """Stream the bags under ``paths`` through every (runner, label): bag by bag, each bag read on a
    thread while the previous one is replayed (ONNX Runtime releases the GIL), its images dropped
    once every runner has seen it."""
    found = find_bags(paths)
    for runner, _ in runners:
        settings.resolve(int(runner.config.chunk_len))
    results = [_new_result(runner, label) for runner, label in runners]
    bags: list[BagEpisodes] = []
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix='bag_reader') as pool, \
            _bar(progress, 'replay', 0) as bar:
        pending = pool.submit(read_bag, found[0], topic_map, settings.rate_hz, action_dim, state_dim)
        for k in range(len(found)):
            bag = pending.result()  # BagError from the reader thread surfaces here
            if k + 1 < len(found):  # read ahead one bag
                pending = pool.submit(read_bag, found[k + 1], topic_map, settings.rate_hz, action_dim, state_dim)
            for (runner, _), result in zip(runners, results):
                s = settings.resolve(int(runner.config.chunk_len))
                bar.total += sum(len(_ticks(ep, s.execute_steps)) for ep in bag.episodes)
                bar.refresh()
                _replay_bag(runner, result, bag, s, bar)
            bag.release()
            bags.append(bag)
            recorded = sum(r.recorded_s for r in results)
            bar.set_postfix_str(f'bag {k + 1}/{len(found)}, {recorded / (time.perf_counter() - began):.1f}x real time')
    run = ReplayRun(results, bags, sum(b.read_s for b in bags), time.perf_counter() - began)
    for r in results:
        logger.info('%s: replayed %.1f s of recordings in %.2f s of prediction (%.1fx real time)', r.label,
                    r.recorded_s, r.wall_s, r.realtime_factor)
    return run
