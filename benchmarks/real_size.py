#!/usr/bin/env python3
"""Export and run a policy on a real backbone shape (random weights): time, memory and disk against the weights.

    python benchmarks/real_size.py --shape qwen2.5-0.5b --json out/real_size_qwen2.5-0.5b.json
    python benchmarks/real_size.py --shape qwen2.5-0.5b-40l --json out/rs_40l.json --precisions fp32 int4  # > 2 GiB
    python benchmarks/real_size.py --shape qwen2.5-0.5b --json out/rs_blocks.json --precisions int4 \
        --quant-block-sizes 32 64 128       # rows int4-b32, int4-b64, int4-b128: folder, RSS, speed, agreement

Shapes: benchmarks/shapes.py (Qwen2.5-0.5B, SmolLM2-360M, Qwen3-0.6B dimensions; `qwen2.5-0.5b-40l`, Qwen2.5-0.5B
widths in 40 layers, whose backbone graph is above protobuf's 2 GiB in fp32; `tiny` for smoke tests; a whole
VLM: `smolvlm2-256m`, its vision tower, connector and prompt included, shapes.VLM_POLICY). Steps,
each heavy one in its own process so its memory is its own (peak = that process's ru_maxrss, from os.wait4):

1. prepare: the random-weight HF folder (written shard by shard), a policy checkpoint on it with the demo's vision /
   action settings (shapes.POLICY), and the fp32 torch policy's tokens on --observations observations (reference).
2. export, per precision: `blockvla-export --no-torch-weights --no-calibrate --precision P` (policy folder format 2:
   what a robot ships; random weights, no run to calibrate on) -> export_s, export_cpu_s, export_peak_rss_gb,
   folder_gb, files (bytes of each file), backbone_graph_gb (backbone.onnx + its external data),
   folder_over_weights (folder bytes / weight bytes at that precision: parameters x 4, 2, 1 or 0.5 bytes). The
   exporter's own parity check is off by default (--export-parity-samples 0): step 3 measures token agreement
   through the runtime a robot uses, and the parity check's lock-step decoding is not export time.
3. run, per precision: PolicyRunner (ONNX Runtime, CPU) in a fresh process -> load_s, runner_rss_gb (after load and
   warm-up; split into runner_rss_anon_gb and runner_rss_file_gb, the file-backed pages: shared libraries and
   memory-mapped weights, which the kernel can drop and re-read; benchmarks/runner_memory.py breaks it down by stage),
   runner_rss_over_weights (the whole process's RSS / weight bytes at that precision), process_rss_gb (the
   same process before the policy loads: Python, numpy, ONNX Runtime and the runtime's modules imported) and
   runner_added_rss_over_weights (what loading and warming the policy added / the same weight bytes); ms per chunk
   with 1 and 2 threads (median of --runs, prefill included; cpu_ms_per_chunk_1t/2t: the CPU time those chunks took,
   all threads, less dependent on the load of a shared machine); token_agreement = share of action tokens equal to
   the fp32 torch policy's.

With --quant-block-sizes, each int8 / int4 precision is exported once per block size (blockvla-export
--quant-block-size), its row named `<precision>-b<size>`; every row records its quant_block_size. A precision that
fails (e.g. fp16 on ONNX Runtime's CPU provider) keeps its error under export_error / run_error
instead of figures. The top-level export_s, export_cpu_s, export_peak_rss_gb, folder_over_weights,
runner_rss_over_weights and load_s are those of the first precision (fp32 by default). Each step records the
1-minute load average before and after it (`load`): the machine is shared. Random weights make logits nearly
flat, so token agreement at reduced precision is a pessimistic figure. Printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import shapes  # noqa: E402
from proc_status import status_gb  # noqa: E402
from blockvla_ros.export.precision import PRECISIONS  # noqa: E402

BYTES_PER_WEIGHT = {'fp32': 4.0, 'fp16': 2.0, 'int8': 1.0, 'int4': 0.5}  # per parameter, for each of PRECISIONS


# --- child processes ------------------------------------------------------------------------------------------------
def run_child(phase: str, args: dict, work: Path, threads: int = 2) -> dict:
    """Run `phase` of this file in a fresh interpreter; -> its JSON result + peak_rss_gb (wait4) + wall_s."""
    out = work / f'.{phase}_{os.getpid()}_{time.monotonic_ns()}.json'
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), '--child', phase, '--child-args', json.dumps(args),
           '--child-out', str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    result = json.loads(out.read_text()) if code == 0 and out.is_file() else {'error': log[-3000:], 'exit': code}
    out.unlink(missing_ok=True)
    result.update(peak_rss_gb=usage.ru_maxrss * 1024 / 1e9, wall_s=wall)
    return result


def child_prepare(shape: str, work: str, observations: int) -> dict:
    """Backbone folder + policy checkpoint + the fp32 torch policy's tokens (the agreement reference)."""
    from blockvla_ros.export.parity import random_observations
    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.policy import BlockVLAPolicy
    from blockvla_ros.runtime.decoding import Decoder
    from blockvla_ros.runtime.runner import build_preprocessor
    from blockvla_ros.runtime.torch_engine import TorchEngine

    work = Path(work)
    t0 = time.perf_counter()
    backbone = shapes.write_random_backbone(shape, work / f'backbone_{shape}')
    ckpt = work / f'checkpoint_{shape}'
    if not (ckpt / 'stats.json').is_file():
        shapes.make_policy_checkpoint(backbone, ckpt)
    prepare_s = time.perf_counter() - t0
    policy = BlockVLAPolicy.load(ckpt)
    stats = NormStats.load(ckpt / 'stats.json')
    pre = build_preprocessor(policy.config, stats, ckpt)  # a VLM's tokenizer.json is in the checkpoint
    obs = random_observations(policy.config, stats, observations, seed=0, tokenizer=pre.text)
    engine, decoder = TorchEngine(policy), Decoder(policy.config)
    t1 = time.perf_counter()
    tokens = [decoder(engine, pre(*o)).tokens.tolist() for o in obs]
    return {'checkpoint': str(ckpt), 'prepare_s': prepare_s, 'torch_ms_per_chunk': (time.perf_counter() - t1) * 1e3 /
            max(len(obs), 1), 'params': sum(p.numel() for p in policy.parameters()),
            'weight_bytes_fp32': sum(p.numel() * 4 for p in policy.parameters()), 'reference_tokens': tokens}


def child_run(folder: str, observations: int, reference: list, runs: int) -> dict:
    """Load time and RSS of a PolicyRunner, ms per chunk at 1 and 2 threads, token agreement with the reference."""
    from blockvla_ros.export.parity import random_observations
    from blockvla_ros.runtime.runner import PolicyRunner

    import onnxruntime  # noqa: F401  (imported by the runner anyway: part of the bare process)

    out = {'process_rss_gb': status_gb('VmRSS')}  # Python + numpy + ONNX Runtime + the runtime's modules, no policy
    for threads in (1, 2):
        t0 = time.perf_counter()
        runner = PolicyRunner.load(folder, threads=threads)
        load_s = time.perf_counter() - t0
        runner.warmup(n=1, image_shape=(runner.config.image_size, runner.config.image_size))
        if threads == 1:
            out.update(load_s=load_s, runner_rss_gb=status_gb('VmRSS'), runner_rss_anon_gb=status_gb('RssAnon'),
                       runner_rss_file_gb=status_gb('RssFile'))  # file-backed: shared libraries, mapped weights
            obs = random_observations(runner.config, runner.spec.stats, observations, seed=0,
                                      tokenizer=runner.preprocessor.text)
            tokens = [runner.predict(*o).tokens for o in obs]
            agree = [float(np.mean(np.asarray(t) == np.asarray(r))) for t, r in zip(tokens, reference)]
            out['token_agreement'] = float(np.mean(agree))
            out['chunks_identical'] = int(sum(a == 1.0 for a in agree))
        times, cpu, nfe = [], [], None
        for i in range(runs):
            c0 = time.process_time()
            pred = runner.predict(*obs[i % len(obs)])
            cpu.append((time.process_time() - c0) * 1e3)
            times.append(pred.timings['total_ms'])
            nfe = pred.nfe
        out[f'ms_per_chunk_{threads}t'] = statistics.median(times)
        out[f'cpu_ms_per_chunk_{threads}t'] = statistics.median(cpu)  # all threads' CPU time: less load-dependent
        out[f'cpu_ms_per_pass_{threads}t'] = statistics.median(cpu) / max(pred.nfe, 1)
        out['nfe'] = nfe
        del runner
    out['runner_peak_rss_gb'] = status_gb('VmHWM')
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob('*') if p.is_file())


# --- the benchmark --------------------------------------------------------------------------------------------------
def export_cmd(ckpt: str, folder: Path, precision: str, threads: int, parity_samples: int,
               accuracy_level=None, block_size=None) -> list:
    quantized = precision in ('int8', 'int4')
    level = ['--quant-accuracy-level', str(accuracy_level)] if accuracy_level is not None and quantized else []
    level += ['--quant-block-size', str(block_size)] if block_size is not None and quantized else []
    return [sys.executable, '-m', 'blockvla_ros.export.cli', '--checkpoint', ckpt, '--out', str(folder),
            '--no-torch-weights', '--no-calibrate', '--precision', precision,
            '--parity-samples', str(parity_samples), '--threads', str(threads), '-q'] + level


def backbone_graph_bytes(folder: Path) -> int:
    """backbone.onnx and its external-data file(s): what protobuf's 2 GiB would have limited."""
    return sum(p.stat().st_size for p in Path(folder).glob('backbone.onnx*'))


def load_average() -> float:
    return round(os.getloadavg()[0], 1)


def timed_process(cmd: list, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    row = {'seconds': time.perf_counter() - t0, 'peak_rss_gb': usage.ru_maxrss * 1024 / 1e9, 'exit': code,
           'cpu_s': usage.ru_utime + usage.ru_stime}
    if code != 0:
        row['error'] = log[-3000:]
    return row


def measure_precision(precision: str, ckpt: str, work: Path, prep: dict, args, block_size=None, label=None) -> dict:
    label = label or precision
    folder = work / f'policy_{args.shape}_{label}'
    print(f'[{label}] export ...', flush=True)
    load = [load_average()]
    cmd = export_cmd(ckpt, folder, precision, args.threads, args.export_parity_samples, args.quant_accuracy_level,
                     block_size)
    ex = timed_process(cmd, args.threads)
    load.append(load_average())
    row = {'export_s': ex['seconds'], 'export_cpu_s': ex['cpu_s'], 'export_peak_rss_gb': ex['peak_rss_gb'],
           'export_command': ' '.join(cmd[2:]), 'load': load, 'precision': precision,
           'quant_block_size': block_size}  # as asked (None: the exporter's default); as used, below
    if ex['exit'] != 0:
        row['export_error'] = ex['error']
        print(f'[{label}] export FAILED after {ex["seconds"]:.0f} s: {ex["error"][-600:]}', flush=True)
        return row
    row['quant_block_size'] = exported_block_size(folder)
    weights = prep['params'] * BYTES_PER_WEIGHT[precision]
    size = folder_bytes(folder)
    row.update(folder_gb=size / 1e9, weight_gb_at_precision=weights / 1e9, folder_over_weights=size / weights,
               backbone_graph_gb=backbone_graph_bytes(folder) / 1e9,
               files={p.name: p.stat().st_size for p in sorted(folder.iterdir())})
    print(f'[{label}] exported in {ex["seconds"]:.0f} s, peak RSS {ex["peak_rss_gb"]:.2f} GB, folder '
          f'{size / 1e9:.2f} GB ({size / weights:.2f}x the weights); running ...', flush=True)
    run = run_child('run', {'folder': str(folder), 'observations': args.observations,
                            'reference': prep['reference_tokens'], 'runs': args.runs}, work, args.threads)
    load.append(load_average())
    if 'error' in run:
        row['run_error'] = run['error']
        return row
    row.update({k: run[k] for k in ('load_s', 'runner_rss_gb', 'runner_rss_anon_gb', 'runner_rss_file_gb',
                                    'runner_peak_rss_gb', 'ms_per_chunk_1t',
                                    'ms_per_chunk_2t', 'cpu_ms_per_chunk_1t', 'cpu_ms_per_chunk_2t',
                                    'cpu_ms_per_pass_1t', 'cpu_ms_per_pass_2t', 'token_agreement',
                                    'chunks_identical', 'nfe')})
    row['runner_rss_over_weights'] = run['runner_rss_gb'] * 1e9 / weights  # the whole process
    row['process_rss_gb'] = run['process_rss_gb']
    row['runner_added_rss_over_weights'] = (run['runner_rss_gb'] - run['process_rss_gb']) * 1e9 / weights
    if not args.keep_folders:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return row


def check_block(precision: str, block_size) -> None:
    """A block size the exporter would refuse fails before the backbone is written."""
    from blockvla_ros.export.precision import check_quant_block_size

    check_quant_block_size(precision, block_size if precision in ('int8', 'int4') else None)


def exported_block_size(folder: Path):
    """The quantization block size the export used (recorded in policy.yaml; its default depends on the backbone's
    width); None for fp32 / fp16."""
    import yaml

    return yaml.safe_load((folder / 'policy.yaml').read_text())['export'].get('quant_block_size')


def measurements(precisions: list, block_sizes) -> list:
    """[(row name, precision, block size or None)]: one row per precision, per block size for int8 / int4 when
    several are given."""
    rows = []
    for precision in dict.fromkeys(precisions):
        if precision in ('int8', 'int4') and block_sizes and len(block_sizes) > 1:
            rows += [(f'{precision}-b{b}', precision, b) for b in dict.fromkeys(block_sizes)]
        else:
            rows.append((precision, precision, block_sizes[0] if block_sizes and precision in ('int8', 'int4')
                         else None))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--shape', choices=sorted(shapes.SHAPES))
    p.add_argument('--json', type=Path)
    p.add_argument('--precisions', nargs='+', default=['fp32', 'int8', 'int4', 'fp16'], choices=PRECISIONS)
    p.add_argument('--export-parity-samples', type=int, default=0,
                   help="observations for the exporter's own parity check (default 0: step 3 measures agreement)")
    p.add_argument('--quant-accuracy-level', type=int, choices=(0, 1, 2, 3, 4),
                   help="int8/int4: blockvla-export's --quant-accuracy-level (default: the exporter's)")
    p.add_argument('--quant-block-sizes', type=int, nargs='+', metavar='N',
                   help="int8/int4: blockvla-export's --quant-block-size; several: one row per size (default: the "
                        "exporter's)")
    p.add_argument('--observations', type=int, default=4, help='observations for the token agreement')
    p.add_argument('--runs', type=int, default=5, help='timed chunks per thread count (median)')
    p.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1), help='threads for export')
    p.add_argument('--work', type=Path, help='keep the backbone, checkpoint (and folders) here (default: temp dir)')
    p.add_argument('--keep-folders', action='store_true', help='keep the exported policy folders')
    p.add_argument('--child', help=argparse.SUPPRESS)
    p.add_argument('--child-args', help=argparse.SUPPRESS)
    p.add_argument('--child-out', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = {'prepare': child_prepare, 'run': child_run}[args.child]
        Path(args.child_out).write_text(json.dumps(fn(**json.loads(args.child_args))))
        return 0
    if not args.shape or not args.json:
        p.error('--shape and --json are required')

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix='blockvla_real_size_')
    work = (args.work or Path(tmp.name)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    todo = measurements(args.precisions, args.quant_block_sizes)
    for _label, precision, block in todo:  # a bad size fails here, not after the backbone is written
        check_block(precision, block)
    print(f'shape {args.shape}: preparing the random-weight backbone and checkpoint ...', flush=True)
    prep = run_child('prepare', {'shape': args.shape, 'work': str(work), 'observations': args.observations}, work)
    if 'error' in prep:
        print(prep['error'], file=sys.stderr)
        return 1
    policy = shapes.VLM_POLICY if args.shape in shapes.VLM_SHAPES else shapes.POLICY
    out = {'shape': args.shape, 'backbone': shapes.SHAPES[args.shape], 'policy': policy,
           'quant_accuracy_level': args.quant_accuracy_level, 'quant_block_sizes': args.quant_block_sizes,
           'params_m': prep['params'] / 1e6, 'weight_gb': prep['weight_bytes_fp32'] / 1e9,
           'prepare_s': prep['prepare_s'], 'prepare_peak_rss_gb': prep['peak_rss_gb'],
           'torch_fp32_ms_per_chunk': prep['torch_ms_per_chunk'], 'exporter': 'dynamo',
           'observations': args.observations, 'runs': args.runs, 'precisions': {}, 'load_start': load_average(),
           'machine': platform.machine(), 'cpu_count': os.cpu_count(),
           'note': 'shared 2-core machine; figures are pessimistic and noisy'}
    for label, precision, block in todo:
        out['precisions'][label] = measure_precision(precision, prep['checkpoint'], work, prep, args, block, label)
        _write(args.json, out)
    first = out['precisions'][todo[0][0]]
    for key in ('export_s', 'export_cpu_s', 'export_peak_rss_gb', 'folder_over_weights', 'runner_rss_over_weights',
                'load_s'):
        out[key] = first.get(key)
    out['seconds'], out['load_end'] = time.perf_counter() - started, load_average()
    _write(args.json, out)
    print_table(out)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def print_table(out: dict) -> None:
    print(f'\n{out["shape"]}: {out["params_m"]:.0f} M params, {out["weight_gb"]:.2f} GB fp32 weights')
    print(f'{"precision":<10} {"export s":>9} {"peak GB":>8} {"folder x":>9} {"load s":>7} {"RSS x":>6} '
          f'{"ms 1t":>8} {"cpu ms 1t":>9} {"ms 2t":>8} {"tokens =":>9}')
    for name, r in out['precisions'].items():
        if 'export_error' in r or 'run_error' in r:
            print(f'{name:<10} {r["export_s"]:9.0f} {r["export_peak_rss_gb"]:8.2f}  failed: '
                  f'{(r.get("export_error") or r.get("run_error")).strip().splitlines()[-1][:100]}')
            continue
        print(f'{name:<10} {r["export_s"]:9.0f} {r["export_peak_rss_gb"]:8.2f} {r["folder_over_weights"]:9.2f} '
              f'{r["load_s"]:7.1f} {r["runner_rss_over_weights"]:6.2f} {r["ms_per_chunk_1t"]:8.0f} '
              f'{r.get("cpu_ms_per_chunk_1t", float("nan")):9.0f} {r["ms_per_chunk_2t"]:8.0f} '
              f'{r["token_agreement"]:9.3f}')


if __name__ == '__main__':
    sys.exit(main())
