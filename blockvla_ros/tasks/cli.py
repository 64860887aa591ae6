"""`blockvla-task`: record expert demonstrations of the tabletop tasks, measure the random baseline, or write the
demo recipe's starting points (a tiny word-tokenizer backbone folder, a pretrained patch encoder)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from blockvla_ros.io.bag_writer import ACTION_MSGS, IMAGE_FORMATS, STORAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='blockvla-task', description=__doc__)
    sub = p.add_subparsers(dest='command', required=True)

    rec = sub.add_parser('record', help='record scripted-expert demonstrations, one rosbag2 per episode')
    rec.add_argument('--out', required=True, help='output directory (bags are named <task>_seed<S>_ep<NNNN>)')
    rec.add_argument('--episodes', type=int, default=10, help='episodes per task (default 10)')
    rec.add_argument('--tasks', nargs='+', default=None, help='task names (default: all; see `list`)')
    rec.add_argument('--seed', type=int, default=0, help='base seed of the episode layouts (default 0)')
    rec.add_argument('--storage', choices=sorted(STORAGES), default='mcap', help='rosbag2 storage (default mcap)')
    rec.add_argument('--image-format', choices=IMAGE_FORMATS, default='raw',
                     help='raw sensor_msgs/Image or jpeg/png CompressedImage (default raw)')
    rec.add_argument('--action-msg', choices=sorted(ACTION_MSGS), default='JointTrajectory',
                     help='message type of the recorded action (default JointTrajectory)')
    rec.add_argument('--rate-hz', type=float, default=10.0, help='control rate of the recording (default 10)')
    rec.add_argument('--image-size', type=int, default=64, help='square image side in pixels (default 64)')
    rec.add_argument('--noise', type=float, default=0.0,
                     help='std of the expert heading noise, for varied demonstrations (default 0)')
    rec.add_argument('--labels', choices=('executed', 'intended'), default='executed',
                     help='action recorded per tick: the executed (noisy) one, or the expert\'s noise-free action at '
                          'the reached state (DART: labels without the noise; default executed; intended labels let '
                          'block-diffusion training copy neighbouring ticks instead of reading the scene: '
                          'see expert.py)')

    rnd = sub.add_parser('random-baseline', help='closed-loop success of uniform random actions')
    rnd.add_argument('--episodes', type=int, default=50, help='episodes per task (default 50)')
    rnd.add_argument('--tasks', nargs='+', default=None, help='task names (default: all)')
    rnd.add_argument('--seed', type=int, default=0, help='evaluation seed (default 0)')
    rnd.add_argument('--json', default=None, help='also write the full result to this JSON file')

    bb = sub.add_parser('make-backbone', help='write a tiny random-init Llama folder with a word-level tokenizer '
                                              'over the task vocabulary (for model.backbone_path)')
    bb.add_argument('--out', required=True, help='output folder (replaced atomically)')
    bb.add_argument('--hidden-size', type=int, default=128)
    bb.add_argument('--layers', type=int, default=2)
    bb.add_argument('--heads', type=int, default=4)
    bb.add_argument('--kv-heads', type=int, default=2)
    bb.add_argument('--intermediate-size', type=int, default=256)
    bb.add_argument('--seed', type=int, default=0)

    pv = sub.add_parser('pretrain-vision', help="pretrain a training config's patch encoder on rendered scenes "
                                                '(object colour + position per patch); load it with vision.init_from')
    pv.add_argument('--config', required=True, help='training config (its model.vision and image_size are used)')
    pv.add_argument('--out', required=True, help='output .safetensors file (written atomically)')
    pv.add_argument('--steps', type=int, default=600, help='optimizer steps (default 600, a few CPU-seconds)')
    pv.add_argument('--scenes', type=int, default=4000, help='rendered scenes, 10 %% held out (default 4000)')
    pv.add_argument('--seed', type=int, default=0)

    sub.add_parser('list', help='list the tasks with one example instruction each')
    return p


def _record(args) -> int:
    from blockvla_ros.tasks.recording import record_demonstrations
    logging.getLogger('blockvla_ros.io.bag_writer').setLevel(logging.WARNING)  # the progress bar says it per bag
    paths = record_demonstrations(args.out, tasks=args.tasks, episodes_per_task=args.episodes, seed=args.seed,
                                  rate_hz=args.rate_hz, storage=args.storage, image_format=args.image_format,
                                  action_msg=args.action_msg, image_size=args.image_size, expert_noise=args.noise,
                                  labels=args.labels)
    print(f'wrote {len(paths)} recordings to {args.out}')
    return 0


def _random_baseline(args) -> int:
    from blockvla_ros.io.atomic import atomic_write_text
    from blockvla_ros.tasks.evaluate import random_policy_success
    result = random_policy_success(tasks=args.tasks, episodes_per_task=args.episodes, seed=args.seed, progress=True)
    for name, r in result['per_task'].items():
        print(f'{name:28s} {r["successes"]:4d}/{r["episodes"]:<4d} {100 * r["success_rate"]:6.1f} %')
    print(f'{"overall":28s} {result["successes"]:4d}/{result["episodes"]:<4d} {100 * result["success_rate"]:6.1f} %')
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + '\n')
    return 0


def _make_backbone(args) -> int:
    from blockvla_ros.tasks.backbone import write_word_backbone
    out = write_word_backbone(args.out, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                              num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size, seed=args.seed)
    print(f'wrote a random-init word-tokenizer backbone to {out}')
    return 0


def _pretrain_vision(args) -> int:
    from blockvla_ros.tasks.vision_pretrain import pretrain_patch_encoder
    from blockvla_ros.training.config import load_train_config
    model_cfg = load_train_config(args.config).model_config()
    r = pretrain_patch_encoder(model_cfg, args.out, steps=args.steps, scenes=args.scenes, seed=args.seed)
    print(f"wrote {r['out']}: {r['steps']} steps in {r['seconds']} s; held-out colour accuracy on object patches "
          f"{100 * r['object_patch_accuracy_before']:.1f} % -> {100 * r['object_patch_accuracy']:.1f} % "
          f"(one colour of {int(round(1 / r['chance']))}: {100 * r['chance']:.0f} %)")
    return 0


def _list() -> int:
    from blockvla_ros.tasks.spec import TASKS
    from blockvla_ros.tasks.tabletop import TabletopEnv
    for name in TASKS:
        print(f'{name:28s} e.g. "{TabletopEnv(name, seed=0).reset().instruction}"')
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = _parser().parse_args(argv)
    try:
        if args.command == 'record':
            return _record(args)
        if args.command == 'random-baseline':
            return _random_baseline(args)
        if args.command == 'make-backbone':
            return _make_backbone(args)
        if args.command == 'pretrain-vision':
            return _pretrain_vision(args)
        return _list()
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f'blockvla-task: error: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
