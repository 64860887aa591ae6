"""The runtime's safetensors reader (numpy, memory-mapped) and the table lookups."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from blockvla_ros.runtime.tables import Tables, TablesError, read_safetensors


def test_reader_matches_safetensors_and_memory_maps(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {'text_embed': torch.randn(50, 8, generator=g), 'action_embed': torch.randn(9, 8, generator=g),
            'state_proj.weight': torch.randn(8, 3, generator=g), 'state_proj.bias': torch.randn(8, generator=g),
            'half': torch.randn(4, 2, generator=g).half(), 'bf': torch.randn(3, generator=g).bfloat16(),
            'ids': torch.arange(5)}
    save_file(data, str(tmp_path / 't.safetensors'))
    got = read_safetensors(tmp_path / 't.safetensors')
    assert isinstance(got['text_embed'], np.memmap) and not got['text_embed'].flags.writeable
    for k, v in data.items():
        assert np.array_equal(got[k], v.float().numpy() if k == 'bf' else v.numpy()), k
    t = Tables(got)
    ids = np.array([[3, 0, 49]])
    assert np.array_equal(t.text(ids)[0], data['text_embed'].numpy()[[3, 0, 49]])
    assert t.actions([8, 1]).shape == (1, 2, 8)
    state = np.array([[0.5, -1.0, 2.0]], np.float32)
    ref = torch.nn.functional.linear(torch.from_numpy(state), data['state_proj.weight'], data['state_proj.bias'])
    assert np.allclose(t.state(state)[0, 0], ref.numpy()[0], atol=1e-6)
    with pytest.raises(ValueError, match='out of range'):
        t.actions([9])
    t.check(n_bins=8, state_dim=3, hidden=8, where='t')
    with pytest.raises(TablesError, match='action_embed'):
        t.check(n_bins=16, state_dim=3, hidden=8, where='t')


@pytest.mark.parametrize('payload', [b'', b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":', b'\xff' * 8 + b'{}',
                                     b'\x18\x00\x00\x00\x00\x00\x00\x00' + b'{"a": {"dtype": "F32"}}  '])
def test_broken_files_are_clear_errors(tmp_path, payload):
    path = tmp_path / 'bad.safetensors'
    path.write_bytes(payload)
    with pytest.raises(TablesError, match='bad.safetensors'):
        read_safetensors(path)


def test_offsets_outside_the_file_are_refused(tmp_path):
    header = b'{"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}'
    path = tmp_path / 'short.safetensors'
    path.write_bytes(len(header).to_bytes(8, 'little') + header + b'\0' * 16)
    with pytest.raises(TablesError, match='does not fit'):
        read_safetensors(path)
