"""Decoding calibration (export.calibration): candidate settings, the choice rule, real decoding on tiny policies,
and the held-out windows it decodes (training.validation.held_out_windows on real recordings)."""
import json
import shutil

import numpy as np
import pytest
import torch

from blockvla_ros.export.calibration import (Setting, calibrate, candidate_settings, engine_decode_fn,
                                             reference_setting)
from blockvla_ros.model.action_tokenizer import ActionTokenizer, NormStats
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import ByteTokenizer
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.preprocess import Preprocessor
from blockvla_ros.runtime.torch_engine import TorchEngine
from blockvla_ros.tasks.recording import record_demonstrations
from blockvla_ros.training.config import TrainConfig
from blockvla_ros.training.assemble import read_and_split
from blockvla_ros.training.validation import SPLIT_FILE, held_out_windows, split_record

from tiny import tiny_config


pytestmark = pytest.mark.usefixtures('one_thread')


def test_candidates_cover_each_trained_block_size():
    cands = candidate_settings([3], thresholds=(0.5, 0.9))
    assert [s.label for s in cands] == ['B=3, 1 passes', 'B=3, 2 passes', 'B=3, <=2 passes, tau 0.5',
                                        'B=3, <=2 passes, tau 0.9', 'B=3, 3 passes', 'B=3, <=3 passes, tau 0.5',
                                        'B=3, <=3 passes, tau 0.9']
    mixed = candidate_settings([12, 3, 6], thresholds=(0.7,))
    assert sorted({s.block_size for s in mixed}) == [3, 6, 12]
    assert sorted({s.steps_per_block for s in mixed if s.block_size == 12}) == [1, 2, 3, 4, 12]
    assert reference_setting([12, 6, 3]) == Setting(3, 3, 'fixed')
    want = {'block_size': 6, 'steps_per_block': 2, 'schedule': 'threshold', 'threshold': 0.7}
    assert Setting(6, 2, 'threshold', 0.7).overrides() == want
    for bad in (dict(block_size=3, steps_per_block=4), dict(block_size=3, steps_per_block=2, schedule='topk'),
                dict(block_size=3, steps_per_block=2, schedule='threshold'),
                dict(block_size=3, steps_per_block=2, schedule='threshold', threshold=1.5)):
        with pytest.raises(ValueError):
            Setting(**bad)


def test_the_fewest_passes_above_the_level_is_chosen():
    """A decode function with known answers: setting -> (agreement it reaches, passes it costs)."""
    truth = {Setting(4, 4): (1.0, 5), Setting(4, 1): (0.5, 2), Setting(4, 2): (0.75, 3),
             Setting(4, 2, 'threshold', 0.9): (1.0, 4), Setting(4, 3): (1.0, 4)}
    reference = np.arange(8)

    def decode(setting, i):
        agree, nfe = truth[setting]
        tokens = reference.copy()
        wrong = int(round((1 - agree) * len(tokens)))
        tokens[:wrong] += 1  # one bin off
        return tokens, nfe

    cal = calibrate(decode, 3, [4], level=0.7, candidates=list(truth))
    assert cal.chosen == Setting(4, 2) and cal.chosen_row.nfe == 3 and cal.chosen_row.agreement == 0.75
    assert cal.reference.setting == Setting(4, 4) and cal.reference.agreement == 1.0
    # a tie in passes goes to the higher agreement, then fixed before threshold
    cal = calibrate(decode, 3, [4], level=0.9, candidates=list(truth))
    assert cal.chosen == Setting(4, 3)
    assert calibrate(decode, 3, [4], level=0.4, candidates=list(truth)).chosen == Setting(4, 1)
    d = cal.to_dict()
    assert d['chosen']['steps_per_block'] == 3 and d['reference']['nfe'] == 5 and len(d['candidates']) == 5
    assert '**(chosen)**' in cal.table() and '(reference)' in cal.table()
    for bad in (0.0, 1.5, float('nan')):
        with pytest.raises(ValueError, match='level'):
            calibrate(decode, 3, [4], level=bad, candidates=list(truth))


def _observations(config, n, seed=0):
    rng = np.random.default_rng(seed)
    pre = Preprocessor(config, ByteTokenizer(config.max_text_tokens, 512))
    return [pre(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f'touch {c}') for c in
            ('red', 'green', 'blue', 'yellow', 'red then blue')[:n]]


def test_real_decoding_on_a_random_policy():
    """Every row is what the decoder really does; the reference agrees with itself; level 1 keeps exact tokens."""
    torch.manual_seed(0)
    config = tiny_config(chunk_len=4, block_size=3, train_block_sizes=[3, 6], steps_per_block=3)
    engine = TorchEngine(BlockVLAPolicy(config))
    windows = _observations(config, 3)
    decode = engine_decode_fn(engine, config, windows)
    cal = calibrate(decode, len(windows), config.block_sizes, level=1.0, thresholds=(0.6,))
    assert cal.reference.agreement == 1.0 and cal.chosen_row.agreement == 1.0
    assert cal.chosen_row.nfe <= cal.reference.nfe
    ref = Decoder(config.replace(schedule='fixed', steps_per_block=3), 'blockdiff')
    ref_tokens = np.stack([ref(engine, w).tokens for w in windows])
    for row in cal.rows:
        dec = Decoder(config.replace(**row.setting.overrides()), 'blockdiff')
        results = [dec(engine, w) for w in windows]
        assert row.nfe == pytest.approx(np.mean([r.nfe for r in results]))
        assert row.agreement == pytest.approx(np.mean([np.mean(r.tokens == t) for r, t in zip(results, ref_tokens)]))
    assert {r.setting.block_size for r in cal.rows} == {3, 6}


def test_held_out_windows_are_the_runs_validation_split(tmp_path):
    bags = record_demonstrations(tmp_path / 'bags', tasks=['touch_red', 'touch_blue'], episodes_per_task=3, seed=0,
                                 progress=False)
    model = dict(backbone={'model_type': 'qwen2', 'vocab_size': 512, 'hidden_size': 32, 'intermediate_size': 64,
                           'num_hidden_layers': 1, 'num_attention_heads': 2, 'num_key_value_heads': 1},
                 vision={'type': 'patch', 'patch_size': 16, 'dim': 32}, image_size=32, max_text_tokens=40,
                 action_dim=3, chunk_len=4, block_size=3, steps_per_block=3, state_dim=2)
    tc = TrainConfig.from_dict({'model': model, 'data': {'bags': [str(tmp_path / 'bags')], 'val_fraction': 0.34,
                                                         'topics': {'state': '/joint_states'}},
                                'train': {'steps': 1, 'out_dir': str(tmp_path / 'run')}})
    tc.save(tmp_path / 'train_config.yaml')
    config = tc.model_config()
    stats = NormStats.from_data(np.array([[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]]), np.array([[-1.0, -1.0], [1, 1]]))
    text = ByteTokenizer(config.max_text_tokens, 512)
    windows, source = held_out_windows(tmp_path / 'train_config.yaml', config, text, ActionTokenizer(stats, 256),
                                       max_windows=5)
    assert len(windows) == 5 and 'validation split' in source and '2 episodes' in source
    assert windows[0].pixels.shape == (1, 3, 32, 32) and windows[0].state.shape == (1, 2)
    every, source = held_out_windows(tc, config, text, ActionTokenizer(stats, 256), bags=[bags[0]], max_windows=1000)
    assert '1 episodes' in source and len(every) > 5
    with pytest.raises(ValueError, match='no validation split'):
        held_out_windows(tc.replace({'data.val_fraction': 0.0}), config, text, ActionTokenizer(stats, 256))

    # a checkpoint's split record: only the held-out bags are read (the training bags may be gone), same windows
    _train, val, _cfg, _report = read_and_split(tc, progress=False)
    (tmp_path / SPLIT_FILE).write_text(json.dumps(split_record(val)))
    for bag in bags:
        if str(bag) not in {ep.bag_path for ep in val}:
            shutil.rmtree(bag)
    fast, source = held_out_windows(tmp_path / 'train_config.yaml', config, text, ActionTokenizer(stats, 256),
                                    max_windows=5)
    assert SPLIT_FILE in source and len(fast) == len(windows) == 5
    for a, b in zip(fast, windows):
        assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.text_ids, b.text_ids)
        assert np.array_equal(a.state, b.state)
    # a record that no longer matches its bags (or does not parse) falls back to rebuilding the split from the bags
    doc = split_record(val)
    doc['episodes'][0]['ticks'] += 1
    for content in (json.dumps(doc), '{"episodes": 5}', 'not json'):
        (tmp_path / SPLIT_FILE).write_text(content)
        _, source = held_out_windows(tmp_path / 'train_config.yaml', config, text, ActionTokenizer(stats, 256),
                                     max_windows=5)
        assert 'validation split' in source and SPLIT_FILE not in source, source
