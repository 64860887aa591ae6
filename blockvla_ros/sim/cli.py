"""`blockvla-sim`: Meta-World through this package. Record expert demonstrations as rosbag2, evaluate a policy
folder in closed loop (PolicyRunner, or the sim bridge + the real policy node over ROS 2 with --via-ros), or
write the word-tokenizer backbone folder of the suite's instructions. Needs the sim extra (`pip install .[sim]`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _episode_args(p: argparse.ArgumentParser, episodes_help: str, seed: int, seed_help: str) -> None:
    """Which episodes a command runs: --suite, --tasks, --episodes, --seed (record and evaluate)."""
    p.add_argument('--suite', default='mt10', help='task suite (default mt10)')
    p.add_argument('--tasks', nargs='+', default=None, help='a subset of the suite (default: all)')
    p.add_argument('--episodes', type=int, default=50, help=f'{episodes_help} (default 50)')
    p.add_argument('--seed', type=int, default=seed, help=f'{seed_help} (default {seed})')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='blockvla-sim', description=__doc__)
    sub = p.add_subparsers(dest='command', required=True)

    rec = sub.add_parser('record', help='record expert episodes, one rosbag2 per successful episode')
    rec.add_argument('--out', required=True, help='output directory (bags named <task>_seed<S>_ep<NNNN>)')
    _episode_args(rec, 'expert episodes tried per task', seed=0, seed_help='layout seed: MT1(task, seed)')
    rec.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap')
    rec.add_argument('--json', default=None, help='also write the counts to this JSON file')

    ev = sub.add_parser('evaluate', help='closed-loop success of a policy folder on held-out layouts')
    ev.add_argument('--policy', required=True, help='policy folder (blockvla-export output)')
    _episode_args(ev, 'episodes per task', seed=1, seed_help='layout seed (1: disjoint from the recordings)')
    ev.add_argument('--out', default=None, help='report folder: report.json, report.md, montage.png '
                                                '(default reports/sim_<policy>_seed<S>[_ros])')
    ev.add_argument('--execute-steps', type=int, default=4,
                    help='fast path: actions executed per chunk before the next prediction (default 4)')
    ev.add_argument('--max-steps', type=int, default=None, help='episode limit (default 500, Meta-World\'s)')
    ev.add_argument('--via-ros', action='store_true',
                    help='run the sim bridge node and the real policy node over loopback DDS instead')
    ev.add_argument('--real-time-factor', type=float, default=1.0,
                    help='--via-ros: sim seconds per wall second (default 1)')
    ev.add_argument('--node-param', action='append', default=[], metavar='NAME=VALUE',
                    help='--via-ros: a policy node parameter (repeatable), e.g. real_time_chunking=true')
    ev.add_argument('--no-expert', action='store_true', help='skip the expert on the same layouts')
    ev.add_argument('--threads', type=int, default=1, help='inference threads (default 1)')
    ev.add_argument('--jobs', type=int, default=1, help='fast path: evaluate the tasks in this many processes')

    bb = sub.add_parser('make-backbone', help="write a tiny random-init Llama folder with a word-level tokenizer over "
                                              "the suite's instructions (for model.backbone_path)")
    bb.add_argument('--out', required=True, help='output folder (replaced atomically)')
    bb.add_argument('--suite', default='mt10')
    bb.add_argument('--hidden-size', type=int, default=128)
    bb.add_argument('--layers', type=int, default=2)
    bb.add_argument('--seed', type=int, default=0)

    sub.add_parser('list', help='list the suite\'s tasks with their instructions')
    return p


def _record(args) -> int:
    from blockvla_ros.io.atomic import atomic_write_text
    from blockvla_ros.sim.recording import record_suite
    logging.getLogger('blockvla_ros.io.bag_writer').setLevel(logging.WARNING)
    result = record_suite(args.out, suite=args.suite, tasks=args.tasks, episodes_per_task=args.episodes,
                          seed=args.seed, storage=args.storage)
    for name, r in result['per_task'].items():
        print(f'{name:26s} {r["recorded"]:4d}/{r["attempted"]:<4d} successful expert episodes recorded '
              f'(mean {r["mean_steps"]} steps)')
    print(f'wrote {result["recorded"]} recordings of {result["attempted"]} episodes to {args.out}')
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + '\n')
    return 0


def _evaluate(args) -> int:
    from blockvla_ros.sim.evaluate import evaluate_policy_folder
    out = Path(args.out or f'reports/sim_{Path(args.policy).name}_seed{args.seed}{"_ros" if args.via_ros else ""}')
    evaluate_policy_folder(args.policy, out, suite=args.suite, tasks=args.tasks, episodes=args.episodes,
                           seed=args.seed, execute_steps=args.execute_steps, max_steps=args.max_steps,
                           via_ros=args.via_ros, real_time_factor=args.real_time_factor,
                           expert=not args.no_expert, threads=args.threads, jobs=args.jobs,
                           node_params=_node_params(args.node_param))
    print((out / 'report.md').read_text())
    print(f'wrote {out}/report.json, report.md, montage.png')
    return 0


def _node_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        name, sep, value = item.partition('=')
        if not sep or not name.strip():
            raise ValueError(f'--node-param wants NAME=VALUE, got {item!r}')
        params[name.strip()] = value.strip()
    return params


def _make_backbone(args) -> int:
    from blockvla_ros.sim.suites import vocabulary
    from blockvla_ros.tasks.backbone import write_word_backbone
    out = write_word_backbone(args.out, hidden_size=args.hidden_size, num_layers=args.layers, seed=args.seed,
                              words=vocabulary(args.suite))
    print(f'wrote a random-init word-tokenizer backbone over the {args.suite} instructions to {out}')
    return 0


def _list(args) -> int:
    from blockvla_ros.sim.suites import INSTRUCTIONS, resolve_suite
    for name in resolve_suite('mt10'):
        print(f'{name:26s} ' + ' | '.join(INSTRUCTIONS[name]))
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = _parser().parse_args(argv)
    handlers = {'record': _record, 'evaluate': _evaluate, 'make-backbone': _make_backbone, 'list': _list}
    try:
        return handlers[args.command](args)
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as exc:
        print(f'blockvla-sim: error: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
