"""blockvla-export: a training checkpoint -> a policy folder (ONNX graphs, stats, manifest) [+ TensorRT engines].

    blockvla-export --checkpoint runs/ckpt --out models/pick_v1 [--trt [--fp16]]

The folder is replaced only when every check passes (static shapes, TensorRT op list, parity with torch).
--trt builds and caches the TensorRT engines on this machine's GPU and checks their parity too; without a GPU
it fails at once.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..model.action_tokenizer import MissingStatsError
from ..runtime.engine_factory import GPUUnavailableError, require_cuda_device
from ..io.atomic import check_output_dir
from ..runtime.policy_folder import PolicyFolderError
from .onnx_checks import GraphCheckError
from .onnx_export import EXPORTERS
from .parity import ExportParityError
from .policy_writer import CheckpointError, export_policy

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='blockvla-export', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, type=Path,
                   help='training checkpoint folder: config.json + model.safetensors + stats.json')
    p.add_argument('--out', required=True, type=Path, help='policy folder to write, e.g. models/NAME')
    p.add_argument('--name', help='policy name in policy.yaml (default: the folder name)')
    p.add_argument('--trt', action='store_true', help='also build and cache TensorRT engines (NVIDIA GPU only)')
    p.add_argument('--fp16', action='store_true', help='with --trt: FP16 engines (parity reported, not enforced)')
    p.add_argument('--engine-cache', type=Path, help='TensorRT engine cache directory '
                   '(default $BLOCKVLA_TRT_CACHE or ~/.cache/blockvla_ros/tensorrt)')
    p.add_argument('--exporter', choices=EXPORTERS, default='legacy',
                   help='torch.onnx exporter: legacy (TorchScript, opset 18, fast) or dynamo (opset 20)')
    p.add_argument('--opset', type=int, help='ONNX opset (18-20; TensorRT 10.0 parses up to 20)')
    p.add_argument('--no-split-prefill', action='store_true',
                   help='do not export text_prefill/obs_prefill (no instruction K/V reuse)')
    p.add_argument('--no-torch-weights', action='store_true',
                   help="do not copy model.safetensors (the folder then cannot run engine 'torch')")
    p.add_argument('--parity-samples', type=int, default=4, help='random observations for the parity check')
    p.add_argument('--tolerance', type=float, default=1e-3, help='max |logits diff| allowed vs torch (fp32)')
    p.add_argument('--threads', type=int, help='CPU threads for the parity run')
    p.add_argument('-q', '--quiet', action='store_true', help='warnings and errors only')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        check_output_dir(args.out)  # before any work
        if args.trt:
            require_cuda_device('blockvla-export --trt')  # before any work
        if args.opset is not None and not 18 <= args.opset <= 20:
            raise ValueError(f'--opset must be 18, 19 or 20 (got {args.opset})')
        report = export_policy(args.checkpoint, args.out, name=args.name, exporter=args.exporter, opset=args.opset,
                               split_prefill=not args.no_split_prefill, torch_weights=not args.no_torch_weights,
                               parity_samples=args.parity_samples, tolerance=args.tolerance, threads=args.threads,
                               progress=not args.quiet)
        trt_report = None
        if args.trt:
            from .tensorrt_export import build_and_check

            trt_report = build_and_check(args.checkpoint, args.out, fp16=args.fp16, cache_dir=args.engine_cache,
                                         samples=args.parity_samples, tolerance=args.tolerance)
    except (GPUUnavailableError, CheckpointError, MissingStatsError, GraphCheckError, ExportParityError,
            PolicyFolderError, ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        print(f'blockvla-export: error: {e}', file=sys.stderr)
        return 2 if isinstance(e, GPUUnavailableError) else 1
    print(f'policy folder: {report.folder}  ({report.seconds:.1f} s)')
    print(f'{"graph":<14} {"file":<20} opset  ops')
    for key, file in report.graphs.items():
        c = report.checks[key]
        print(f'{key:<14} {file:<20} {c["opset"]:<6} {len(c["ops"])} ops, all in TensorRT\'s ONNX support list')
    for r in report.parity + ([trt_report] if trt_report else []):
        print(f'parity {r["engine"]:<28} max|diff| {r["max_abs_diff"]:.2e}  tokens equal: {r["tokens_equal"]}  '
              f'({r["samples"]} observations, {r["graph_calls"]} graph calls)')
    print('files: ' + ', '.join(report.files))
    return 0


if __name__ == '__main__':
    sys.exit(main())
