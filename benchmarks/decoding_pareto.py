#!/usr/bin/env python3
"""Closed-loop Pareto of decoder settings on a trained policy: success rate against passes and time per chunk.

    python benchmarks/decoding_pareto.py --policy models/demo --json out/pareto.json [--episodes 20]
    python benchmarks/decoding_pareto.py --policy models/metaworld_mt10 --suite mt10 --json out/pareto_mt10.json

One engine (the policy folder's, ONNX Runtime by default) serves every setting: the policy's shipped default, AR,
block diffusion with a fixed 1..k passes per block for every block size the policy was trained with, the threshold
schedule at a few taus, and full diffusion over the cached prefix. For each setting:

    success   closed loop on the built-in tabletop task (blockvla_ros.tasks, the 'eval' seed stream) or, with
              --suite, on Meta-World (blockvla_ros.sim.evaluate, held-out layout seed 1); the same episodes for every
              setting, replanning every --execute-steps ticks; +- its binomial standard error over all episodes
    NFE       mean forward passes per chunk over those closed-loop chunks (prefill counted)
    ms        median time of one chunk (PolicyRunner.predict: preprocessing, prefill, decoding), wall clock and CPU
              time of the calling thread (the engine's only thread with --threads 1: what the chunk costs even on a
              shared machine), measured in rounds that interleave the settings on the same observations

"within noise" marks the settings whose success is within 1.96 standard errors of the difference from the best
one. Writes JSON (--json), a markdown table (--md, default next to the JSON) and a PNG (--png). Timings are
printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

THRESHOLDS = (0.5, 0.7, 0.9)


@dataclass
class Variant:
    """One decoder setting: a decoder name plus PolicyRunner overrides."""

    name: str
    decoder: str
    overrides: dict = field(default_factory=dict)
    default: bool = False  # the policy's shipped default

    def key(self, config) -> tuple:
        """What the decoder actually does (two spellings of one behaviour have one key)."""
        cfg = config.replace(decoder=self.decoder, **self.overrides)
        if cfg.decoder == 'ar':
            return ('ar',)
        if cfg.decoder in ('fulldiff', 'fulldiff_nocache'):
            tau = cfg.threshold if cfg.schedule == 'threshold' else None
            return (cfg.decoder, cfg.fulldiff_steps, cfg.schedule, tau)
        threshold = cfg.schedule == 'threshold' and cfg.steps_per_block > 1
        return ('blockdiff', cfg.block_size, cfg.steps_per_block, cfg.threshold if threshold else None)


def blockdiff_variant(block_size: int, steps: int, threshold=None) -> Variant:
    from blockvla_ros.export.calibration import Setting

    s = Setting(block_size, steps, 'threshold' if threshold is not None else 'fixed', threshold)
    return Variant(f'blockdiff {s.label}', 'blockdiff', s.overrides())


def default_variant(config) -> Variant:
    ov = {'block_size': config.block_size, 'steps_per_block': config.steps_per_block, 'schedule': config.schedule,
          'threshold': config.threshold, 'fulldiff_steps': config.fulldiff_steps}
    if config.decoder == 'blockdiff':
        tau = config.threshold if config.schedule == 'threshold' and config.steps_per_block > 1 else None
        name = blockdiff_variant(config.block_size, config.steps_per_block, tau).name
    else:
        name = config.decoder
    return Variant(name, config.decoder, ov, default=True)


def plan_variants(config, max_steps: int = 4, thresholds=THRESHOLDS, fulldiff_steps=None) -> list:
    """The shipped default first, then AR, blockdiff (every trained block size x 1..max_steps fixed passes and its
    full schedule, the thresholds at the full schedule), full diffusion; one entry per distinct behaviour."""
    out = [default_variant(config), Variant('ar', 'ar')]
    for b in config.block_sizes:
        for s in sorted(set(range(1, min(max_steps, b) + 1)) | {b}):
            out.append(blockdiff_variant(b, s))
        if b > 1:
            out.extend(blockdiff_variant(b, b, t) for t in thresholds)
    for steps in fulldiff_steps or (config.fulldiff_steps,):
        out.append(Variant(f'fulldiff {steps} passes', 'fulldiff', {'fulldiff_steps': int(steps), 'schedule': 'fixed'}))
    seen, unique = set(), []
    for v in out:
        k = v.key(config)
        if k not in seen:
            seen.add(k)
            unique.append(v)
    return unique


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float('nan')


def within_noise(best: dict, row: dict, z: float = 1.96) -> bool:
    """Success within z standard errors of the difference from the best setting's."""
    se = math.sqrt(best['stderr'] ** 2 + row['stderr'] ** 2)
    return best['success_rate'] - row['success_rate'] <= z * se + 1e-12


@dataclass
class Episodes:
    """The closed-loop episodes every setting runs: the built-in tabletop task (suite None) or a Meta-World suite."""

    suite: str | None
    tasks: list | None
    episodes: int
    seed: int
    execute_steps: int
    episode_steps: int | None = None  # Meta-World's episode limit (None: its 500)

    @property
    def label(self) -> str:
        return f'Meta-World {self.suite}' if self.suite else 'the tabletop task'

    def run(self, predict_chunk, image_size: int) -> dict:
        """{'per_task': {task: {'successes', 'episodes', 'success_rate', ...}}, ...} of one closed-loop pass."""
        if self.suite:
            from blockvla_ros.sim.evaluate import evaluate_suite
            return evaluate_suite(predict_chunk, self.suite, self.tasks, self.episodes, self.seed, self.execute_steps,
                                  self.episode_steps, progress=False, frames=False)
        from blockvla_ros.tasks import evaluate_closed_loop
        return evaluate_closed_loop(predict_chunk, tasks=self.tasks, episodes_per_task=self.episodes, seed=self.seed,
                                    execute_steps=self.execute_steps, image_size=image_size, progress=False)

    def observations(self, n: int) -> list:
        """(image, instruction, state) of the first observation of the first n episodes, tasks in turn."""
        if self.suite:
            from blockvla_ros.sim.env import MetaWorldEnv
            from blockvla_ros.sim.suites import resolve_suite
            names = resolve_suite(self.suite, self.tasks)
            envs = {name: MetaWorldEnv(name, seed=self.seed) for name in names[:n]}
            obs = [envs[names[i % len(names)]].reset(i // len(names)) for i in range(n)]
            for env in envs.values():
                env.close()
            return [(o.image, o.instruction, o.state) for o in obs]
        from blockvla_ros.tasks import TabletopEnv, episode_seed
        from blockvla_ros.tasks.spec import resolve_tasks
        names = resolve_tasks(self.tasks)
        obs = [TabletopEnv(names[i % len(names)], episode_seed(self.seed, names[i % len(names)], i, 'eval')).reset()
               for i in range(n)]
        return [(o.image, o.instruction, o.state) for o in obs]


def closed_loop(runner, episodes: Episodes) -> dict:
    nfes = []

    def predict_chunk(image, instruction, state):
        pred = runner.predict(image, instruction, state=state)
        nfes.append(pred.nfe)
        return pred.actions

    res = episodes.run(predict_chunk, runner.config.image_size)
    wins = sum(r['successes'] for r in res['per_task'].values())
    n = sum(r['episodes'] for r in res['per_task'].values())
    return {'success_rate': wins / n, 'successes': wins, 'episodes': n, 'stderr': stderr(wins / n, n),
            'nfe_mean': float(np.mean(nfes)), 'nfe_min': int(np.min(nfes)), 'nfe_max': int(np.max(nfes)),
            'chunks': len(nfes), 'per_task': {t: r['success_rate'] for t, r in res['per_task'].items()}}


def interleaved_ms(runners: dict, observations: list, rounds: int) -> dict:
    """name -> (median wall ms, median CPU ms of this thread) of one predict, the settings interleaved within every
    round. With one thread the engine computes on the calling thread, so the CPU time is the chunk's compute even
    when other jobs share the cores (the wall time then includes waiting for them)."""
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(rounds):
        for obs in observations:
            for name, runner in runners.items():
                t, c = time.perf_counter(), time.thread_time()
                runner.predict(obs[0], obs[1], state=obs[2])
                cpu[name].append((time.thread_time() - c) * 1e3)
                wall[name].append((time.perf_counter() - t) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in runners}


def markdown(rows: list, meta: dict) -> str:
    lines = [f"Closed loop on {meta['benchmark']}: {meta['episodes']} episodes per setting "
             f"({meta['episodes_per_task']} per task, seed {meta['seed']}), engine {meta['engine']}, "
             f"{meta['threads']} thread(s); ms = median per chunk (CPU time of the decoding thread, and wall time), "
             'settings interleaved.',
             '', '| setting | NFE / chunk | CPU ms / chunk | wall ms / chunk | success | within noise of best |',
             '| --- | ---: | ---: | ---: | ---: | :---: |']
    for r in rows:
        name = f"**{r['name']} (default)**" if r['default'] else r['name']
        best = ' (best)' if r['best'] else ''
        lines.append(f"| {name} | {r['nfe_mean']:.1f} | {r['cpu_ms_p50']:.1f} | {r['ms_p50']:.1f} | "
                     f"{100 * r['success_rate']:.1f} % "
                     f"± {100 * r['stderr']:.1f}{best} | {'yes' if r['within_noise'] else 'no'} |")
    return '\n'.join(lines) + '\n'


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, label in ((axes[0], 'nfe_mean', 'forward passes (NFE) per chunk'),
                           (axes[1], 'cpu_ms_p50', 'CPU ms per chunk (median, 1 thread)')):
        for r in rows:
            kind = r['decoder']
            color = {'ar': 'tab:red', 'fulldiff': 'tab:gray'}.get(kind, 'tab:blue')
            marker = '*' if r['default'] else ('s' if 'tau' in r['name'] else 'o')
            ax.errorbar(r[key], 100 * r['success_rate'], yerr=100 * r['stderr'], fmt=marker, color=color,
                        markersize=14 if r['default'] else 6, capsize=2, alpha=0.85)
            ax.annotate(r['name'].replace('blockdiff ', ''), (r[key], 100 * r['success_rate']), fontsize=6,
                        xytext=(3, 3), textcoords='offset points')
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('closed-loop success (%)')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--policy', type=Path, required=True, help='policy folder (e.g. models/demo)')
    p.add_argument('--json', type=Path, required=True, help='write the results here')
    p.add_argument('--md', type=Path, help='markdown table (default: the JSON path with .md)')
    p.add_argument('--png', type=Path, help='plot (default: the JSON path with .png)')
    p.add_argument('--engine', default='onnxruntime', help='engine for every setting (default onnxruntime)')
    p.add_argument('--threads', type=int, default=1, help='CPU threads (default 1: a shared machine)')
    p.add_argument('--episodes', type=int, default=20, help='closed-loop episodes per task and setting')
    p.add_argument('--suite', help='a Meta-World suite (mt10; needs the sim extra) instead of the tabletop task')
    p.add_argument('--tasks', nargs='+', help="task names (default: all of the tabletop task's or the suite's)")
    p.add_argument('--seed', type=int, help='evaluation seed, the same episodes for every setting (default: 0, the '
                   "tabletop's 'eval' stream; 1 with --suite: layouts disjoint from the recordings' seed 0)")
    p.add_argument('--episode-steps', type=int, help="--suite: episode limit (default Meta-World's 500)")
    p.add_argument('--execute-steps', type=int, default=4, help='actions executed per chunk before replanning')
    p.add_argument('--max-steps', type=int, default=4, help='fixed passes per block: 1..this, and the full schedule')
    p.add_argument('--thresholds', type=float, nargs='*', default=list(THRESHOLDS),
                   help='taus of the threshold schedule (at the full schedule of each block size)')
    p.add_argument('--fulldiff-steps', type=int, nargs='*', help="full diffusion passes (default: the policy's)")
    p.add_argument('--only', nargs='+', help='run only the settings whose names contain one of these strings '
                   '(the default always runs)')
    p.add_argument('--timing-rounds', type=int, default=5, help='interleaved timing rounds over 8 observations')
    args = p.parse_args(argv)
    if args.episodes < 1 or args.timing_rounds < 1:
        p.error('--episodes and --timing-rounds must be >= 1')

    from blockvla_ros.runtime.engine_factory import create_engine
    from blockvla_ros.runtime.policy_folder import load_policy_folder
    from blockvla_ros.runtime.runner import PolicyRunner

    started, load_start = time.perf_counter(), os.getloadavg()
    episodes = Episodes(args.suite, args.tasks, args.episodes, (1 if args.suite else 0) if args.seed is None
                        else args.seed, args.execute_steps, args.episode_steps)
    spec = load_policy_folder(args.policy)
    config = spec.config
    variants = plan_variants(config, args.max_steps, args.thresholds, args.fulldiff_steps)
    if args.only:
        variants = [v for v in variants if v.default or any(s in v.name for s in args.only)]
    engine = create_engine(spec, args.engine, threads=args.threads)
    runners = {v.name: PolicyRunner(spec, engine, args.engine, v.decoder, v.overrides) for v in variants}
    for r in runners.values():
        r.warmup(1, image_shape=(config.image_size, config.image_size))
    print(f'policy {spec.name} ({args.policy}): H*D = {config.n_action_tokens}, trained block sizes '
          f'{config.block_sizes}; {len(variants)} settings x {args.episodes} episodes per task of '
          f'{episodes.label} (seed {episodes.seed}); engine '
          f'{args.engine}, {args.threads} thread(s)', flush=True)

    rows = []
    for v in variants:
        t = time.perf_counter()
        res = closed_loop(runners[v.name], episodes)
        rows.append({'name': v.name, 'decoder': v.decoder, 'overrides': v.overrides, 'default': v.default, **res})
        print(f"  {v.name:42s} success {100 * res['success_rate']:5.1f} % +- {100 * res['stderr']:.1f}   "
              f"NFE {res['nfe_mean']:5.2f}   ({time.perf_counter() - t:.0f} s)", flush=True)
    ms = interleaved_ms(runners, episodes.observations(8), args.timing_rounds)
    best = max(rows, key=lambda r: (r['success_rate'], -r['nfe_mean']))
    for r in rows:
        r['ms_p50'], r['cpu_ms_p50'] = ms[r['name']]
        r['best'] = r is best
        r['within_noise'] = within_noise(best, r)
    meta = {'policy': spec.name, 'folder': str(args.policy), 'engine': args.engine, 'threads': args.threads,
            'benchmark': episodes.label, 'suite': args.suite, 'episode_steps': args.episode_steps,
            'episodes_per_task': args.episodes, 'episodes': rows[0]['episodes'], 'tasks': args.tasks or 'all',
            'seed': episodes.seed, 'execute_steps': args.execute_steps, 'timing_rounds': args.timing_rounds,
            'n_action_tokens': config.n_action_tokens, 'block_sizes': config.block_sizes,
            'machine': {'python': sys.version.split()[0], 'platform': platform.platform(),
                        'cpus': os.cpu_count(), 'load_avg_1m': os.getloadavg()[0],
                        'load_avg_start_1_5_15': load_start, 'load_avg_end_1_5_15': os.getloadavg()},
            'seconds': time.perf_counter() - started}
    default = next(r for r in rows if r['default'])
    ar = next((r for r in rows if r['decoder'] == 'ar'), None)
    summary = {'default': default['name'], 'default_nfe': default['nfe_mean'],
               'default_success': default['success_rate'], 'default_within_noise_of_best': default['within_noise'],
               'best': best['name'], 'best_success': best['success_rate'],
               'default_nfe_vs_ar': default['nfe_mean'] / ar['nfe_mean'] if ar else None}
    out = {**meta, 'summary': summary, 'settings': rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + '\n')
    table = markdown(rows, meta)
    md = args.md or args.json.with_suffix('.md')
    md.write_text(table)
    png = args.png or args.json.with_suffix('.png')
    plot(rows, png, f"{spec.name}: closed-loop success on {episodes.label} vs passes and time per chunk "
                    f"({meta['episodes']} episodes per setting)")
    print('\n' + table)
    print(f"default {default['name']}: NFE {default['nfe_mean']:.1f}"
          + (f" ({summary['default_nfe_vs_ar']:.2f}x AR's {ar['nfe_mean']:.0f})" if ar else '')
          + f", success {100 * default['success_rate']:.1f} % vs best {100 * best['success_rate']:.1f} % "
          f"({best['name']}): {'within' if default['within_noise'] else 'NOT within'} noise")
    print(f'wrote {args.json}, {md}, {png} in {meta["seconds"]:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
