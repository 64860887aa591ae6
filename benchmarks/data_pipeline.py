"""Is the data pipeline the bottleneck? Samples/s of loading alone vs a training step, on real rosbag2 recordings.

    python benchmarks/data_pipeline.py                          # records tabletop demos into a temp dir
    python benchmarks/data_pipeline.py --data data/tabletop --config config/train/example.yaml --json out/dp.json

Loading = DataLoader over the training windows in the trainer's own batch order (frame -> normalized pixels,
instruction tokens, action tokens, collate), for each --workers value. Training step = forward + backward +
AdamW step of the configured model (mode from the config) on batches already in memory. The pipeline keeps up
when loading samples/s (with the workers the config uses) is well above the training step's samples/s.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default=str(REPO / 'config' / 'train' / 'example.yaml'), help='training YAML')
    p.add_argument('--data', default=None, help='bags to read (default: record tabletop demos into a temp dir)')
    p.add_argument('--episodes', type=int, default=4, help='episodes per task when recording (default 4)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--batches', type=int, default=30, help='batches timed per measurement (default 30)')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2], help='DataLoader workers to try')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    p.add_argument('--json', default=None, help='also write the figures to this JSON file')
    return p.parse_args(argv)


def loading_rate(dataset, batch_size: int, batches: int, workers: int) -> float:
    from torch.utils.data import DataLoader

    from blockvla_ros.training.dataset import collate
    from blockvla_ros.training.sampler import StepBatchSampler

    sampler = StepBatchSampler(len(dataset), batch_size, 1, 0, 1, 0, 0, batches + 2)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
    it = iter(loader)
    for _ in range(2):  # worker start-up is not throughput
        next(it)
    t = time.perf_counter()
    n = sum(next(it).actions.shape[0] for _ in range(batches))
    return n / (time.perf_counter() - t)


def step_rate(policy, dataset, mode: str, batch_size: int, batches: int, opts) -> float:
    from blockvla_ros.training.dataset import collate
    from blockvla_ros.training.optim import build_optimizer
    from blockvla_ros.training.trainer import make_loss_module

    module = make_loss_module(policy, mode).train()
    optimizer, _ = build_optimizer(policy, opts)
    pool = [collate([dataset[(b * batch_size + i) % len(dataset)] for i in range(batch_size)]) for b in range(4)]

    def step(b: int):
        loss, _ = module(pool[b % len(pool)], seed=b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in range(2):  # warm-up
        step(b)
    t = time.perf_counter()
    for b in range(batches):
        step(b)
    return batches * batch_size / (time.perf_counter() - t)


def main(argv=None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from blockvla_ros.training import assemble
    from blockvla_ros.training.config import load_train_config

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from blockvla_ros.tasks.recording import record_demonstrations

            data = str(Path(tmp) / 'bags')
            record_demonstrations(data, episodes_per_task=args.episodes, progress=False)
        config = load_train_config(args.config, [f'data.bags=[{data}]', 'data.val_fraction=0.1',
                                                 f'train.out_dir={tmp}/run'])
        t = time.perf_counter()
        train_eps, val_eps, model_cfg, report = assemble.read_and_split(config, progress=False)
        read_s = time.perf_counter() - t
        policy = assemble.build_policy(model_cfg, config)
        stats = assemble.resolve_stats(train_eps, model_cfg, None)
        run = assemble.build_data(config, policy, train_eps, val_eps, stats, report)
        rows = {'bags': report.bags, 'ticks': report.counts['ticks'], 'windows': len(run.train),
                'read_bags_s': round(read_s, 2), 'batch_size': args.batch_size, 'mode': config.train.mode,
                'model_params_M': round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
                'image_size': model_cfg.image_size, 'torch_threads': torch.get_num_threads()}
        for w in args.workers:
            rate = loading_rate(run.train, args.batch_size, args.batches, w)
            rows[f'loading_samples_per_s_workers{w}'] = round(rate, 1)
        rows['train_step_samples_per_s'] = round(step_rate(policy, run.train, config.train.mode, args.batch_size,
                                                           args.batches, config.train), 1)
    configured = rows.get(f'loading_samples_per_s_workers{config.data.num_workers}',
                          max(v for k, v in rows.items() if k.startswith('loading_')))
    rows['loading_over_step'] = round(configured / rows['train_step_samples_per_s'], 1)
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f'{key:<{width}}  {value}')
    verdict = 'not the bottleneck' if rows['loading_over_step'] > 1.5 else 'A BOTTLENECK'
    print(f'data pipeline ({config.data.num_workers} workers, as configured): {verdict} '
          f'({rows["loading_over_step"]}x the training step rate)')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
