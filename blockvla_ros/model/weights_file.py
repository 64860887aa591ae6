"""read_into: a safetensors file read straight into a model's tensors, one tensor at a time.

    read_into('ckpt/model.safetensors', policy.state_dict())   # every name must match, shapes must agree

safetensors' own `safe_open(...).get_tensor` maps the file and returns a copy per tensor: while a 2 GB checkpoint
is copied in, the mapped file pages count in the process's RSS next to the model itself (a 0.5B export peaked at
2x the weights in loading alone). Here each tensor's bytes are read with `readinto` into the destination's own
memory (a temporary only when the stored dtype differs from the model's), so the peak stays near the model.

File layout (safetensors): u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to byte 8 + N.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..runtime.tables import read_header

DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
          'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
          'BOOL': torch.bool}


@torch.no_grad()
def read_into(path, state: dict) -> None:
    """Copy every tensor of safetensors file `path` into `state` (name -> tensor sharing the model's memory)."""
    path = Path(path)
    with open(path, 'rb') as f:
        header, start = read_header(f, path, os.fstat(f.fileno()).st_size)
        missing, unexpected = sorted(set(state) - set(header)), sorted(set(header) - set(state))
        if missing or unexpected:
            raise ValueError(f'{path}: weights do not match the config (missing {missing[:5]}, unexpected '
                             f'{unexpected[:5]})')
        for key in sorted(header, key=lambda k: header[k]['data_offsets'][0]):  # in file order
            info, dst = header[key], state[key]
            if list(info['shape']) != list(dst.shape):
                raise ValueError(f'{path}: {key} is {info["shape"]}, the config makes {list(dst.shape)}')
            if info['dtype'] not in DTYPES:
                raise ValueError(f'{path}: {key} has dtype {info["dtype"]}, not one of {sorted(DTYPES)}')
            begin, end = info['data_offsets']
            dtype = DTYPES[info['dtype']]
            expected = dst.numel() * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected:
                raise ValueError(f'{path}: {key} holds {end - begin} bytes, {info["dtype"]} {info["shape"]} needs '
                                 f'{expected}')
            f.seek(start + begin)
            if dtype == dst.dtype and dst.is_contiguous() and dst.numel():
                target = dst.view(-1).view(torch.uint8).numpy()  # the model's own bytes
                got = f.readinto(memoryview(target))
            else:  # a stored dtype other than the model's (e.g. a bf16 checkpoint into fp32): through a temporary
                buf = bytearray(end - begin)
                got = f.readinto(buf)
                if dst.numel():
                    dst.copy_(torch.frombuffer(buf, dtype=dtype).reshape(dst.shape))
            if got != end - begin:
                raise ValueError(f'{path}: the file ends inside {key} (truncated?)')
