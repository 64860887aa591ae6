"""The `accelerate` Accelerator for a run: one process, DDP (GPUs, or CPU processes over gloo) or FSDP2.

FSDP on CPU: accelerate 1.15 only turns `distributed_type: FSDP` on for GPU-like devices; on CPU it silently falls
back to DDP (MULTI_CPU), although torch's FSDP2 (`fully_shard`) runs on CPU tensors over gloo. So when
`accelerate launch` asked for FSDP (ACCELERATE_USE_FSDP=true: an FSDP config file with `use_cpu: true` or `--cpu`)
and the state came out MULTI_CPU, make_accelerator switches the state to FSDP with the plugin accelerate built from
the same launch settings; accelerate's own FSDP2 code then shards the model (`fsdp2_prepare_model`), gathers
state dicts and clips gradients as on GPUs. Only FSDP2 (`fsdp_version: 2`) does this; FSDP1 on CPU is refused.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def make_accelerator(opts, find_unused: bool):
    """train.precision / train.device -> Accelerator (CPU FSDP2 enabled when the launch asked for FSDP)."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    cpu = opts.device == 'cpu' or not torch.cuda.is_available()
    precision = {'fp32': 'no', 'bf16': 'bf16', 'fp16': 'fp16'}.get(opts.precision)
    if precision is None:  # auto
        precision = 'bf16' if not cpu and torch.cuda.is_bf16_supported() else 'no'
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
    if _fsdp_requested() and accelerator.distributed_type.name == 'MULTI_CPU':
        _fsdp_on_cpu(accelerator)
    return accelerator


def _fsdp_requested() -> bool:
    return os.environ.get('ACCELERATE_USE_FSDP', 'false').lower() == 'true'


def _fsdp_on_cpu(accelerator) -> None:
    """Turn the MULTI_CPU state accelerate chose into FSDP2 over gloo (see the module docstring)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    if plugin.fsdp_version != 2:
        raise ValueError('FSDP on CPU needs fsdp_version: 2 (torch fully_shard over gloo) in the accelerate config; '
                         f'got fsdp_version {plugin.fsdp_version}')
    if accelerator.mixed_precision != 'no':
        plugin.set_mixed_precision(accelerator.mixed_precision)  # FSDP2 MixedPrecisionPolicy (params in bf16)
    # both singletons: AcceleratorState re-reads PartialState's distributed_type whenever it is constructed again
    PartialState._shared_state['distributed_type'] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    log.info('FSDP2 on CPU over gloo: %d processes', accelerator.num_processes)


def fsdp_wrap_error(error: ValueError, model) -> ValueError:
    """accelerate's 'Could not find the transformer layer class X' (the FSDP config names another backbone's decoder
    layer, e.g. the shipped Qwen2DecoderLayer for a Llama-based SmolVLM) with the classes this model has; other
    errors as they are."""
    if 'Could not find the transformer layer class' not in str(error):
        return error
    layers = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith('DecoderLayer')})
    return ValueError(f'{error} Set fsdp_transformer_layer_cls_to_wrap in the accelerate config (or accelerate launch '
                      f'--fsdp_transformer_layer_cls_to_wrap NAME) to this backbone\'s decoder layer class: '
                      f'{", ".join(layers) or "none found"}')
