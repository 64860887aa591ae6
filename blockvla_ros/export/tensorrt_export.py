"""`blockvla-export --trt`: build (and cache) the TensorRT engines of an exported policy folder on this GPU,
then check them against torch like the ONNX Runtime parity check (enforced for fp32, reported for fp16)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def build_and_check(checkpoint: str | Path, folder: str | Path, fp16: bool = False, cache_dir: Optional[str] = None,
                    samples: int = 4, tolerance: float = 1e-3) -> dict:
    from ..runtime.policy_folder import load_policy_folder
    from ..runtime.runner import policy_preprocessor
    from ..runtime.torch_engine import TorchEngine
    from ..runtime.trt_engine import TrtEngine
    from .parity import compare_engines, random_observations, require_parity
    from .policy_writer import load_checkpoint

    spec = load_policy_folder(folder)
    engine = TrtEngine(spec, fp16=fp16, cache_dir=None if cache_dir is None else str(cache_dir))
    engine.open_all()  # builds every engine now (visible progress), or loads it from the cache
    policy, _ = load_checkpoint(checkpoint)
    pre = policy_preprocessor(spec)
    observations = random_observations(spec.config, spec.stats, samples, seed=1, tokenizer=pre.text)
    name = f'tensorrt ({"fp16" if fp16 else "fp32"})'
    report = compare_engines(spec.config, TorchEngine(policy), engine, observations, pre, name)
    if fp16:
        log.warning('%s vs torch: max |logits diff| %.3g, tokens equal: %s (fp16: reported, not enforced)', name,
                    report.max_abs_diff, report.tokens_equal)
    else:
        require_parity(report, tolerance)
    return report.to_dict()
