#!/usr/bin/env python3
"""Peak memory and step time of blockvla-train on a real backbone shape (random weights), per memory setting.

    python benchmarks/train_memory.py --shape qwen2.5-0.5b --json out/train_memory.json [--settings lora-bf16-gc ...]

Writes the random-weight HF folder of the shape (benchmarks/shapes.py, streamed shard by shard), records a few
scripted tabletop demonstrations, and runs `blockvla-train` (the demo's vision/action settings, model.backbone_path =
that folder) for --steps optimizer steps once per setting, each in its own process: peak RSS is that process's
ru_maxrss (os.wait4), so it covers model build, training steps, validation and the checkpoint save. Settings:

    full-fp32      every weight trains, fp32                                   (AdamW: ~16 bytes per parameter)
    full-fp32-gc   + gradient checkpointing
    full-bf16-gc   + bf16 autocast (CPU)
    lora-bf16-gc   LoRA r=16 on every projection, frozen backbone stored in bf16, bf16 autocast, checkpointing

Figures are printed and written, never asserted. The machine is shared: run it under nice, one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

SETTINGS = {
    'full-fp32': {},
    'full-fp32-gc': {'gradient_checkpointing': True},
    'full-bf16-gc': {'gradient_checkpointing': True, 'precision': 'bf16'},
    'lora-bf16-gc': {'gradient_checkpointing': True, 'precision': 'bf16', 'frozen_dtype': 'bf16',
                     'lora': {'enabled': True, 'r': 16, 'alpha': 32}},
}
LIMIT_GB = 12.0


def record_data(folder: Path, episodes: int) -> Path:
    from blockvla_ros.tasks.recording import record_demonstrations

    if not folder.is_dir():
        record_demonstrations(folder, tasks=['touch_red', 'touch_blue'], episodes_per_task=episodes, seed=0,
                              progress=False)
    return folder


def train_config(backbone: Path, data: Path, out_dir: Path, steps: int, batch: int, setting: dict) -> dict:
    model = {k: v for k, v in shapes.POLICY.items() if k != 'schedule'}
    model.update(backbone_path=str(backbone), text_tokenizer='byte')
    train = dict(steps=steps, batch_size=batch, lr=1e-4, warmup_steps=1, log_interval=1, eval_interval=steps,
                 save_interval=steps, keep_checkpoints=1, eval_decode_samples=0, device='cpu', out_dir=str(out_dir),
                 resume='never', progress=False)
    train.update(setting)
    return {'model': model, 'data': {'bags': [str(data)], 'topics': {'state': '/joint_states'}, 'val_fraction': 0.25,
                                     'val_max_windows': 8, 'num_workers': 0},
            'train': train}


def run_setting(name: str, config: dict, work: Path, threads: int) -> dict:
    """blockvla-train in a child process; -> its peak RSS (wait4 ru_maxrss), wall time and the run's figures."""
    path = work / f'{name}.yaml'
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out_dir = Path(config['train']['out_dir'])
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, '-m', 'blockvla_ros.training.cli', '--config', str(path), '--no-progress']
    print(f'[{name}] {" ".join(cmd)}', flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    (work / f'{name}.log').write_text(log)
    row = {'overrides': {f'train.{k}': v for k, v in SETTINGS[name].items()},
           'peak_rss_gb': usage.ru_maxrss * 1024 / 1e9, 'wall_s': wall,
           'cpu_s': usage.ru_utime + usage.ru_stime,  # less sensitive than wall time to other jobs on the machine
           'returncode': proc.returncode}
    if proc.returncode != 0:
        row['error'] = log[-2000:]
        print(f'[{name}] FAILED (exit {proc.returncode}): {log[-800:]}', flush=True)
        return row
    result = json.loads((out_dir / 'result.json').read_text())
    steps = [json.loads(line) for line in (out_dir / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    times = [r['time_s'] for r in steps if r.get('split') == 'train']
    per_step = [b - a for a, b in zip([0.0] + times[:-1], times)]
    row.update(train_loss=result['train_loss'], val_loss=result['val_loss'], steps=result['step'],
               s_per_step_first=per_step[0] if per_step else None,
               s_per_step_rest=(sum(per_step[1:]) / len(per_step[1:])) if len(per_step) > 1 else None,
               within_limit=row['peak_rss_gb'] <= LIMIT_GB)
    shutil.rmtree(out_dir / 'checkpoints', ignore_errors=True)  # GBs each at this size
    print(f'[{name}] peak RSS {row["peak_rss_gb"]:.2f} GB, {wall:.0f} s ({row["cpu_s"]:.0f} s CPU), '
          f'{row["s_per_step_rest"] or row["s_per_step_first"]:.1f} s/step, loss {row["train_loss"]:.3f}', flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', choices=sorted(shapes.SHAPES), default='qwen2.5-0.5b')
    p.add_argument('--json', type=Path, required=True)
    p.add_argument('--settings', nargs='+', choices=sorted(SETTINGS), default=list(SETTINGS))
    p.add_argument('--steps', type=int, default=3, help='optimizer steps per setting')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--episodes', type=int, default=2, help='scripted demonstrations per task (2 tasks)')
    p.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument('--work', type=Path, help='keep the backbone folder, data and logs here (default: temp dir)')
    args = p.parse_args(argv)

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix='blockvla_train_memory_')
    work = (args.work or Path(tmp.name)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = shapes.param_count(args.shape)
    print(f'shape {args.shape}: {params / 1e6:.0f} M parameters ({params * 4 / 1e9:.2f} GB fp32)', flush=True)
    backbone = shapes.write_random_backbone(args.shape, work / f'backbone_{args.shape}')
    data = record_data(work / 'data', args.episodes)
    out = {'shape': args.shape, 'params_m': params / 1e6, 'weight_gb_fp32': params * 4 / 1e9,
           'steps': args.steps, 'batch_size': args.batch_size, 'threads': args.threads, 'limit_gb': LIMIT_GB,
           'machine': platform.machine(), 'cpu_count': os.cpu_count(), 'shared_machine': True, 'settings': {}}
    for name in args.settings:
        config = train_config(backbone, data, work / f'run_{name}', args.steps, args.batch_size, SETTINGS[name])
        out['settings'][name] = run_setting(name, config, work, args.threads)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))  # after every setting: a long run keeps what it measured
    print(f'\n{"setting":<14} {"peak RSS GB":>11} {"s/step":>8} {"loss":>7}  within {LIMIT_GB:.0f} GB')
    for name, row in out['settings'].items():
        if row['returncode'] != 0:
            print(f'{name:<14} failed (exit {row["returncode"]})')
            continue
        sps = row['s_per_step_rest'] or row['s_per_step_first']
        print(f'{name:<14} {row["peak_rss_gb"]:11.2f} {sps:8.1f} {row["train_loss"]:7.3f}  {row["within_limit"]}')
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
