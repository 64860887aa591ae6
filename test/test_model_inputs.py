"""Config, tokenizer and bad-input behaviour of the model layer."""
import json

import numpy as np
import pytest

from blockvla_ros.model.action_tokenizer import ActionTokenizer, MissingStatsError, NormStats
from blockvla_ros.model.config import BlockVLAConfig
from blockvla_ros.model.text_tokenizer import ByteTokenizer

from tiny import LLAMA, tiny_config


def test_config_roundtrip_yaml_and_json(tmp_path):
    cfg = tiny_config(backbone=LLAMA, state_dim=2, action_names=['x', 'y', 'g'])
    for name in ('c.yaml', 'c.json'):
        cfg.save(tmp_path / name)
        assert BlockVLAConfig.load(tmp_path / name) == cfg


@pytest.mark.parametrize('overrides,needle', [
    (dict(chunk_len=8, action_dim=7, block_size=5), 'not divisible by block_size 5'),
    (dict(action_dim=0), 'action_dim must be a positive integer'),
    (dict(schedule='cosine'), 'schedule must be one of'),
    (dict(decoder='beam'), 'decoder must be one of'),
    (dict(action_names=['a', 'b']), 'action_names has 2 names but action_dim is 3'),
    (dict(image_size=30), 'multiple of vision.patch_size'),
    (dict(steps_per_block=5, block_size=3), 'steps_per_block 5 > block_size 3'),
])
def test_bad_config_names_the_problem(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**overrides)


def test_unknown_config_key_is_refused(tmp_path):
    path = tmp_path / 'c.json'
    path.write_text(json.dumps({**tiny_config().to_dict(), 'blok_size': 4}))
    with pytest.raises(ValueError, match=r"unknown keys \['blok_size'\]"):
        BlockVLAConfig.load(path)


def test_tokenizer_roundtrip_within_half_a_bin():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2000, 4)) * [1, 5, 0.1, 2] + [0, 1, 0, -3]
    stats = NormStats.from_data(data)
    tok = ActionTokenizer(stats, 256)
    a = rng.normal(size=(8, 4)) * [1, 5, 0.1, 2] * 1.5 + [0, 1, 0, -3]  # some beyond the 1st/99th percentile
    tokens = tok.encode(a)
    assert tokens.shape == (32,) and tokens.dtype == np.int64 and tokens.min() >= 0 and tokens.max() <= 255
    clipped = np.clip(a, tok.low, tok.high)
    half_bin = (tok.high - tok.low) / 256 / 2
    assert np.all(np.abs(tok.decode(tokens) - clipped) <= half_bin + 1e-6)
    assert tokens.reshape(8, 4)[1, 2] == tok.encode(a[1:2])[2]  # timestep-major order


def test_tokenizer_constant_dimension_and_stats_file(tmp_path):
    data = np.column_stack([np.linspace(-1, 1, 100), np.full(100, 0.5)])
    stats = NormStats.from_data(data, states=data[:, :1])
    stats.save(tmp_path / 'stats.json')
    tok = ActionTokenizer(NormStats.load(tmp_path / 'stats.json'))
    out = tok.decode(tok.encode([[0.0, 0.5]]))
    assert out[0, 1] == pytest.approx(0.5)


def test_bad_actions_and_missing_stats(tmp_path):
    tok = ActionTokenizer(NormStats.from_data(np.random.default_rng(0).normal(size=(50, 3))))
    with pytest.raises(ValueError, match=r'shape \[H, 3\]'):
        tok.encode(np.zeros((8, 7)))
    with pytest.raises(ValueError, match='NaN'):
        tok.encode([[0.0, np.nan, 0.0]])
    with pytest.raises(ValueError, match='NaN or inf in 1 of 3 rows'):
        NormStats.from_data([[0, 0], [np.nan, 1], [1, 1]])
    with pytest.raises(MissingStatsError, match='normalization statistics missing'):
        NormStats.load(tmp_path / 'stats.json')
    with pytest.raises(ValueError, match='needs normalization statistics'):
        ActionTokenizer(None)
    with pytest.raises(ValueError, match='tokens must be in'):
        tok.decode([0, 1, 256])


def test_instruction_limits():
    tok = ByteTokenizer(16, 512)
    ids, valid = tok.encode('touch red')
    assert ids.shape == (16,) and valid.sum() == 10 and not valid[0] and valid[-1]  # left-padded
    with pytest.raises(ValueError, match='at most 16'):
        tok.encode('touch the red block and then the blue one')
    with pytest.raises(ValueError, match='empty'):
        tok.encode('   ')
    with pytest.raises(ValueError, match='limit is'):
        tok.encode('x' * 100_000)
