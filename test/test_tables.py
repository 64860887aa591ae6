"""The runtime's safetensors reader (numpy; the text table read row by row from disk) and the table lookups."""
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from blockvla_ros.runtime.tables import FileRows, Tables, TablesError, quantize_text, read_safetensors

from quantized_table import dequantize_reference


def test_reader_matches_safetensors_and_keeps_the_text_table_on_disk(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {'text_embed': torch.randn(50, 8, generator=g), 'action_embed': torch.randn(9, 8, generator=g),
            'state_proj.weight': torch.randn(8, 3, generator=g), 'state_proj.bias': torch.randn(8, generator=g),
            'half': torch.randn(4, 2, generator=g).half(), 'bf': torch.randn(3, generator=g).bfloat16(),
            'ids': torch.arange(5)}
    save_file(data, str(tmp_path / 't.safetensors'))
    got = read_safetensors(tmp_path / 't.safetensors')
    assert isinstance(got['text_embed'], FileRows) and not got['action_embed'].flags.writeable
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


@pytest.mark.parametrize('bits,hidden,group', [(8, 64, 32), (8, 45, 32), (4, 64, 32), (4, 45, 32), (4, 200, 64),
                                               (8, 200, 128), (4, 45, 64)])
def test_quantized_text_rows_equal_a_numpy_reference_and_stay_on_disk(tmp_path, bits, hidden, group):
    """int8 / int4 text tables (runtime.tables' layout): stored dtype and bytes, the group size recorded in the file
    and read back, each looked-up row equal to an element-by-element dequantization, within half a step of the float
    table; a row width that is not a multiple of the group (45, 200: a short last group, and an odd count of
    nibbles) and a group wider than the row (45 in 64) included."""
    rng = np.random.default_rng(bits + hidden)
    text = (rng.normal(size=(300, hidden)) * rng.uniform(0.01, 3.0, size=(300, 1))).astype(np.float32)
    text[7] = 0.0  # an all-zero row: scale 0, values 0
    arrays, metadata = quantize_text(text, bits, group, rows=64)  # several chunks, the last one short
    assert metadata == {'text_embed.group': str(group)}
    q, scale = arrays[f'text_embed.int{bits}'], arrays['text_embed.scale']
    assert q.dtype == (np.int8 if bits == 8 else np.uint8) and scale.dtype == np.float16
    assert q.shape == (300, hidden if bits == 8 else (hidden + 1) // 2) and scale.shape == (300, -(-hidden // group))
    save_numpy({**arrays, 'action_embed': np.ones((9, hidden), np.float32)}, str(tmp_path / 't.safetensors'),
               metadata=metadata)
    t = Tables.open(tmp_path / 't.safetensors')
    assert t.text_layout == f'int{bits}' and isinstance(t.text_embed, FileRows)  # read from the file, row by row
    assert t.text_group == group
    ids = np.array([0, 7, 123, 299, 123])
    got = t.text(ids)
    assert got.shape == (1, 5, hidden) and got.dtype == np.float32
    assert np.array_equal(got[0], dequantize_reference(q[ids], scale[ids], bits, hidden, group))
    step = np.repeat(scale[ids].astype(np.float32), group, axis=1)[:, :hidden]  # one quantization step per value
    assert np.all(np.abs(got[0] - text[ids]) <= step / 2 * (1 + 1e-5))
    assert not got[0, 1].any()
    assert Tables.open(tmp_path / 't.safetensors', dtype=np.float16).text([3]).dtype == np.float16
    with pytest.raises(ValueError, match='out of range'):
        t.text([300])


def _int8_tables(hidden=64, vocab=20):
    arrays, _ = quantize_text(np.random.default_rng(0).normal(size=(vocab, hidden)).astype(np.float32), 8)
    return {**arrays, 'action_embed': np.ones((9, hidden), np.float32)}


def test_text_group_metadata_old_files_read_as_32_and_bad_values_are_refused_by_name(tmp_path):
    """A table with no recorded group (written before the group was recorded) reads as groups of 32; a recorded
    group must be a power of two >= 16 that fits the scales, and only a quantized table may have one."""
    arrays = _int8_tables(hidden=64)
    save_numpy(arrays, str(tmp_path / 'old.safetensors'))  # no __metadata__ at all
    old = Tables.open(tmp_path / 'old.safetensors')
    assert old.text_group == 32 and np.array_equal(old.text([3]), Tables(arrays, metadata={'x': 'y'}).text([3]))
    assert Tables(arrays, metadata={'text_embed.group': '32'}).text_group == 32
    for bad, match in (('48', 'must be a power of two >= 16'), ('8', 'power of two'), ('0x40', "got '0x40'"),
                       ('', "got ''"), ('-32', "got '-32'"), ('６４', "got '６４'"),
                       ('64', r'text_embed.scale is float16 \[20, 2\], expected float16 \[20, 1\] \(one scale per 64')):
        with pytest.raises(TablesError, match=match) as err:
            Tables(arrays, metadata={'text_embed.group': bad})
        assert 'text_embed' in str(err.value)
    with pytest.raises(TablesError, match='text_embed.group is 32 but text_embed is not quantized'):
        Tables({'text_embed': np.zeros((20, 64), np.float32), 'action_embed': arrays['action_embed']},
               metadata={'text_embed.group': '32'})
    with pytest.raises(ValueError, match='text table group size must be a power of two >= 16'):
        quantize_text(np.zeros((4, 64), np.float32), 4, 24)
    with open(tmp_path / 'bad_meta.safetensors', 'wb') as f:  # __metadata__ values must be strings
        header = b'{"__metadata__": {"text_embed.group": 64}}'
        f.write(len(header).to_bytes(8, 'little') + header)
    with pytest.raises(TablesError, match='__metadata__ must map strings to strings'):
        read_safetensors(tmp_path / 'bad_meta.safetensors')


@pytest.mark.parametrize('change,match', [
    (lambda a: a.update({'text_embed.int8': a['text_embed.int8'].view(np.uint8)}), r'text_embed.int8 is uint8'),
    (lambda a: a.update({'text_embed.scale': a['text_embed.scale'].astype(np.float32)}),
     r'text_embed.scale is float32 \[20, 2\], expected float16'),
    (lambda a: a.update({'text_embed.scale': a['text_embed.scale'][:, :1]}),
     r'text_embed.scale is float16 \[20, 1\], expected float16 \[20, 2\]'),
    (lambda a: a.update({'text_embed.scale': a['text_embed.scale'][:19]}), r'text_embed.scale .*\[19, 2\]'),
    (lambda a: a.pop('text_embed.scale'), 'text_embed.int8 has no text_embed.scale'),
    (lambda a: a.update({'text_embed': np.zeros((20, 64), np.float32)}), 'exactly one text table'),
    (lambda a: a.update({'text_embed.int4': a.pop('text_embed.int8').view(np.uint8)}),
     r'text_embed.int4 is uint8 \[20, 64\], expected uint8 \[20, 32\]'),
    (lambda a: a.update({'action_embed': np.ones((9, 32), np.float32)}), r'text_embed.int8 is int8 \[20, 64\]'),
    (lambda a: a.pop('text_embed.int8'), 'found none'),
])
def test_malformed_quantized_text_tables_are_refused_by_name(change, match):
    arrays = _int8_tables()
    Tables(arrays)  # the well-formed one reads
    change(arrays)
    with pytest.raises(TablesError, match=match):
        Tables(arrays)
