"""blockvla-export: a training checkpoint -> a policy folder (ONNX graphs, stats, manifest) [+ TensorRT engines].

    blockvla-export --checkpoint runs/ckpt --out models/pick_v1 [--trt [--fp16]] [--no-calibrate]

The folder (format 2: vision.onnx, one backbone.onnx serving every pass, tables.safetensors; each weight once) is
replaced only when every check passes (dims dynamic only in the token count, TensorRT op list, parity with torch).
--trt builds and caches the TensorRT engines on this machine's GPU and checks their parity too; without a GPU
it fails at once. The default decoding is calibrated (export.calibration): decoded on held-out windows of the run
(the validation split its train_config.yaml names, or --calibration-bags), the setting with the fewest passes whose
tokens agree with the full schedule's at --calibration-level becomes policy.yaml's default; --no-calibrate keeps
the training config's decoding.
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
from .calibration import DEFAULT_LEVEL, DEFAULT_WINDOWS, CalibrationOptions
from .onnx_checks import GraphCheckError
from .onnx_export import INLINE_LIMIT
from .precision import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, MIN_DEFAULT_BLOCK_SIZE, PRECISIONS
from .quantize import ACCURACY_LEVELS
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
    p.add_argument('--precision', choices=PRECISIONS, default='fp32',
                   help='fp32 (default); fp16 for GPUs; int8 / int4 weight-only for CPUs (ONNX Runtime only)')
    p.add_argument('--quant-accuracy-level', type=int, choices=ACCURACY_LEVELS, metavar='{0,1,2,3,4}',
                   help='int8/int4: the precision ONNX Runtime may compute MatMulNBits in: 0 unset (fp32 on '
                        'dequantized weights), 1 fp32, 2 fp16, 3 bf16, 4 int8 (default '
                        f'{DEFAULT_ACCURACY_LEVEL}; see export.quantize)')
    p.add_argument('--quant-block-size', type=int, metavar='N',
                   help='int8/int4: weights per scale in the backbone\'s MatMulNBits blocks and the text table\'s '
                        'groups, a power of two >= 16 (default: a quarter of the backbone\'s hidden size within '
                        f'{MIN_DEFAULT_BLOCK_SIZE}-{DEFAULT_BLOCK_SIZE}, so {DEFAULT_BLOCK_SIZE} from hidden 512 up; '
                        'larger: a smaller folder, coarser rounding; the demo\'s small backbone (hidden 128) agrees '
                        'better at 32 than at 128: docs/benchmarks/real_size.md; see export.precision)')
    p.add_argument('--opset', type=int, default=20, help='ONNX opset (18-20; TensorRT 10.0 parses up to 20)')
    p.add_argument('--inline-limit-mb', type=float, default=INLINE_LIMIT / 2**20,
                   help='a graph with more weight bytes keeps them in one <file>.data (default '
                        f'{INLINE_LIMIT / 2**20:g} MiB; an int8 / int4 backbone always does; ONNX Runtime maps '
                        'external data and drops it once used, inline weights stay parsed in the heap)')
    weights = p.add_mutually_exclusive_group()
    weights.add_argument('--torch-weights', action='store_true',
                         help="also copy model.safetensors so engine 'torch' can run the folder (a second copy of "
                              'every weight)')
    weights.add_argument('--no-torch-weights', action='store_true', help='the default: ONNX graphs + tables only')
    p.add_argument('--parity-samples', type=int, default=4,
                   help='random observations for the parity check (0: not checked, said in the output)')
    p.add_argument('--tolerance', type=float, default=1e-3, help='max |logits diff| allowed vs torch (fp32)')
    p.add_argument('--min-agreement', type=float, default=0.0,
                   help='minimum token agreement with the fp32 torch policy (default: reported only)')
    p.add_argument('--threads', type=int, help='CPU threads for the parity run and the calibration')
    p.add_argument('--no-calibrate', action='store_true',
                   help="keep the training config's decoding (default: calibrate it on held-out windows)")
    p.add_argument('--calibration-level', type=float, default=DEFAULT_LEVEL,
                   help=f'minimum token agreement with the full schedule (default {DEFAULT_LEVEL})')
    p.add_argument('--calibration-windows', type=int, default=DEFAULT_WINDOWS,
                   help=f'held-out windows decoded per setting (default {DEFAULT_WINDOWS})')
    p.add_argument('--calibration-bags', type=Path, nargs='+', default=(),
                   help="held-out recordings to calibrate on instead of the run's validation split")
    p.add_argument('-q', '--quiet', action='store_true', help='warnings and errors only')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        check_output_dir(args.out)  # before any work
        if args.fp16 and not args.trt:
            raise ValueError('--fp16 makes FP16 TensorRT engines and needs --trt; an fp16 policy folder is '
                             '--precision fp16')
        if args.trt:
            require_cuda_device('blockvla-export --trt')  # before any work
        if args.opset is not None and not 18 <= args.opset <= 20:
            raise ValueError(f'--opset must be 18, 19 or 20 (got {args.opset})')
        calibration = None if args.no_calibrate else CalibrationOptions(
            level=args.calibration_level, windows=args.calibration_windows, bags=tuple(args.calibration_bags))
        report = export_policy(args.checkpoint, args.out, name=args.name, precision=args.precision, opset=args.opset,
                               torch_weights=args.torch_weights, inline_limit=int(args.inline_limit_mb * 2**20),
                               parity_samples=args.parity_samples, tolerance=args.tolerance,
                               min_agreement=args.min_agreement, threads=args.threads, progress=not args.quiet,
                               calibration=calibration, quant_accuracy_level=args.quant_accuracy_level,
                               quant_block_size=args.quant_block_size)
        trt_report = None
        if args.trt:
            from .tensorrt_export import build_and_check

            trt_report = build_and_check(args.checkpoint, args.out, fp16=args.fp16, cache_dir=args.engine_cache,
                                         samples=args.parity_samples, tolerance=args.tolerance)
    except (GPUUnavailableError, CheckpointError, MissingStatsError, GraphCheckError, ExportParityError,
            PolicyFolderError, ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        print(f'blockvla-export: error: {e}', file=sys.stderr)
        return 2 if isinstance(e, GPUUnavailableError) else 1
    except OSError as e:  # a full disk or a folder without write permission, while writing the folder
        print(f'blockvla-export: error: cannot write the policy folder {args.out} ({e}: disk full or no permission?); '
              'the folder was not replaced', file=sys.stderr)
        return 1
    print(f'policy folder: {report.folder}  ({report.seconds:.1f} s)')
    print(f'{"graph":<10} {"file":<16} opset  ops')
    for key, file in report.graphs.items():
        c = report.checks[key]
        dyn = f', dynamic in {c["dynamic"]}' if c['dynamic'] else ''
        trt = ', all in TensorRT\'s ONNX support list' if c.get('tensorrt', True) else ' (ONNX Runtime only)'
        print(f'{key:<10} {file:<16} {c["opset"]:<6} {len(c["ops"])} ops{trt}{dyn}')
    if not report.parity:
        print('parity vs torch: not checked (--parity-samples 0)')
    for r in report.parity + ([trt_report] if trt_report else []):
        print(f'parity {r["engine"]:<32} max|diff| {r["max_abs_diff"]:.2e}  token agreement '
              f'{r["token_agreement"]:.3f}  ({r["samples"]} observations, {r["graph_calls"]} calls)')
    cal = report.calibration
    if cal is not None:
        row = cal.chosen_row
        print(f'default decoding (calibrated on {cal.source}): {cal.chosen.label}, {row.nfe:.2f} NFE per chunk '
              f'(full schedule {cal.reference.nfe:.2f}), token agreement {row.agreement:.3f} >= {cal.level:g}')
    total = sum(v for k, v in report.sizes.items() if k != 'weights')
    print(f'files ({total / 2**20:.1f} MiB, {total / report.sizes["weights"]:.2f}x the fp32 weights): '
          + ', '.join(report.files))
    return 0


if __name__ == '__main__':
    sys.exit(main())
