"""Cached decoding equals decoding without any cache (one full forward with the equivalent mask per call)."""
import numpy as np
import pytest
import torch

from blockvla_ros.model.masks import decoding_reference_mask, position_ids
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import ByteTokenizer
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.preprocess import Preprocessor
from blockvla_ros.runtime.torch_engine import TorchEngine

from tiny import GEMMA2_WINDOW, LLAMA, MISTRAL, QWEN2, tiny_config


class UncachedEngine:
    """Recomputes [prefix][committed tokens][step tokens] from scratch on every call; never reads a cache.

    Its masks and positions come straight from the training rules (model.masks with the policy's prefix layout: a
    VLM's prefix-LM and M-RoPE included), not from the runtime's pass masks."""

    name = 'uncached-reference'

    def __init__(self, policy, committed_block_size):
        self.policy = policy.eval()
        self.config = policy.config
        self.block = committed_block_size  # 1 for AR (causal history), B for block diffusion

    def prefill(self, prefix):
        self.prefix = prefix
        self.history = np.zeros(0, np.int64)
        return self._forward(np.zeros(0, np.int64))[-1]

    def _forward(self, tokens):
        p = self.policy
        t = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
        with torch.no_grad():
            prefix, valid = p.prefix_from_inputs(t(self.prefix.pixels), t(self.prefix.text_ids),
                                                 t(self.prefix.text_valid), t(self.prefix.state))
            acts = torch.from_numpy(np.concatenate([self.history, tokens]))[None]
            embeds = torch.cat([prefix, p.action_embed(acts)], 1)
            mask = decoding_reference_mask(valid, len(self.history), len(tokens), self.block, p.layout)
            hidden, _ = p.run_backbone(embeds, position_ids(valid, acts.shape[1], 1, p.layout), mask)
            return p.action_logits(hidden[0]).numpy()  # [T, n_bins]

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        """The folded pass's reference: the prefill and the step as two uncached forwards."""
        return self.prefill(prefix), self.step(tokens, commit, block_size, rows)

    def step(self, tokens, commit=0, block_size=1, rows=None):
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        self.history = np.concatenate([self.history, tokens[:commit]])  # committed: clean, block-causal
        return self._forward(tokens[commit:])[-len(tokens):][slice(None) if rows is None else rows]


def _observation(config, seed, text='put the red block on the plate', state=False):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (config.image_size, config.image_size, 3), dtype=np.uint8)
    pre = Preprocessor(config, ByteTokenizer(config.max_text_tokens, 512))
    prefix = pre(image, text) if not state else None
    if state:
        from blockvla_ros.model.action_tokenizer import ActionTokenizer, NormStats

        stats = NormStats([-1] * config.action_dim, [1] * config.action_dim, [-1, -1], [1, 1])
        pre = Preprocessor(config, ByteTokenizer(config.max_text_tokens, 512), ActionTokenizer(stats))
        prefix = pre(image, text, rng.uniform(-1, 1, 2))
    return prefix


CASES = [
    ('qwen2', dict(backbone=QWEN2, schedule='fixed')),
    ('qwen2-threshold', dict(backbone=QWEN2, schedule='threshold', threshold=0.004)),
    ('llama', dict(backbone=LLAMA, schedule='fixed')),
    ('llama-same-shift-state', dict(backbone=LLAMA, logit_shift='same', state_dim=2, prefix_order='image_first')),
    # sliding windows shorter than the sequence (every layer / alternating layers), Gemma2's softcaps and scaling
    ('mistral-window', dict(backbone=MISTRAL, schedule='fixed')),
    ('gemma2-window', dict(backbone=GEMMA2_WINDOW, attn_implementation='eager', schedule='fixed')),
]


@pytest.mark.parametrize('name,overrides', CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize('decoder', ['blockdiff', 'ar', 'fulldiff'])
def test_cached_decoding_matches_uncached(name, overrides, decoder):
    config = tiny_config(**overrides)
    policy = BlockVLAPolicy(config).eval()
    prefix = _observation(config, 1, state=config.state_dim > 0)
    cached = Decoder(config, decoder)(TorchEngine(policy), prefix, trace=True)
    block = 1 if decoder == 'ar' else config.block_size
    ref = Decoder(config, decoder)(UncachedEngine(policy, block), prefix, trace=True)
    assert cached.calls == ref.calls and cached.nfe == ref.nfe
    max_diff = 0.0
    for (phase_a, toks_a, log_a), (phase_b, toks_b, log_b) in zip(cached.trace, ref.trace):
        assert phase_a == phase_b
        assert np.array_equal(toks_a, toks_b) if toks_a is not None else toks_b is None
        max_diff = max(max_diff, float(np.abs(log_a - log_b).max(initial=0.0)))
    assert max_diff <= 1e-4, f'{name}/{decoder}: cached vs uncached logits differ by {max_diff}'
    assert np.array_equal(cached.tokens, ref.tokens)
    assert (cached.tokens < config.n_bins).all()


def test_fulldiff_nocache_equals_cached_prefix():
    """Recomputing the prefix every pass gives the same chunk as caching it (it is only slower)."""
    config = tiny_config()
    policy = BlockVLAPolicy(config).eval()
    prefix = _observation(config, 3)
    eng = TorchEngine(policy)
    a = Decoder(config, 'fulldiff')(eng, prefix)
    b = Decoder(config, 'fulldiff_nocache')(eng, prefix)
    assert np.array_equal(a.tokens, b.tokens)
    assert b.calls == 2 * b.nfe and a.nfe == a.calls == b.nfe  # the cached prefill rides on the first pass


def test_known_tokens_are_kept_and_decoding_continues_them():
    """Real-time chunking: the first timesteps are fixed; the rest is decoded after them."""
    config = tiny_config()
    policy = BlockVLAPolicy(config).eval()
    prefix = _observation(config, 4)
    known = np.array([5, 6, 7, 8], np.int64)  # one full block (B=3) plus one token of the next
    res = Decoder(config, 'blockdiff')(TorchEngine(policy), prefix, known=known)
    assert res.tokens[:4].tolist() == known.tolist()
    assert res.steps[0] == 0  # a fully known block is only committed
    with pytest.raises(ValueError, match='known tokens'):
        Decoder(config, 'blockdiff')(TorchEngine(policy), prefix, known=np.array([999]))


SCHEDULES = [dict(schedule='fixed', steps_per_block=1), dict(schedule='fixed', steps_per_block=2),
             dict(schedule='fixed', steps_per_block=3), dict(schedule='threshold', threshold=0.004, steps_per_block=3),
             dict(schedule='threshold', threshold=0.9, steps_per_block=2)]
KNOWN = {'none': None, 'block+1': np.array([5, 6, 7, 8]), 'two-blocks': np.array([1, 2, 3, 4, 5, 6])}


def _compare(cached, ref, tol=1e-4):
    assert cached.calls == ref.calls and cached.nfe == ref.nfe and cached.steps == ref.steps
    for (phase_a, toks_a, log_a), (phase_b, toks_b, log_b) in zip(cached.trace, ref.trace):
        assert phase_a == phase_b and (toks_a is None) == (toks_b is None)
        assert toks_a is None or np.array_equal(toks_a, toks_b)
        assert float(np.abs(log_a - log_b).max(initial=0.0)) <= tol
    assert np.array_equal(cached.tokens, ref.tokens)


@pytest.mark.parametrize('known', list(KNOWN), ids=list(KNOWN))
@pytest.mark.parametrize('schedule', SCHEDULES, ids=lambda s: f'{s["schedule"]}-{s["steps_per_block"]}')
@pytest.mark.parametrize('shift', ['next', 'same'])
def test_fused_commit_equals_the_uncached_reference_and_counts_1_plus_refine_passes(schedule, known, shift):
    config = tiny_config(logit_shift=shift, **schedule)
    B = config.block_size
    policy = BlockVLAPolicy(config).eval()
    prefix = _observation(config, 11)
    known = KNOWN[known]
    fused = Decoder(config, 'blockdiff')(TorchEngine(policy), prefix, known=known, trace=True)
    _compare(fused, Decoder(config, 'blockdiff')(UncachedEngine(policy, B), prefix, known=known, trace=True))
    assert fused.nfe == sum(fused.steps)  # the prefill is folded into the first refine pass
    if known is None and schedule['schedule'] == 'fixed':
        assert fused.nfe == config.n_blocks * min(schedule['steps_per_block'], B)
    widths = {len(t) for phase, t, _ in fused.trace if phase == 'refine'}
    assert widths <= {B, 2 * B, 3 * B}  # refine, fused commit + refine, two carried blocks + refine
    unfused = Decoder(config, 'blockdiff', fuse_commit=False)(TorchEngine(policy), prefix, known=known)
    refined = [b for b, s in enumerate(fused.steps) if s]
    assert np.array_equal(unfused.tokens, fused.tokens)
    assert unfused.nfe == fused.nfe + len(refined) - (1 if refined and refined[0] == 0 else 0)
    every_row = Decoder(config, 'blockdiff', masked_rows=False)(TorchEngine(policy), prefix, known=known)
    assert np.array_equal(every_row.tokens, fused.tokens) and every_row.steps == fused.steps  # rows cost, not tokens


@pytest.mark.parametrize('reuse', ['one-call', 'instruction-kept'])
@pytest.mark.parametrize('decoder', ['blockdiff', 'fulldiff'])
@pytest.mark.parametrize('schedule', SCHEDULES[1:4], ids=lambda s: f'{s["schedule"]}-{s["steps_per_block"]}')
def test_folded_prefill_equals_the_uncached_reference_and_the_unfolded_decode(schedule, decoder, reuse):
    """The prefill folded into the first pass, on a one-call prefill or the instruction-kept split one (a new
    instruction, then the same one again: its K/V reused, the fold covers the observation part): the same calls,
    tokens and logits as the uncached reference, one NFE less than the unfolded decode, the same tokens."""
    config = tiny_config(**schedule)
    policy = BlockVLAPolicy(config).eval()
    engine = TorchEngine(policy, reuse_instruction=reuse == 'instruction-kept')
    block = config.block_size
    for seed, text in ((21, 'put the red block on the plate'), (22, 'put the red block on the plate'),
                       (23, 'stack the cups')):
        prefix = _observation(config, seed, text)
        folded = Decoder(config, decoder)(engine, prefix, trace=True)
        assert engine.text_kv_reused == (reuse == 'instruction-kept' and seed == 22)
        assert folded.trace[0][0] == 'prefill+refine' and all(p != 'prefill' for p, _, _ in folded.trace)
        _compare(folded, Decoder(config, decoder)(UncachedEngine(policy, block), prefix, trace=True))
        unfolded = Decoder(config, decoder, fold_prefill=False)(TorchEngine(policy), prefix, trace=True)
        assert unfolded.nfe == folded.nfe + 1 and np.array_equal(unfolded.tokens, folded.tokens)
        assert float(np.abs(unfolded.trace[1][2] - folded.trace[0][2][1:]).max()) <= 1e-4  # the first pass's rows


@pytest.mark.parametrize('decoder', ['ar', 'fulldiff'])
def test_known_tokens_on_ar_and_fulldiff_match_the_uncached_reference(decoder):
    config = tiny_config(schedule='fixed')
    policy = BlockVLAPolicy(config).eval()
    prefix = _observation(config, 12)
    block = 1 if decoder == 'ar' else config.block_size
    known = KNOWN['block+1']
    cached = Decoder(config, decoder)(TorchEngine(policy), prefix, known=known, trace=True)
    _compare(cached, Decoder(config, decoder)(UncachedEngine(policy, block), prefix, known=known, trace=True))
    if decoder == 'ar':  # the 4 known tokens are committed by one pass
        assert cached.nfe == 1 + 1 + (config.n_action_tokens - len(known) - 1)
