"""`blockvla-replay`: offline open-loop evaluation of one or more policies on recorded rosbags.

    blockvla-replay --bag PATH [--bag ...] --policy NAME [--policy NAME2] [--decoder D ...] --out DIR

Reads mcap or sqlite3 bags directly (no ROS needed), steps through them at the control rate on
recorded time, predicts a chunk every --execute-steps ticks with the node's runner and compares it
with the recorded actions. Two policies, or one policy with two decoders, give one side-by-side
report. Writes DIR/report.json, DIR/report.md and PNG plots.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

from blockvla_ros.paths import package_data_dir

DEFAULT_POLICY_DIR = package_data_dir('models') or Path('models')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='blockvla-replay', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 2)[2])
    p.add_argument('--bag', action='append', required=True, metavar='PATH',
                   help='a bag directory, a .mcap/.db3 file, or a directory of bags (repeatable)')
    p.add_argument('--policy', action='append', required=True, metavar='NAME',
                   help='policy folder name under --policy-dir, or a path to one (repeat to compare policies)')
    p.add_argument('--decoder', action='append', default=None,
                   choices=('blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache'),
                   help="decoder override (repeat to compare decoders; default: the policy's own)")
    p.add_argument('--engine', default='onnxruntime', help='inference engine (default onnxruntime)')
    p.add_argument('--policy-dir', action='append', default=None, metavar='DIR',
                   help=f'directories policies are looked up in (default {DEFAULT_POLICY_DIR})')
    p.add_argument('--threads', type=int, default=1,
                   help='ONNX Runtime intra-op threads (default 1: small policies gain nothing from more, and the '
                        'bag reader runs on another core; 0 = the runtime default)')
    p.add_argument('--warmup', type=int, default=2,
                   help='untimed predictions per policy before the replay, as the node does (default 2)')
    p.add_argument('--out', required=True, help='output directory for report.json, report.md and plots')
    p.add_argument('--rate-hz', type=float, default=None,
                   help="control rate of the replay (default: the policy's trained rate, policy.yaml "
                        "config.control_rate_hz)")
    p.add_argument('--action-lower', default=None, metavar='V,V,...',
                   help='the robot\'s lower action limits, comma-separated in the policy\'s action order (as the '
                        'node\'s action_limits.lower; default: none; write --action-lower=-1,-1,0 so the leading '
                        'minus is not taken for an option). Clipping is counted in the report')
    p.add_argument('--action-upper', default=None, metavar='V,V,...', help='upper action limits (see --action-lower)')
    p.add_argument('--execute-steps', type=int, default=None,
                   help='ticks between predictions, as executed on the robot (default: the chunk length)')
    p.add_argument('--known-steps', type=int, default=0,
                   help='real-time chunking: previous-chunk actions fed to each new chunk (default 0)')
    p.add_argument('--image-topic', default='/camera/image_raw',
                   help="camera topic (Image; '<topic>/compressed' is used when only that exists)")
    p.add_argument('--instruction-topic', default='/instruction', help='std_msgs/String instruction topic')
    p.add_argument('--action-topic', default='/joint_command',
                   help='recorded action topic (JointTrajectory, JointState, Float32/64MultiArray)')
    p.add_argument('--action-field', default='position', choices=('position', 'velocity'),
                   help='JointState actions: which field holds the action (default position)')
    p.add_argument('--state-topic', default='/joint_states',
                   help='proprioception topic, read only for policies with state inputs')
    p.add_argument('--max-plots', type=int, default=20, help='trajectory plots for at most this many episodes')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    return p


def _variants(args) -> list[tuple[str, str | None, str]]:
    """(policy, decoder, label) for every policy x decoder combination."""
    decoders = args.decoder or [None]
    out = []
    for policy, decoder in itertools.product(args.policy, decoders):
        label = Path(policy).name if len(args.policy) > 1 or decoder is None else ''
        if decoder is not None:
            label = f'{label}/{decoder}' if label else decoder
        out.append((policy, decoder, label))
    labels = [lab for _, _, lab in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f'--policy / --decoder combinations are not distinct: {labels}')
    return out


def _load_runner(policy: str, decoder: str | None, args):
    from blockvla_ros.runtime.policy_folder import PolicyFolderError, resolve_policy
    from blockvla_ros.runtime.runner import PolicyRunner

    dirs = [Path(d) for d in (args.policy_dir or [DEFAULT_POLICY_DIR])]
    given = Path(policy).expanduser()
    if given.is_dir() and not args.policy_dir:
        dirs.append(given.resolve().parent)  # an explicit folder path is allowed from the command line
        policy = str(given.resolve())
    try:
        folder = resolve_policy(policy, dirs)
    except PolicyFolderError as err:
        here = Path('models') / policy  # `blockvla-export --out models/NAME` run here, outside the source checkout
        if args.policy_dir or not (here / 'policy.yaml').is_file():
            raise
        raise PolicyFolderError(f'{err}; ./{here} is a policy folder: give --policy {here} or --policy-dir models') \
            from None
    runner = PolicyRunner.load(folder, engine=args.engine, decoder=decoder, threads=args.threads or None)
    if args.warmup > 0:
        runner.warmup(args.warmup)  # first calls allocate arenas; keep them out of the latency figures
    return runner


def _rate(given, runners) -> float:
    """--rate-hz, else the one rate the replayed policies were trained at."""
    if given is not None:
        return float(given)
    rates = {r.config.control_rate_hz for r, _ in runners}
    if len(rates) != 1 or None in rates:
        raise ValueError(f'the policies do not agree on one trained control rate ({sorted(map(str, rates))}); '
                         'pass --rate-hz')
    return float(rates.pop())


def _limits(args, names):
    from blockvla_ros.runtime.action_output import ActionLimits

    def numbers(text):
        try:
            return [float(x) for x in text.split(',')] if text else []
        except ValueError:
            raise ValueError(f'action limits must be comma-separated numbers, got {text!r}') from None

    return ActionLimits.parse(numbers(args.action_lower), numbers(args.action_upper), names)


def run(args) -> dict:
    """Load, replay, summarize, write; returns the report dict."""
    from blockvla_ros.evaluation import plots
    from blockvla_ros.evaluation.replay import ReplaySettings, replay_bags
    from blockvla_ros.evaluation.report import build_report, write_report
    from blockvla_ros.io.bag_reader import TopicMap

    from blockvla_ros.io.atomic import check_output_dir

    check_output_dir(args.out)  # before any work
    progress = False if args.quiet else None
    variants = _variants(args)
    runners = [(_load_runner(policy, decoder, args), label or None) for policy, decoder, label in variants]
    dims = {r.config.action_dim for r, _ in runners}
    if len(dims) != 1:
        raise ValueError(f'the compared policies predict different action sizes {sorted(dims)}; '
                         f'compare policies of one robot')
    state_dims = {r.config.state_dim for r, _ in runners if r.config.state_dim}
    if len(state_dims) > 1:
        raise ValueError(f'the compared policies read different state sizes {sorted(state_dims)}')
    settings = ReplaySettings(_rate(args.rate_hz, runners), args.execute_steps, args.known_steps,
                              _limits(args, runners[0][0].action_names))
    for runner, _ in runners:
        settings.resolve(int(runner.config.chunk_len))  # bad --execute-steps fails before reading bags

    topic_map = TopicMap(image=args.image_topic, instruction=args.instruction_topic, action=args.action_topic,
                         state=args.state_topic if state_dims else None, action_field=args.action_field)
    # inputs the policies name are matched by name in each episode (replay._in_policy_order), as the node reads
    # joint states: a bag may list more joints; only unnamed ones must have the policy's width here
    action_dim = None if all(_named(r.config.action_names) for r, _ in runners) else dims.pop()
    state_dim = None if all(_named(r.config.state_names) for r, _ in runners) else \
        (state_dims.pop() if state_dims else None)
    run = replay_bags(runners, args.bag, topic_map, settings, action_dim=action_dim, state_dim=state_dim,
                      progress=progress)
    results = run.variants
    report = build_report(results, run.bags, settings, run.read_s, wall_s=run.wall_s)
    summaries = [v['overall'] for v in report['variants']]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_plots(out)
    report['plots'] = plots.write_plots(results, summaries, settings.rate_hz, out, max_episodes=args.max_plots,
                                        progress=progress)
    write_report(report, out)
    for name in previous - set(report['plots']):  # a former report's plots of episodes this one does not cover
        (out / name).unlink(missing_ok=True)
    return report


def _named(names) -> bool:
    from blockvla_ros.io.actions import generic_names

    return bool(names) and list(names) != generic_names(len(names))


def _previous_plots(out: Path) -> set:
    """The plot files a report already in `out` lists (only plain names of .png files in `out` itself)."""
    try:
        listed = json.loads((out / 'report.json').read_text()).get('plots') or []
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in listed if isinstance(n, str) and n.endswith('.png') and Path(n).name == n
            and not n.startswith('.')}


def _print_summary(report: dict, out: str) -> None:
    for v in report['variants']:
        o = v['overall']
        line = f'{v["label"]}: {o["episodes"]} episodes, {o["chunks"]} chunks'
        if o['errors']:
            arm, grip = o['errors']['arm'], o['errors']['gripper']
            line += f', arm MAE {arm["mae"]:.4g}'
            if grip:
                line += f', gripper MAE {grip["mae"]:.4g}'
        else:
            line += f' ({o["error_note"]})'
        lat = o['latency_ms']['total']
        if lat:
            line += f', latency p50 {lat["p50"]:.1f} ms p99 {lat["p99"]:.1f} ms'
        if o['nfe']:
            line += f', NFE {o["nfe"]["mean"]:.1f}'
        print(line)
        sp = v['speed']
        print(f'  replay speed: {sp["realtime_factor"]:.1f}x real time '
              f'({sp["recorded_s"]:.1f} s recorded in {sp["replay_wall_s"]:.2f} s)')
    sp = report['speed']
    print(f'whole run incl. bag reading: {sp["realtime_factor"]:.1f}x real time '
          f'({sp["recorded_s"]:.1f} s recorded in {sp["total_wall_s"]:.2f} s)')
    print(f'wrote {Path(out) / "report.json"}, {Path(out) / "report.md"} and {len(report["plots"])} plots')


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as err:  # BagError is a ValueError
        print(f'blockvla-replay: error: {err}', file=sys.stderr)
        return 2
    _print_summary(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
