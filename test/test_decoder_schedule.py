"""NFE accounting and the unmasking schedules."""
import numpy as np
import pytest

from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import ByteTokenizer
from blockvla_ros.runtime.decoding import Decoder, scheduled_counts, select_unmask
from blockvla_ros.runtime.preprocess import Preprocessor
from blockvla_ros.runtime.torch_engine import TorchEngine

from tiny import tiny_config


class CountingEngine(TorchEngine):
    """The real torch engine, counting the prefills and the width of every action pass it receives."""

    def __init__(self, policy):
        super().__init__(policy, reuse_instruction=False)
        self.widths = []
        self.prefills = 0

    def prefill(self, prefix):
        self.prefills += 1
        return super().prefill(prefix)

    def step(self, tokens, commit=0, block_size=1, rows=None):
        self.widths.append(len(tokens))
        return super().step(tokens, commit, block_size, rows)


@pytest.fixture(scope='module')
def setup56():
    """H*D = 56 (8 x 7), B = 8: the LIBERO-sized chunk."""
    config = tiny_config(action_dim=7, chunk_len=8, block_size=8, steps_per_block=4, schedule='fixed',
                         fulldiff_steps=10)
    policy = BlockVLAPolicy(config).eval()
    pre = Preprocessor(config, ByteTokenizer(config.max_text_tokens, 512))
    prefix = pre(np.zeros((32, 32, 3), np.uint8), 'stack the cups')
    return config, policy, prefix


def test_nfe_matches_the_schedule(setup56):
    config, policy, prefix = setup56
    eng = CountingEngine(policy)
    res = Decoder(config, 'blockdiff')(eng, prefix)
    assert res.steps == [4] * 7
    assert res.nfe == res.calls == 1 + 7 * 4  # prefill + 7 x 4 refines; each commit rides on the next refine
    assert eng.prefills == 1 and eng.widths == [8] * 4 + ([16] + [8] * 3) * 6
    eng = CountingEngine(policy)
    unfused = Decoder(config, 'blockdiff', fuse_commit=False)(eng, prefix)
    assert unfused.nfe == unfused.calls == 1 + 7 * 4 + 6 and eng.widths == [8] * (7 * 4 + 6)
    eng = CountingEngine(policy)
    ar = Decoder(config, 'ar')(eng, prefix)
    assert ar.nfe == 56 and eng.widths == [1] * 55
    eng = CountingEngine(policy)
    fd = Decoder(config, 'fulldiff')(eng, prefix)
    assert fd.nfe == 1 + 10 and eng.widths == [56] * 10
    eng = CountingEngine(policy)
    nc = Decoder(config, 'fulldiff_nocache')(eng, prefix)
    assert nc.nfe == 10 and eng.prefills == 10 and nc.calls == 20


def test_threshold_never_exceeds_fixed_and_always_progresses(setup56):
    config, policy, prefix = setup56
    for tau in (0.0001, 0.5, 0.99):
        thr = config.replace(schedule='threshold', threshold=tau)
        res = Decoder(thr, 'blockdiff')(TorchEngine(policy), prefix)
        assert all(1 <= s <= 4 for s in res.steps)
        assert res.nfe == 1 + sum(res.steps) <= 1 + 7 * 4
    low = Decoder(config.replace(schedule='threshold', threshold=0.0001), 'blockdiff')(TorchEngine(policy), prefix)
    assert low.steps == [1] * 7  # everything above tau: one pass per block


def test_select_unmask_rules():
    logits = np.log(np.array([[0.97, 0.03], [0.6, 0.4], [0.55, 0.45], [0.99, 0.01]]))
    masked = np.array([True, True, True, False])
    fixed = select_unmask(logits, masked, 1, 'fixed', 0.9)
    assert fixed.tolist() == [True, False, False, False]  # most confident masked slot only
    thr = select_unmask(logits, masked, 1, 'threshold', 0.5)
    assert thr.tolist() == [True, True, True, False]  # all masked slots >= tau, never an unmasked one
    none_above = select_unmask(logits, masked, 0, 'threshold', 0.999)
    assert none_above.sum() == 1  # at least one token per step
    assert scheduled_counts(8, 3) == [3, 3, 2] and scheduled_counts(2, 4) == [1, 1]
