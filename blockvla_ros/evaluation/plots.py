"""PNG plots of a replay (matplotlib, Agg backend): predicted vs recorded over time, error vs horizon.

Each figure is rendered to memory and written atomically; the functions return the file names.
"""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from blockvla_ros.evaluation.replay import EpisodeReplay, VariantReplay
from blockvla_ros.io.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format='png', dpi=90)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('_')[:60] or 'bag'


def trajectory_plot(episodes: list[EpisodeReplay], labels: list[str], names: list[str], rate_hz: float,
                    path: Path, title: str) -> None:
    """One episode, every variant: the executed (predicted) actions and the recorded ones per dimension.

    ``episodes[i]`` is variant ``labels[i]``'s replay of the same episode. Dots mark chunk starts,
    thin lines show each whole predicted chunk.
    """
    plt = _pyplot()
    dim = len(names)
    fig, axes = plt.subplots(dim, 1, figsize=(9, 1.9 * dim + 0.8), sharex=True, squeeze=False)
    first = episodes[0]
    t = np.arange(first.n_ticks) / rate_hz  # seconds from episode start
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for d, ax in enumerate(axes[:, 0]):
        if first.recorded is not None:
            ax.plot(t, first.recorded[:, d], color='black', lw=1.6, label='recorded')
        for i, (ep, label) in enumerate(zip(episodes, labels)):
            c = colors[i % len(colors)]
            ax.plot(t, ep.executed[:, d], color=c, lw=1.2, label=f'{label} (executed)')
            horizon = ep.chunks.shape[1]
            for start, chunk in zip(ep.starts, ep.chunks):
                steps = (start + np.arange(horizon)) / rate_hz
                ax.plot(steps, chunk[:, d], color=c, lw=0.6, alpha=0.35)
            ax.plot(ep.starts / rate_hz, ep.chunks[:, 0, d], 'o', color=c, ms=3)
        ax.set_ylabel(names[d])
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7, loc='best')
    axes[-1, 0].set_xlabel('time in episode [s]')
    if first.recorded is None:
        axes[0, 0].text(0.01, 0.02, 'no recorded actions: error not computed', transform=axes[0, 0].transAxes,
                        fontsize=8, color='firebrick')
    fig.tight_layout()
    _save(fig, path)


def horizon_plot(summaries: list[dict], labels: list[str], names: list[str], path: Path) -> bool:
    """MAE per dimension against horizon step, one line per variant; False (no file) without errors."""
    if not any(s['errors'] for s in summaries):
        return False
    plt = _pyplot()
    dim = len(names)
    fig, axes = plt.subplots(1, dim, figsize=(3.2 * dim, 3.0), squeeze=False)
    for s, label in zip(summaries, labels):
        if not s['errors']:
            continue
        mae = np.array([[np.nan if x is None else x for x in row] for row in s['errors']['by_step']['mae']])  # [H, D]
        for d, ax in enumerate(axes[0]):
            ax.plot(np.arange(mae.shape[0]), mae[:, d], marker='o', ms=3, label=label)
    for d, ax in enumerate(axes[0]):
        ax.set_title(names[d], fontsize=9)
        ax.set_xlabel('horizon step')
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel('MAE')
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def latency_plot(variants: list[VariantReplay], path: Path) -> None:
    """Histogram of the per-chunk inference latency of every variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    for v in variants:
        values = np.concatenate([ep.latency_ms['total'] for ep in v.episodes]) if v.episodes else np.zeros(0)
        if values.size:
            ax.hist(values, bins=30, alpha=0.5, label=v.label)
    ax.set_xlabel('latency per chunk [ms]')
    ax.set_ylabel('chunks')
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_plots(variants: list[VariantReplay], summaries: list[dict], rate_hz: float, out_dir: str | Path,
                max_episodes: int = 20, progress: bool | None = None) -> list[str]:
    """Every plot of a replay under ``out_dir``; returns their paths relative to ``out_dir``."""
    out_dir = Path(out_dir)
    if not variants:
        return []
    labels = [v.label for v in variants]
    names = variants[0].action_names
    written = []
    if horizon_plot(summaries, labels, names, out_dir / 'error_vs_horizon.png'):
        written.append('error_vs_horizon.png')
    latency_plot(variants, out_dir / 'latency.png')
    written.append('latency.png')
    n_episodes = len(variants[0].episodes)
    if n_episodes > max_episodes:
        logger.info('plotting the first %d of %d episodes', max_episodes, n_episodes)
    for k in tqdm(range(min(n_episodes, max_episodes)), desc='plots', unit='episode',
                  disable=None if progress is None else not progress):
        eps = [v.episodes[k] for v in variants]
        ep = eps[0]
        name = f'trajectory_{k:03d}_{_slug(Path(ep.bag_path).name)}_ep{ep.episode_index}.png'
        trajectory_plot(eps, labels, names, rate_hz, out_dir / name,
                        f'{Path(ep.bag_path).name} episode {ep.episode_index}: {ep.instruction!r}')
        written.append(name)
    return written
