"""Export precisions: what each one stores and how its parity with the fp32 torch policy is judged.

    precision  for              graphs                                         tables   parity (vs fp32 torch)
    fp32       everything       the torch weights as they are                  fp32     lock-step logits <= tolerance
                                                                                        (1e-3); token agreement
    fp16       GPUs (TensorRT   traced from the half-precision policy: weights, fp16     token agreement (reported)
               FP16, ORT CUDA)  embeds and the KV cache in fp16 (attention
                                softmax in fp32)
    int8/int4  CPUs (ONNX       fp32 graphs whose backbone MatMul weights are   text     token agreement (reported)
               Runtime)         quantized weight-only to com.microsoft          table at
                                MatMulNBits (symmetric, blocks of 32 along K);  int8 /
                                ONNX Runtime only, not TensorRT                 int4 (*)

(*) the text embedding table is stored quantized (the layout: runtime.tables) and dequantized per looked-up row;
action_embed and state_proj stay fp32 (small).

Token agreement is the fraction of equal action tokens when each engine decodes on its own (`export.parity`).
A random-weight model has near-uniform bin probabilities, so its agreement understates a trained policy's;
callers that need a floor pass `min_agreement`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

PRECISIONS = ('fp32', 'fp16', 'int8', 'int4')
BITS = {'int8': 8, 'int4': 4}
BLOCK = 32  # quantization block along the reduction axis


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    return precision


def default_tolerance(precision: str, tolerance: Optional[float]) -> Optional[float]:
    """The lock-step logits bound: the given one for fp32, none for the reduced precisions (judged by tokens)."""
    return tolerance if precision == 'fp32' else None


def quantize_weights(path: Path, precision: str, inline_limit: int) -> list:
    """Rewrite graph `path` with weight-only int8/int4 MatMulNBits (ONNX Runtime). -> its external-data files."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    path = Path(path)
    data = path.with_name(path.name + '.data')
    model = onnx.load(str(path))  # with its weights
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, bits=BITS[precision])
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    del model
    quantized = quantizer.model.model
    data.unlink(missing_ok=True)
    size = sum(len(t.raw_data) for t in quantized.graph.initializer)
    if size < inline_limit:
        onnx.save_model(quantized, str(path))
        return []
    onnx.save_model(quantized, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [data.name]
