"""`make demo`: the real node on the shipped demo policy, fed by the bag player, then a summary.

1. verify the policy folder (manifest) and load it on ONNX Runtime;
2. live: bag player -> policy node (rclpy, sim time, loopback DDS) -> recorder (evaluation.live);
3. offline: the same recording replayed through PolicyRunner against the recorded actions (blockvla-replay);
4. closed loop: the tabletop benchmark task, per-task success against a random policy.

    python -m blockvla_ros.demo [--policy demo] [--policy-dir models] [--bag data/demo_recording] [--out out/demo]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .paths import package_data_dir, searched

log = logging.getLogger('blockvla_ros.demo')


def _diagnostic_values(bag: Path) -> dict:
    """key -> value of the last blockvla status in the recorded /diagnostics."""
    from rosbags.highlevel import AnyReader

    last = {}
    with AnyReader([bag]) as reader:
        conns = [c for c in reader.connections if c.topic == '/diagnostics']
        for c, _t, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, c.msgtype)
            for status in msg.status:
                if status.values:
                    last = {kv.key: kv.value for kv in status.values}
    return last


def _action_rate(bag: Path, topic: str = '/action') -> tuple[int, float]:
    """(messages, rate in Hz over their recorded time span)."""
    from rosbags.highlevel import AnyReader

    with AnyReader([bag]) as reader:
        times = [t for c, t, _ in reader.messages(connections=[c for c in reader.connections if c.topic == topic])]
    if len(times) < 2:
        return len(times), 0.0
    return len(times), (len(times) - 1) / ((times[-1] - times[0]) * 1e-9)


def live_section(bag: Path, policy: str, policy_dir: Path, out: Path, rate_hz: float) -> dict:
    from .evaluation.live import run_live

    started = time.perf_counter()
    result = run_live(bag, policy, out / 'live_outputs', policy_dirs=[str(policy_dir)], control_rate_hz=rate_hz,
                      domain_id=int(os.environ.get('ROS_DOMAIN_ID', '61')))
    n_actions, rate = _action_rate(result.output_bag)
    diag = _diagnostic_values(result.output_bag)
    return {'wall_s': time.perf_counter() - started, 'actions': n_actions, 'published_rate_hz': rate,
            'chunks': diag.get('chunks'),  # inference chunks pushed (action_chunk carries absolute targets only)
            'inference_p50_ms': diag.get('inference_latency_p50_ms'),
            'inference_p99_ms': diag.get('inference_latency_p99_ms'),
            'e2e_p50_ms': diag.get('e2e_latency_p50_ms'), 'e2e_p99_ms': diag.get('e2e_latency_p99_ms'),
            'backend': diag.get('backend'), 'output_bag': str(result.output_bag)}


def offline_section(bag: Path, policy: str, policy_dir: Path, out: Path, rate_hz: float) -> dict:
    from .evaluation.cli import main as replay_main

    code = replay_main(['--bag', str(bag), '--policy', policy, '--policy-dir', str(policy_dir), '--out',
                        str(out / 'replay'), '--rate-hz', str(rate_hz), '--quiet'])
    if code != 0:
        raise RuntimeError(f'blockvla-replay failed with exit code {code}')
    report = json.loads((out / 'replay' / 'report.json').read_text())
    overall = report['variants'][0]['overall']
    errors = overall.get('errors') or {}
    per_dim = errors.get('per_dim') or {}
    return {'mae_per_dim': [per_dim[n]['mae'] for n in per_dim] or None,
            'action_names': report['variants'][0]['action_names'],
            'realtime_factor': report['speed']['realtime_factor'], 'report': str(out / 'replay' / 'report.md')}


LEARNED_MARGIN = 0.3  # a task counts as learned when its success beats the random policy's by this much


def closed_loop_section(policy: str, policy_dir: Path, episodes: int, seed: int, execute_steps: int = 4) -> dict:
    from .runtime.policy_folder import resolve_policy
    from .runtime.runner import PolicyRunner
    from .tasks import evaluate_closed_loop, random_policy_success

    runner = PolicyRunner.load(resolve_policy(policy, [str(policy_dir)]), engine='onnxruntime', threads=1)
    runner.warmup()

    def predict_chunk(image, instruction, state):
        return runner.predict(image, instruction, state=state).actions

    size = runner.config.image_size
    ours = evaluate_closed_loop(predict_chunk, episodes_per_task=episodes, seed=seed, image_size=size,
                                execute_steps=execute_steps)
    rand = random_policy_success(episodes_per_task=episodes, seed=seed, image_size=size)
    return {'policy': ours, 'random': rand}


def _fmt(x, unit='', digits=1):
    if x is None:
        return 'n/a'
    try:
        return f'{float(x):.{digits}f}{unit}'
    except (TypeError, ValueError):
        return str(x)


def print_summary(summary: dict) -> None:
    live, off, cl = summary['live'], summary['offline'], summary['closed_loop']
    print('\n=== blockvla_ros demo =================================================')
    print(f"policy {summary['policy']} ({summary['policy_folder']}), engine onnxruntime, bag {summary['bag']}")
    print(f"live node:  {live['actions']} actions, published at {_fmt(live['published_rate_hz'], ' Hz', 2)} "
          f"(control_rate_hz {summary['rate_hz']}), {live['chunks']} chunks")
    print(f"            inference p50/p99 {_fmt(live['inference_p50_ms'], ' ms')} / "
          f"{_fmt(live['inference_p99_ms'], ' ms')}, image-to-action p50/p99 {_fmt(live['e2e_p50_ms'], ' ms')} / "
          f"{_fmt(live['e2e_p99_ms'], ' ms')}")
    mae = off['mae_per_dim']
    names = off['action_names']
    errs = ', '.join(f'{n} {v:.3f}' for n, v in zip(names, mae)) if mae else 'n/a (no recorded actions)'
    print(f"offline:    action MAE vs the recording: {errs}; replay at {_fmt(off['realtime_factor'], 'x')} real time")
    print('closed loop (benchmark task, success rate):')
    ours, rand = cl['policy'], cl['random']
    for task, res in ours['per_task'].items():
        chance = rand['per_task'][task]['success_rate'] * 100
        print(f"   {task:28s} {res['success_rate'] * 100:5.1f} %   (random {chance:4.1f} %)")
    print(f"   {'overall':28s} {ours['success_rate'] * 100:5.1f} %   (random {rand['success_rate'] * 100:4.1f} %)")
    learned = [t for t, r in ours['per_task'].items()
               if r['success_rate'] >= rand['per_task'][t]['success_rate'] + LEARNED_MARGIN]
    if not learned:
        print('   -> not clearly better than random on any task: this policy has not learned the benchmark '
              '(see README, Demo policy)')
    elif len(learned) < len(ours['per_task']):
        print(f"   -> clearly above random on {', '.join(learned)}; not clearly: the other "
              f"{len(ours['per_task']) - len(learned)} tasks (see README, Demo policy)")
    print(f"total {summary['wall_s']:.0f} s; details in {summary['out']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m blockvla_ros.demo', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--policy', default='demo')
    p.add_argument('--policy-dir', default=None, help='default: the package\'s models/ (checkout or install)')
    p.add_argument('--bag', default=None, help='default: the package\'s data/demo_recording')
    p.add_argument('--out', default='out/demo')
    p.add_argument('--rate-hz', type=float, default=None, help="control rate (default: the policy's trained rate)")
    p.add_argument('--episodes-per-task', type=int, default=10)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--execute-steps', type=int, default=4,
                   help='closed loop: actions executed per predicted chunk before the next prediction (default 4 of '
                        '8; the node itself replans after every inference)')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ.setdefault('ROS_DOMAIN_ID', '61')

    from .runtime.policy_folder import PolicyFolderError, load_policy_folder, resolve_policy

    models, data = package_data_dir('models'), package_data_dir('data')
    if args.policy_dir is None and models is None:
        print(f'demo: no models/ folder found (looked in {searched("models")})', file=sys.stderr)
        return 2
    policy_dir = Path(args.policy_dir) if args.policy_dir else models
    bag = Path(args.bag) if args.bag else (data or Path('data')) / 'demo_recording'
    out = Path(args.out)
    try:
        folder = resolve_policy(args.policy, [str(policy_dir)])
        spec = load_policy_folder(folder)  # manifest verified
    except (PolicyFolderError, FileNotFoundError, ValueError) as e:
        print(f'demo: the demo policy is not usable: {e}\n(build it with `make demo-policy`)', file=sys.stderr)
        return 2
    from .io.bag_reader import iter_bag_paths

    bags = list(iter_bag_paths(bag)) if bag.exists() else []
    if not bags:
        print(f'demo: no sample recording at {bag} (build it with `make demo-policy`)', file=sys.stderr)
        return 2
    bag = bags[0]
    rate_hz = args.rate_hz or spec.config.control_rate_hz
    if not rate_hz:
        print(f'demo: policy {args.policy!r} does not say its control rate; pass --rate-hz', file=sys.stderr)
        return 2
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    print(f'[1/3] live: bag player -> policy node ({args.policy}, ONNX Runtime) -> recorder ...', flush=True)
    live = live_section(bag, args.policy, policy_dir, out, rate_hz)
    print('[2/3] offline replay of the recording through the same runner ...', flush=True)
    offline = offline_section(bag, args.policy, policy_dir, out, rate_hz)
    print(f'[3/3] closed loop on the benchmark task ({args.episodes_per_task} episodes per task, replanning every '
          f'{args.execute_steps} ticks) ...', flush=True)
    closed = closed_loop_section(args.policy, policy_dir, args.episodes_per_task, args.seed, args.execute_steps)
    summary = {'policy': args.policy, 'policy_folder': str(folder), 'bag': str(bag), 'rate_hz': rate_hz,
               'live': live, 'offline': offline, 'closed_loop': closed, 'out': str(out),
               'wall_s': time.perf_counter() - started}
    from .io.atomic import atomic_write_text

    atomic_write_text(out / 'summary.json', json.dumps(summary, indent=2, default=lambda o: np.asarray(o).tolist()))
    print_summary(summary)
    return 0


if __name__ == '__main__':
    sys.exit(main())
