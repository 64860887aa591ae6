"""A directory of rosbag2 recordings -> one list of episodes, checked against the policy's action/state widths.

Each bag yields one episode per instruction segment (io.bag_reader). Ticks with NaN/inf actions or states are
dropped by the reader; they are counted here and reported once for the whole dataset.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io.actions import generic_names
from ..io.bag_reader import BagError, Episode, iter_bag_paths, read_episodes
from ..model.config import BlockVLAConfig
from .config import DataConfig

log = logging.getLogger(__name__)

COUNTED = ('ticks_total', 'ticks', 'dropped_no_action', 'dropped_nan_action', 'dropped_nan_state',
           'dropped_stale_image')


@dataclass
class LoadReport:
    """What reading the dataset found: counts per reason, skipped bags and why."""

    bags: int = 0
    episodes: int = 0
    counts: dict = field(default_factory=lambda: {k: 0 for k in COUNTED})
    skipped_bags: list = field(default_factory=list)  # [(path, reason)]
    reordered_bags: list = field(default_factory=list)  # bags whose action/state names came in another order

    def to_dict(self) -> dict:
        return {'bags': self.bags, 'episodes': self.episodes, **self.counts,
                'skipped_bags': [f'{p}: {r}' for p, r in self.skipped_bags], 'reordered_bags': self.reordered_bags}


def bag_paths(data: DataConfig) -> list[Path]:
    """Every bag named by data.bags (directories are searched for bags), sorted and without duplicates."""
    if not data.bags:
        raise ValueError('data.bags is empty: name bag directories, .mcap/.db3 files or directories of bags')
    seen, out = set(), []
    for entry in data.bags:
        for path in iter_bag_paths(Path(entry).expanduser()):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def load_episodes(data: DataConfig, model: BlockVLAConfig, progress: bool = True) -> tuple[list, LoadReport]:
    """Read every bag into episodes with actions [T, D] (and states [T, S] when model.state_dim > 0)."""
    topic_map = data.topic_map()
    if model.state_dim and topic_map.state is None:
        raise ValueError(f'model.state_dim is {model.state_dim} but data.topics.state names no topic')
    if not model.state_dim and topic_map.state is not None:
        raise ValueError(f'data.topics.state is {topic_map.state!r} but model.state_dim is 0: set model.state_dim '
                         'to the width of that topic, or remove data.topics.state')
    report = LoadReport()
    episodes: list[Episode] = []
    names: dict = {'action': list(model.action_names)} if model.action_names else {}  # given names lead
    paths = bag_paths(data)
    for path in tqdm(paths, desc='reading bags', unit='bag', disable=not progress):
        report.bags += 1
        try:
            found = read_episodes(path, topic_map, data.rate_hz, use_header_stamps=data.use_header_stamps,
                                  progress=False, state_names=model.state_names or None,
                                  instruction=data.instruction)
            found = [_check_widths(ep, model, topic_map, names, report) for ep in found]
        except BagError as err:
            if data.on_bad_bag == 'error':
                raise
            log.warning('skipping bag: %s', err)
            report.skipped_bags.append((str(path), str(err)))
            continue
        for ep in found:
            for key in COUNTED:
                report.counts[key] += int(ep.stats.get(key, 0))
        episodes.extend(found)
    report.episodes = len(episodes)
    nan_a, nan_s = report.counts['dropped_nan_action'], report.counts['dropped_nan_state']
    if nan_a or nan_s:
        log.warning('dataset: skipped %d ticks with NaN/inf actions and %d with NaN/inf states (of %d ticks)',
                    nan_a, nan_s, report.counts['ticks_total'])
    if report.skipped_bags:
        log.warning('dataset: %d of %d bags skipped (data.on_bad_bag=skip)', len(report.skipped_bags), report.bags)
    if not episodes:
        raise ValueError(f'no usable episodes in {[str(p) for p in paths][:5]} (bags: {report.bags}, '
                         f'skipped: {len(report.skipped_bags)}); each episode needs images, an instruction and actions')
    return episodes, report


def _check_widths(ep: Episode, model: BlockVLAConfig, topic_map, names: dict, report: LoadReport) -> Episode:
    """Action/state widths must match the policy; names must match model.action_names when given, else the first
    bag's (columns reordered when only permuted: the policy's names label its columns, so a bag's names in another
    order must not relabel them). Given names that share none with a bag's relabel its columns by position."""
    checks = [('action', 'actions', 'action_names', model.action_dim, topic_map.action, 'model.action_dim')]
    if model.state_dim:
        checks.append(('state', 'states', 'state_names', model.state_dim, topic_map.state, 'model.state_dim'))
    for role, attr, name_attr, width, topic, knob in checks:
        values = getattr(ep, attr)
        if values is None:
            raise BagError(f'{ep.bag_path}: no {role} values on {topic!r}')
        if values.shape[1] != width:
            raise BagError(f'{ep.bag_path}: {role} topic {topic!r} has width {values.shape[1]} but {knob} is '
                           f'{width} (set {knob}={values.shape[1]} or map another topic)')
        got = list(getattr(ep, name_attr))
        want = names.setdefault(role, got)
        if want == generic_names(width):
            names[role] = got  # the first real names seen become the dataset's
            continue
        if got == want or got == generic_names(width):
            continue  # equal, or this bag has no names (MultiArray): columns match by position
        given = want == list(getattr(model, name_attr) or [])
        if given and not set(got) & set(want):
            continue  # the policy's own names for the bag's columns, by position (no name in common)
        if sorted(got) != sorted(want):
            source = (f"model.{name_attr}; names given in the config must be the bag's names in any order, or share "
                      'none to relabel by position') if given else 'first bag of the dataset'
            raise BagError(f'{ep.bag_path}: {role} names {got} differ from {want} ({source})')
        order = [got.index(n) for n in want]
        setattr(ep, attr, np.ascontiguousarray(values[:, order]))  # [T, D] columns in the dataset's order
        setattr(ep, name_attr, list(want))
        report.reordered_bags.append(ep.bag_path)
        log.info('%s: %s columns reordered to %s', ep.bag_path, role, want)
    return ep
