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
    """The real torch engine, counting the prefills and the width of every action pass it receives (a folded
    prefill + first pass counts as a prefill and a width: `folded` lists those)."""

    def __init__(self, policy):
        super().__init__(policy, reuse_instruction=False)
        self.widths = []
        self.prefills = 0
        self.folded = []

    def prefill(self, prefix):
        self.prefills += 1
        return super().prefill(prefix)

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        self.prefills += 1
        self.widths.append(len(tokens))
        self.folded.append(len(self.widths) - 1)
        return super().prefill_step(prefix, tokens, commit, block_size, rows)

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
    assert res.nfe == res.calls == 7 * 4  # 7 x 4 refines; the prefill rides on the first, each commit on the next
    assert eng.prefills == 1 and eng.folded == [0] and eng.widths == [8] * 4 + ([16] + [8] * 3) * 6
    eng = CountingEngine(policy)
    unfolded = Decoder(config, 'blockdiff', fold_prefill=False)(eng, prefix)
    assert unfolded.nfe == unfolded.calls == 1 + 7 * 4 and eng.folded == []
    assert eng.widths == [8] * 4 + ([16] + [8] * 3) * 6 and np.array_equal(unfolded.tokens, res.tokens)
    eng = CountingEngine(policy)
    unfused = Decoder(config, 'blockdiff', fuse_commit=False)(eng, prefix)
    assert unfused.nfe == unfused.calls == 7 * 4 + 6 and eng.widths == [8] * (7 * 4 + 6) and eng.folded == [0]
    eng = CountingEngine(policy)
    both = Decoder(config, 'blockdiff', fuse_commit=False, fold_prefill=False)(eng, prefix)
    assert both.nfe == both.calls == 1 + 7 * 4 + 6 and eng.widths == [8] * (7 * 4 + 6)
    eng = CountingEngine(policy)
    ar = Decoder(config, 'ar')(eng, prefix)  # its first token is read off the prefill: nothing to fold
    assert ar.nfe == 56 and eng.widths == [1] * 55 and eng.folded == []
    eng = CountingEngine(policy)
    fd = Decoder(config, 'fulldiff')(eng, prefix)
    assert fd.nfe == 10 and eng.widths == [56] * 10 and eng.folded == [0]
    eng = CountingEngine(policy)
    fd = Decoder(config, 'fulldiff', fold_prefill=False)(eng, prefix)
    assert fd.nfe == 1 + 10 and eng.widths == [56] * 10 and eng.folded == []
    eng = CountingEngine(policy)
    nc = Decoder(config, 'fulldiff_nocache')(eng, prefix)
    assert nc.nfe == 10 and eng.prefills == 10 and nc.calls == 20 and eng.folded == []


def test_nfe_with_known_blocks(setup56):
    """Real-time chunking: known whole blocks ride on the folded pass as its carry; a chunk known entirely costs
    the prefill alone."""
    config, policy, prefix = setup56
    eng = CountingEngine(policy)
    res = Decoder(config, 'blockdiff')(eng, prefix, known=np.arange(20) % config.n_bins)  # 2 blocks + 4 tokens
    assert res.steps == [0, 0, 4, 4, 4, 4, 4] and res.nfe == res.calls == 5 * 4
    assert eng.folded == [0] and eng.widths == [24] + [8] * 3 + ([16] + [8] * 3) * 4
    eng = CountingEngine(policy)
    unfused = Decoder(config, 'blockdiff', fuse_commit=False)(eng, prefix, known=np.arange(20) % config.n_bins)
    assert unfused.nfe == 1 + 5 * 4 + 4 and eng.folded == [0] and eng.widths[0] == 16  # the commit pass folded
    eng = CountingEngine(policy)
    everything = Decoder(config, 'blockdiff')(eng, prefix, known=np.arange(56) % config.n_bins)
    assert everything.nfe == everything.calls == 1 and eng.prefills == 1 and eng.widths == []


def test_threshold_never_exceeds_fixed_and_always_progresses(setup56):
    config, policy, prefix = setup56
    for tau in (0.0001, 0.5, 0.99):
        thr = config.replace(schedule='threshold', threshold=tau)
        res = Decoder(thr, 'blockdiff')(TorchEngine(policy), prefix)
        assert all(1 <= s <= 4 for s in res.steps)
        assert res.nfe == sum(res.steps) <= 7 * 4
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
