"""model.weights_file.read_into: a safetensors file read into a model's own tensors (what BlockVLAPolicy.load uses)."""
import pytest
import torch
from safetensors.torch import save_file

from blockvla_ros.model.weights_file import read_into


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))


def test_reads_every_tensor_into_the_models_memory(tmp_path):
    src, dst = _model(), _model()
    for p in dst.parameters():
        p.data.zero_()
    save_file(src.state_dict(), str(tmp_path / 'w.safetensors'))
    pointers = [p.data_ptr() for p in dst.parameters()]
    read_into(tmp_path / 'w.safetensors', dst.state_dict())
    assert [p.data_ptr() for p in dst.parameters()] == pointers  # written in place, not replaced
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_stored_dtype_other_than_the_models_is_converted(tmp_path):
    src, dst = _model(), _model()
    save_file({k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}, str(tmp_path / 'w.safetensors'))
    read_into(tmp_path / 'w.safetensors', dst.state_dict())
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.to(torch.bfloat16).float(), b)


def test_mismatches_and_truncation_are_refused_by_name(tmp_path):
    src = _model()
    path = tmp_path / 'w.safetensors'
    save_file(src.state_dict(), str(path))
    state = _model().state_dict()
    with pytest.raises(ValueError, match=r"missing \['extra'\]"):
        read_into(path, {**state, 'extra': torch.zeros(1)})
    wrong = dict(state)
    wrong['0.weight'] = torch.zeros(16, 9)
    with pytest.raises(ValueError, match=r'0.weight is \[16, 8\], the config makes \[16, 9\]'):
        read_into(path, wrong)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match='the file ends inside'):
        read_into(path, _model().state_dict())
    path.write_bytes(b'\x05')
    with pytest.raises(ValueError, match='not a safetensors file'):
        read_into(path, _model().state_dict())
