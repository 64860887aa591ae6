"""blockvla-train: finetune a BlockVLA policy from rosbag2 demonstrations.

    blockvla-train --config config/train/example.yaml train.mode=ar train.lr=3e-4 --max-steps 200
    accelerate launch --config_file config/train/accelerate_ddp.yaml -m blockvla_ros.training.cli --config ...
    torchrun --nproc_per_node 4 -m blockvla_ros.training.cli --config ...
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='blockvla-train', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='Overrides: key.sub=value, values parsed as YAML (train.lr=3e-4, '
                                       'data.bags=[a,b], model.backbone_path=/models/qwen).')
    p.add_argument('--config', required=True, help='training YAML (model / data / train sections)')
    p.add_argument('overrides', nargs='*', help='key.sub=value settings applied on top of the file')
    p.add_argument('--max-steps', type=int, default=None,
                   help='stop at this step (checkpointed; run again to resume); the LR schedule still spans '
                        'train.steps')
    p.add_argument('--time-budget', type=float, default=None, metavar='SECONDS',
                   help='stop (with a checkpoint) after this many seconds')
    p.add_argument('--resume', default=None, help="'auto' (default: latest checkpoint in out_dir), 'never', or a "
                                                  'checkpoint path')
    p.add_argument('--out', default=None, help='output directory (train.out_dir)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
    p.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    from .config import load_train_config

    extra = list(args.overrides)
    for flag, key in ((args.max_steps, 'train.max_steps'), (args.time_budget, 'train.time_budget_s'),
                      (args.resume, 'train.resume'), (args.out, 'train.out_dir')):
        if flag is not None:  # JSON is YAML: a path stays a string ('--out 2024', '--resume a: b')
            extra.append(f'{key}={json.dumps(flag)}')
    if args.no_progress:
        extra.append('train.progress=false')
    try:
        config = load_train_config(args.config, extra)
    except (ValueError, FileNotFoundError) as e:
        print(f'blockvla-train: error: {e}', file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end='')
        return 0
    from ..io.bag_reader import BagError
    from ..io.file_lock import LockedError
    from .trainer import train

    try:
        result = train(config)
    except (BagError, LockedError, ValueError, OSError, ImportError) as e:  # OSError: disk full, no permission
        print(f'blockvla-train: error: {e}', file=sys.stderr)
        return 2
    if result is not None and _is_main():
        print(f'stopped: {result.stopped} at step {result.step}; train loss {_fmt(result.train_loss)}, '
              f'val loss {_fmt(result.val_loss)}, {_fmt(result.samples_per_s)} samples/s')
        print(f'checkpoint: {result.checkpoint}')
        print(f'metrics: {result.metrics_path}  curve: {result.curve_path}')
    return 0


def _fmt(x) -> str:
    return 'n/a' if x is None else f'{x:.4g}'


def _is_main() -> bool:
    import os

    return os.environ.get('RANK', '0') == '0'


if __name__ == '__main__':
    sys.exit(main())
