"""Export precisions: what each one stores and how its parity with the fp32 torch policy is judged.

    precision  for              graphs                                         tables   parity (vs fp32 torch)
    fp32       everything       the torch weights as they are                  fp32     lock-step logits <= tolerance
                                                                                        (1e-3); token agreement
    fp16       GPUs (TensorRT   traced from the half-precision policy: weights, fp16     token agreement (reported)
               FP16, ORT CUDA)  embeds and the KV cache in fp16 (attention
                                softmax in fp32)
    int8/int4  CPUs (ONNX       fp32 graphs whose backbone MatMul weights are   text     token agreement (reported)
               Runtime)         quantized weight-only to com.microsoft          table at
                                MatMulNBits (symmetric, blocks of B along K;    int8 /
                                export.quantize, one weight at a time);         int4 (*)
                                ONNX Runtime only, not TensorRT

(*) the text embedding table is stored quantized in groups of the same B along each row (the layout: runtime.tables;
B recorded in the file) and dequantized per looked-up row; action_embed and state_proj stay fp32 (small).

B, the quantization block size (`--quant-block-size`, a power of two >= 16): each block of B weights shares one scale
(fp32 in MatMulNBits, fp16 in the table), so the stored bytes per weight are bits / 8 + 4 / B (backbone) and
bits / 8 + 2 / B (table): at int4, 1.25x / 1.125x the 4-bit bytes at B = 32, 1.125x / 1.06x at 64, 1.06x / 1.03x at
128. Larger blocks also round more coarsely (one scale spans more weights). The table's group follows B rather than
having a size of its own: both are the same size / accuracy trade-off, and one number is one thing to choose.
The default depends on the backbone's width (default_block_size): DEFAULT_BLOCK_SIZE (128) from hidden 512 up, where
it was measured, and a quarter of the width below (32 at least), so a narrow backbone's rows keep four scales or more
(the demo's hidden 128 would otherwise get one scale per row, and measurably worse agreement).

Token agreement is the fraction of equal action tokens when each engine decodes on its own (`export.parity`).
A random-weight model has near-uniform bin probabilities, so its agreement understates a trained policy's;
callers that need a floor pass `min_agreement`. MatMulNBits' accuracy_level (the precision ONNX Runtime computes
in: export.quantize) is DEFAULT_ACCURACY_LEVEL unless the exporter is given one.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

PRECISIONS = ('fp32', 'fp16', 'int8', 'int4')
BITS = {'int8': 8, 'int4': 4}
# Quantization block along the reduction axis (and the text table's group), chosen on the 0.5B shape
# (benchmarks/real_size.py --quant-block-sizes 32 64 128; docs/benchmarks/real_size.md): int4 folder 1.23x /
# 1.12x / 1.07x the 4-bit weights, runner RSS 1.66x / 1.39x / 1.25x, 1.34 / 1.16 / 0.97 CPU-s per chunk, token
# agreement with the fp32 torch policy 0.26 / 0.35 / 0.32 over 192 tokens (random weights: differences of this size
# are noise). 128 is the smallest block that meets both the folder (1.15x) and the runner (1.3x) targets, and
# ONNX Runtime's own quantizer's default; int8 takes it too (1.03x, 0.99x, 1.09 CPU-s vs 1.11x, 1.19x, 1.46 at 32).
# Larger blocks round more coarsely (one 896 x 4864 matmul, Gaussian weights: max error 7e-2 at 32, 1.0e-1 at 128,
# benchmarks/matmul_nbits.py); --quant-block-size 32 keeps the finest rounding. On the one trained policy tried (the
# demo, hidden 128: a block of 128 is one scale per row) it costs agreement: int4 0.789 at 32 vs 0.705 at 128, int8
# 0.958 vs 0.936 (docs/benchmarks/real_size.md); so narrower backbones default to smaller blocks (default_block_size).
DEFAULT_BLOCK_SIZE = 128
# A default block spans at most this share of a row (hidden / 4), and is never below MIN_DEFAULT_BLOCK_SIZE (ONNX
# Runtime's quantizer tools stop at 16, but below 32 the scales alone add >= 1 / 8 of the 4-bit bytes per block).
MIN_SCALES_PER_ROW = 4
MIN_DEFAULT_BLOCK_SIZE = 32
# MatMulNBits' accuracy_level (export.quantize): 4 = int8 compute. On this x86 CPU (AVX-512 VNNI) a 0.5B block step
# takes 45 ms at int8 and 35 ms at int4 against 99 ms in fp32, where the unset level (fp32 compute on dequantized
# weights) takes 980 ms at int8 and 113 ms at int4 (docs/benchmarks/real_size.md, benchmarks/session_memory.py and
# matmul_nbits.py).
DEFAULT_ACCURACY_LEVEL = 4


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    return precision


def check_quant_accuracy_level(precision: str, level: Optional[int]) -> Optional[int]:
    """MatMulNBits' accuracy_level for an int8/int4 export (None: the default); refused for fp32/fp16."""
    from .quantize import check_accuracy_level

    return _quant_option(precision, level, 'a quantization accuracy level', DEFAULT_ACCURACY_LEVEL,
                         check_accuracy_level)


def default_block_size(width: int) -> int:
    """The default quantization block for a backbone of hidden size `width`: the largest power of two <= width / 4
    (MIN_SCALES_PER_ROW), within [MIN_DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE]: 32 at 64-255, 64 at 256-511, 128 from
    512 (Qwen2.5-0.5B's 896, SmolLM2-360M's 960)."""
    if width < 1:
        raise ValueError(f'a backbone width must be >= 1, got {width}')
    block = 1 << max(0, (width // MIN_SCALES_PER_ROW).bit_length() - 1)
    return min(DEFAULT_BLOCK_SIZE, max(MIN_DEFAULT_BLOCK_SIZE, block))


def check_quant_block_size(precision: str, block_size: Optional[int], width: Optional[int] = None) -> Optional[int]:
    """The quantization block size for an int8/int4 export: the given one, checked, or (None) the default for a
    backbone of hidden size `width` (default_block_size; DEFAULT_BLOCK_SIZE when the width is not known yet);
    refused for fp32/fp16."""
    from .quantize import check_block_size

    default = DEFAULT_BLOCK_SIZE if width is None else default_block_size(width)
    return _quant_option(precision, block_size, 'a quantization block size', default,
                         lambda b: check_block_size(b, 'the quantization block size (--quant-block-size)'))


def _quant_option(precision: str, value: Optional[int], what: str, default: int, check) -> Optional[int]:
    """An int8/int4-only export option: None -> `default` for int8/int4 (None otherwise); a value given for fp32/fp16
    is refused naming `what`; else check(value)."""
    if value is None:
        return default if precision in BITS else None
    if precision not in BITS:
        raise ValueError(f'{what} ({value!r}) applies to int8/int4 exports only, not {precision}')
    return check(value)


def default_tolerance(precision: str, tolerance: Optional[float]) -> Optional[float]:
    """The lock-step logits bound: the given one for fp32, none for the reduced precisions (judged by tokens)."""
    return tolerance if precision == 'fp32' else None


def quantize_weights(path: Path, precision: str, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                     block_size: int = DEFAULT_BLOCK_SIZE) -> list:
    """Rewrite graph `path` with weight-only int8/int4 MatMulNBits (ONNX Runtime) in blocks of `block_size`, one
    weight at a time (export.quantize). -> its external-data files: always one, whatever the export's inline limit,
    because ONNX Runtime keeps an inline quantized graph's weights about twice in memory (the parsed file and the
    pre-packed copy: 1.84x the int4 weights at 0.5B, 1.15x from external data; docs/benchmarks/real_size.md)."""
    from .quantize import quantize_graph

    return quantize_graph(path, BITS[precision], block_size, accuracy_level)
