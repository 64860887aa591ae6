"""Training convergence: closed-loop success against training steps for blockdiff, fulldiff and ar.
Figures and how they were measured: docs/benchmarks/convergence.md.

    python benchmarks/convergence.py --json out/convergence.json      # four colour tasks (~52 min, 2 cores)
    python benchmarks/convergence.py --json out/convergence_red.json --work out/conv_red --tasks touch_red \
        --steps 3000 --eval-every 250 --episodes 30                     # one task (~18 min)
    python benchmarks/convergence.py --suite mt10 --json out/convergence_mt10.json --work out/conv_mt10   # Meta-World

``--suite mt10`` (needs the sim extra): the Meta-World MT10 recipe (config/train/metaworld_mt10.yaml), 50 expert
episodes per task recorded on layout seed ``--seed``, closed loop on layout seed ``--seed + 1`` (held out), the
per-task curves in a second PNG (OUT with _tasks.png); the recipe's own run (make metaworld-policy) is this
benchmark's blockdiff run: same config, data, backbone and seed.

One training config (default config/train/convergence.yaml: the demo policy's recipe), one set
of recorded demonstrations, one seed; only ``train.mode`` differs between the runs. Every ``--eval-every`` steps
the checkpoint is run in closed loop on the tabletop benchmark (``--episodes`` per task, the 'eval' seed stream,
torch engine, the mode's own decoder). OUT holds the curves, ``steps_to_target`` per mode (the first evaluated step
whose success reaches ``--target``; null if none did), the target used, and ``speedup_vs_fulldiff`` (fulldiff's
steps to target over blockdiff's) when both reached it, or ``speedup_vs_fulldiff_at_least`` (steps trained over
blockdiff's) when only blockdiff did. A PNG of the curves is written next to OUT.

Starting points: when the config names a backbone folder (``model.backbone_path``) or pretrained vision weights
(``model.vision.init_from``), the benchmark makes its own in ``--work`` with ``blockvla-task make-backbone`` /
``pretrain-vision`` (same seed), so one command runs on a fresh clone and every mode starts from the same weights.

Runs resume: the recordings and each mode's checkpoints stay in ``--work`` (default out/convergence_work), and a
rerun with the same settings continues where it stopped (training resumes, evaluations are cached). A ``--work``
made with another config, ``--steps``, task set, recording or seed is refused: use a fresh one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ('blockdiff', 'fulldiff', 'ar')
# Per-suite defaults of the options left unset (tabletop: docs/benchmarks/convergence.md's four-colour run).
SUITE_DEFAULTS = {
    'tabletop': dict(config=REPO / 'config/train/convergence.yaml', steps=8000, eval_every=1000, episodes=20,
                     tasks=['touch_red', 'touch_green', 'touch_blue', 'touch_yellow'], train_episodes=300),
    'mt10': dict(config=REPO / 'config/train/metaworld_mt10.yaml', steps=6000, eval_every=1000, episodes=10,
                 tasks=None, train_episodes=50),
}
LEVELS = (0.25, 0.5, 0.75)  # steps_to_levels: one target hides how the curves cross


def record(work: Path, tasks, episodes: int, noise: float, seed: int, suite: str = 'tabletop') -> Path:
    from blockvla_ros.tasks.recording import record_demonstrations

    bags = work / 'demonstrations'
    done = bags / '.complete'
    if not done.is_file():
        if bags.exists():
            import shutil
            shutil.rmtree(bags)  # an interrupted recording: start it again
        print(f'recording {episodes} expert episodes per task into {bags} ...', flush=True)
        if suite == 'mt10':
            from blockvla_ros.sim.recording import record_suite
            record_suite(bags, 'mt10', tasks, episodes_per_task=episodes, seed=seed, progress=False)
        else:
            record_demonstrations(bags, tasks=tasks, episodes_per_task=episodes, seed=seed, expert_noise=noise,
                                  progress=False)
        done.write_text('ok\n')
    return bags


def claim_work(work: Path, args) -> None:
    """Refuse a --work folder made with other settings (its checkpoints would be resumed as if they were ours)."""
    import hashlib

    settings = {'config_sha256': hashlib.sha256(args.config.read_bytes()).hexdigest(), 'steps': args.steps,
                'tasks': list(args.tasks), 'train_episodes': args.train_episodes, 'noise': args.noise,
                'seed': args.seed}
    if args.suite != 'tabletop':
        settings['suite'] = args.suite
    path = work / 'settings.json'
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise SystemExit(f'convergence: {work} holds a run with other settings ({", ".join(diff)} differ); '
                             'pass a fresh --work or delete it')
        return
    if any(work.iterdir()):
        raise SystemExit(f'convergence: {work} is not empty and holds no settings.json (a run of an older version?); '
                         'pass a fresh --work or delete it')
    path.write_text(json.dumps(settings, indent=1) + '\n')


def starting_points(config_path: Path, work: Path, seed: int, suite: str = 'tabletop') -> list[str]:
    """Config overrides pointing at a backbone folder / pretrained vision weights made here, when the config
    uses them (written once; a rerun reuses them)."""
    from blockvla_ros.training import load_train_config

    config = load_train_config(config_path)
    overrides = []
    if config.model.get('backbone_path'):
        from blockvla_ros.tasks.backbone import write_word_backbone
        folder = work / 'backbone'
        if not (folder / 'config.json').is_file():
            print(f'writing the random-init word-tokenizer backbone into {folder} ...', flush=True)
            words = None
            if suite == 'mt10':
                from blockvla_ros.sim.suites import vocabulary
                words = vocabulary('mt10')
            write_word_backbone(folder, seed=seed, words=words)
        overrides.append(f'model.backbone_path={folder}')
    if config.model.get('vision', {}).get('init_from'):
        from blockvla_ros.tasks.vision_pretrain import pretrain_patch_encoder
        weights = work / 'vision.safetensors'
        if not weights.is_file():
            print(f'pretraining the patch encoder into {weights} ...', flush=True)
            pretrain_patch_encoder(load_train_config(config_path, overrides).model_config(), weights, seed=seed)
        overrides.append(f'model.vision.init_from={weights}')
    return overrides


def train_mode(config_path: Path, mode: str, bags: Path, work: Path, args, extra: list[str]) -> Path:
    from blockvla_ros.training import load_train_config, train
    from blockvla_ros.training.checkpoint import list_checkpoints

    out = work / mode
    done = list_checkpoints(out)
    if done and done[-1][0] >= args.steps:  # finished earlier: resuming would only reload the bags
        print(f'[{mode}] already trained {done[-1][0]} steps in {out}', flush=True)
        return out / 'checkpoints'
    overrides = list(extra) + [
        f'train.mode={mode}', f'train.steps={args.steps}', f'train.out_dir={out}',
        f'train.save_interval={args.eval_every}', 'train.keep_checkpoints=0',
        f'train.eval_interval={args.steps}', 'train.eval_decode_samples=0', 'train.progress=false',
        f'train.seed={args.seed}', 'train.resume=auto', f'data.bags=[{bags}]']
    config = load_train_config(config_path, overrides)
    start = time.monotonic()
    print(f'[{mode}] training {args.steps} steps into {out} ...', flush=True)
    train(config)
    print(f'[{mode}] trained in {time.monotonic() - start:.0f} s', flush=True)
    return out / 'checkpoints'


def closed_loop(checkpoint: Path, tasks, episodes: int, seed: int, execute_steps: int, suite: str = 'tabletop') -> dict:
    """Success of one checkpoint in closed loop, with the decoder its training mode implies."""
    import torch

    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.policy import BlockVLAPolicy
    from blockvla_ros.runtime.decoding import Decoder
    from blockvla_ros.runtime.runner import build_preprocessor
    from blockvla_ros.runtime.torch_engine import TorchEngine
    from blockvla_ros.tasks import evaluate_closed_loop

    policy = BlockVLAPolicy.load(checkpoint).eval()
    config = policy.config
    stats = NormStats.load(checkpoint / 'stats.json')
    pre = build_preprocessor(config, stats, folder=checkpoint)
    engine, decoder = TorchEngine(policy), Decoder(config)

    def predict_chunk(image, instruction, state):
        with torch.no_grad():
            result = decoder(engine, pre(image, instruction, state))
        return pre.actions.decode(result.tokens).reshape(-1, config.action_dim)  # [H, D]

    if suite == 'mt10':  # held-out layouts: the recording used MT1(task, seed)
        from blockvla_ros.sim.evaluate import evaluate_suite
        return evaluate_suite(predict_chunk, 'mt10', tasks, episodes, seed + 1, execute_steps, progress=False,
                              frames=False)
    return evaluate_closed_loop(predict_chunk, tasks=tasks, episodes_per_task=episodes, seed=seed,
                                image_size=config.image_size, progress=False, execute_steps=execute_steps)


def on_grid(step: int, eval_every: int, steps: int, only=None) -> bool:
    """A scheduled checkpoint (every --eval-every steps, and the last; or one of `only`, --eval-steps); an
    interrupted run also saves where it stopped (e.g. step 1494), which only that mode would have: not compared."""
    if only:
        return step in only
    return step % eval_every == 0 or step == steps


def evaluate_mode(checkpoints: Path, tasks, episodes: int, seed: int, execute_steps: int,
                  cache: dict, suite: str = 'tabletop', max_step: int | None = None,
                  eval_every: int = 1, steps: int = 0, save=None, only=None) -> list[dict]:
    """Each scheduled checkpoint's closed-loop success (cached; `save(cache)` after each new evaluation)."""
    curve = []
    for folder in sorted(checkpoints.glob('step_*')):
        step = int(folder.name.split('_')[1])
        if (max_step is not None and step > max_step) or not on_grid(step, eval_every, steps, only):
            continue
        key = f'{folder}|{",".join(tasks)}|{episodes}|{seed}|{execute_steps}'  # holds for these settings only
        if key not in cache:
            start = time.monotonic()
            result = closed_loop(folder, tasks, episodes, seed, execute_steps, suite)
            cache[key] = {'step': step, 'success_rate': result['success_rate'],
                          'per_task': {t: r['success_rate'] for t, r in result['per_task'].items()},
                          'eval_s': round(time.monotonic() - start, 1)}
            print(f'  {folder.parent.parent.name:9s} step {step:6d}: success {result["success_rate"]:.3f}'
                  f' ({cache[key]["eval_s"]:.0f} s)', flush=True)
            if save is not None:
                save(cache)
        curve.append(cache[key])
    return curve


def common_step(work: Path, modes) -> int:
    """The last checkpoint step every mode has in `work` (--evaluate-only)."""
    from blockvla_ros.training.checkpoint import list_checkpoints

    last = {mode: (list_checkpoints(work / mode) or [(0,)])[-1][0] for mode in modes}
    if min(last.values()) < 1:
        raise SystemExit(f'convergence: --evaluate-only needs a checkpoint of every mode in {work}; have {last}')
    return min(last.values())


def steps_to(curve: list[dict], target: float):
    return next((p['step'] for p in curve if p['success_rate'] >= target), None)


def plot(curves: dict, target: float, path: Path, title: str = 'tabletop benchmark') -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for mode, curve in curves.items():
        ax.plot([p['step'] for p in curve], [p['success_rate'] for p in curve], marker='o', label=mode)
    ax.axhline(target, color='gray', linestyle='--', linewidth=1, label=f'target {target:.0%}')
    ax.set_xlabel('training step')
    ax.set_ylabel('closed-loop success')
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f'{title}: success vs training steps')
    fig.tight_layout()
    tmp = path.with_name(path.name + '.tmp.png')
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_tasks(curves: dict, tasks, path: Path) -> None:
    """One panel per task: each mode's success on that task against training steps."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cols = min(5, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), dpi=100, squeeze=False, sharey=True)
    for ax, task in zip(axes.flat, tasks):
        for mode, curve in curves.items():
            ax.plot([p['step'] for p in curve], [p['per_task'][task] for p in curve], marker='.', label=mode)
        ax.set_title(task, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel('training step')
    fig.supylabel('closed-loop success')
    fig.tight_layout()
    tmp = path.with_name(path.name + '.tmp.png')
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--json', type=Path, required=True, help='write the results here')
    ap.add_argument('--png', type=Path, help='the curves (default: OUT with .png)')
    ap.add_argument('--suite', choices=sorted(SUITE_DEFAULTS), default='tabletop',
                    help='tabletop (the built-in task) or mt10 (Meta-World, needs the sim extra)')
    ap.add_argument('--config', type=Path, default=None, help='training config (default: the suite\'s recipe)')
    ap.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    ap.add_argument('--steps', type=int, default=None, help='training steps per mode (default 8000; mt10 6000)')
    ap.add_argument('--eval-every', type=int, default=None, help='steps between closed-loop evaluations (1000)')
    ap.add_argument('--episodes', type=int, default=None,
                    help='closed-loop episodes per task per evaluation (default 20; mt10 10)')
    ap.add_argument('--tasks', nargs='+', default=None,
                    help='tasks recorded and evaluated (default: the four colour tasks; mt10: all ten)')
    ap.add_argument('--train-episodes', type=int, default=None,
                    help='recorded expert episodes per task (default 300; mt10 50)')
    ap.add_argument('--noise', type=float, default=0.1, help='expert direction noise of the recordings')
    ap.add_argument('--execute-steps', type=int, default=4,
                    help='actions executed per predicted chunk before the next prediction (default 4)')
    ap.add_argument('--target', type=float, default=0.5, help='success rate that counts as converged')
    ap.add_argument('--seed', type=int, default=0, help='recording, training and evaluation seed')
    ap.add_argument('--work', type=Path, default=REPO / 'out/convergence_work', help='recordings + checkpoints')
    ap.add_argument('--eval-tasks', nargs='+', default=None,
                    help='evaluate only these of the trained tasks (default: all of --tasks)')
    ap.add_argument('--evaluate-only', action='store_true',
                    help='train nothing: compare the checkpoints already in --work up to the last step every mode '
                         'has (a partial comparison while runs are still training; marked partial in OUT), step by '
                         'step across the modes, so a stopped run leaves comparable points in the cache')
    ap.add_argument('--max-step', type=int, default=None,
                    help='with --evaluate-only: compare only up to this step (e.g. what a stopped run evaluated)')
    ap.add_argument('--eval-steps', type=int, nargs='+', default=None,
                    help='with --evaluate-only: compare at exactly these steps instead of every --eval-every')
    ap.add_argument('--threads', type=int, default=None,
                    help='torch threads (default: all cores; on a machine shared with other jobs 1 is several '
                         'times faster: idle threads spin while waiting for a core)')
    args = ap.parse_args(argv)
    for key, value in SUITE_DEFAULTS[args.suite].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.suite == 'mt10':
        from blockvla_ros.sim.suites import resolve_suite
        args.tasks = resolve_suite('mt10', args.tasks)
    if args.steps < 1 or args.eval_every < 1 or args.episodes < 1 or not 0 < args.target <= 1:
        ap.error('--steps, --eval-every and --episodes must be positive, --target in (0, 1]')
    if args.threads is not None and args.threads < 1:
        ap.error('--threads must be positive')
    if args.max_step is not None and (not args.evaluate_only or args.max_step < 1):
        ap.error('--max-step needs --evaluate-only and must be positive')
    if args.eval_steps is not None and (not args.evaluate_only or min(args.eval_steps) < 1):
        ap.error('--eval-steps needs --evaluate-only and must be positive')

    import torch
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    args.work.mkdir(parents=True, exist_ok=True)
    claim_work(args.work, args)
    start = time.monotonic()
    bags = record(args.work, args.tasks, args.train_episodes, args.noise, args.seed, args.suite)
    extra = starting_points(args.config, args.work, args.seed, args.suite)
    cache_path = args.work / 'evaluations.json'
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    curves, train_s = {}, {}
    max_step = common_step(args.work, args.modes) if args.evaluate_only else None
    if args.max_step is not None:
        max_step = min(max_step, args.max_step)

    def save(cache):
        tmp = cache_path.with_name(cache_path.name + '.tmp')
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_path)

    grid = dict(eval_every=args.eval_every, steps=args.steps, save=save, only=args.eval_steps)
    eval_tasks = args.tasks
    if args.eval_tasks:
        eval_tasks = (resolve_suite('mt10', args.eval_tasks) if args.suite == 'mt10' else list(args.eval_tasks))
        if not set(eval_tasks) <= set(args.tasks):
            raise SystemExit(f'convergence: --eval-tasks {eval_tasks} are not all among the trained tasks')
    if args.evaluate_only and args.eval_steps:
        missing = [f'{mode} {step}' for mode in args.modes for step in args.eval_steps if step <= max_step
                   and not (args.work / mode / 'checkpoints' / f'step_{step:08d}').is_dir()]
        if missing:
            raise SystemExit(f'convergence: --eval-steps: no checkpoint for {", ".join(missing)} in {args.work}')
    if args.evaluate_only:  # step by step across the modes (the cache makes the earlier points free)
        for step in sorted(args.eval_steps or range(args.eval_every, max_step + 1, args.eval_every)):
            if step > max_step:
                break
            for mode in args.modes:
                evaluate_mode(args.work / mode / 'checkpoints', eval_tasks, args.episodes, args.seed,
                              args.execute_steps, cache, args.suite, step, **grid)
    for mode in args.modes:
        t = time.monotonic()
        if args.evaluate_only:
            checkpoints = args.work / mode / 'checkpoints'
        else:
            checkpoints = train_mode(args.config, mode, bags, args.work, args, extra)
        train_s[mode] = round(time.monotonic() - t, 1)
        curves[mode] = evaluate_mode(checkpoints, eval_tasks, args.episodes, args.seed, args.execute_steps, cache,
                                     args.suite, max_step, **grid)
    reached = {mode: steps_to(curve, args.target) for mode, curve in curves.items()}
    levels = {f'{level:.2f}': {mode: steps_to(curve, level) for mode, curve in curves.items()} for level in LEVELS}
    result = {
        'target': args.target, 'steps_to_target': reached,
        'partial': args.evaluate_only, 'last_step': max_step, 'steps_to_levels': levels,
        'speedup_vs_fulldiff': (reached['fulldiff'] / reached['blockdiff']
                                if reached.get('fulldiff') and reached.get('blockdiff') else None),
        # fulldiff never reached the target: the ratio is at least (steps trained) / (blockdiff's steps)
        'speedup_vs_fulldiff_at_least': (args.steps / reached['blockdiff'] if 'fulldiff' in reached
                                         and reached['fulldiff'] is None and reached.get('blockdiff') else None),
        'best': {mode: max((p['success_rate'] for p in curve), default=None) for mode, curve in curves.items()},
        'curves': curves, 'train_wall_s': train_s, 'config': str(args.config), 'suite': args.suite, 'steps': args.steps,
        'eval_every': args.eval_every, 'eval_steps': args.eval_steps, 'episodes_per_task': args.episodes,
        'tasks': args.tasks, 'eval_tasks': eval_tasks,
        'execute_steps': args.execute_steps,
        'train_episodes_per_task': args.train_episodes, 'expert_noise': args.noise, 'seed': args.seed,
        'wall_s': round(time.monotonic() - start, 1), 'cpu_count': os.cpu_count(),
    }
    png = args.png or args.json.with_suffix('.png')
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, args.target, png, 'Meta-World MT10' if args.suite == 'mt10' else 'tabletop benchmark')
    if args.suite == 'mt10':
        plot_tasks(curves, eval_tasks, png.with_name(png.stem + '_tasks.png'))
    tmp = args.json.with_name(args.json.name + '.tmp')
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.json)

    steps = sorted({p['step'] for curve in curves.values() for p in curve})
    print('\nclosed-loop success by training step (' + ', '.join(eval_tasks) + f'; {args.episodes} episodes each)')
    print(f'{"step":>8s} ' + ' '.join(f'{m:>10s}' for m in curves))
    for s in steps:
        row = [next((f'{p["success_rate"]:.3f}' for p in curves[m] if p['step'] == s), '-') for m in curves]
        print(f'{s:8d} ' + ' '.join(f'{v:>10s}' for v in row))
    print(f'steps to {args.target:.0%}: ' + ', '.join(f'{m} {v}' for m, v in reached.items())
          + (f'; blockdiff {result["speedup_vs_fulldiff"]:.2f}x earlier than fulldiff'
             if result['speedup_vs_fulldiff'] else '')
          + (f'; fulldiff not within {args.steps} steps: blockdiff >= {result["speedup_vs_fulldiff_at_least"]:.2f}x '
             'earlier' if result['speedup_vs_fulldiff_at_least'] else ''))
    for level, row in levels.items():
        print(f'steps to {float(level):.0%}: ' + ', '.join(f'{m} {v}' for m, v in row.items()))
    print('best: ' + ', '.join(f'{m} {v:.3f}' for m, v in result['best'].items() if v is not None))
    print(f'wrote {args.json} and {png}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
