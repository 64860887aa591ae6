"""Cached decoding equals decoding without any cache (one full forward with the equivalent mask per call)."""
import numpy as np
import pytest
import torch

from blockvla_ros.model.masks import decoding_reference_mask, position_ids
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import ByteTokenizer
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.engine import Engine
from blockvla_ros.runtime.preprocess import Preprocessor
from blockvla_ros.runtime.torch_engine import TorchEngine

from tiny import LLAMA, QWEN2, tiny_config


class UncachedEngine(Engine):
    """Recomputes [prefix][committed tokens][step tokens] from scratch on every call; never reads a cache."""

    name = 'uncached-reference'

    def __init__(self, policy, committed_block_size):
        self.policy = policy.eval()
        self.block = committed_block_size  # 1 for AR (causal history), B for block diffusion
        super().__init__(policy.config, policy.kv_shape)

    def _alloc(self, shape):
        return np.zeros(shape, np.float32)

    def _prefill(self, prefix):
        self.prefix = prefix
        self.history = np.zeros(0, np.int64)
        logits = self._forward(np.zeros((1, 0), np.int64))[-1]
        shape = self.cache.buffer.shape[:3] + (len(prefix.prefix_valid(self.config)), self.cache.buffer.shape[4])
        return logits, np.zeros(shape, np.float32)

    def _forward(self, tokens):
        p = self.policy
        t = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
        with torch.no_grad():
            prefix, valid = p.prefix_from_inputs(t(self.prefix.pixels), t(self.prefix.text_ids),
                                                 t(self.prefix.text_valid), t(self.prefix.state))
            acts = torch.from_numpy(np.concatenate([self.history, tokens[0]]))[None]
            embeds = torch.cat([prefix, p.action_embed(acts)], 1)
            mask = decoding_reference_mask(valid, len(self.history), tokens.shape[1], self.block)
            hidden, _ = p.run_backbone(embeds, position_ids(valid, acts.shape[1], 1), mask)
            return p.action_logits(hidden[0]).numpy()  # [T, n_bins]

    def _step(self, tokens, positions):
        logits = self._forward(tokens)[-tokens.shape[1]:]
        return logits, np.zeros(self.cache.buffer.shape[:3] + (tokens.shape[1], self.cache.buffer.shape[4]),
                                np.float32)

    def step(self, tokens, commit=False):
        out = super().step(tokens, commit)
        if commit:
            self.history = np.concatenate([self.history, np.asarray(tokens, np.int64).reshape(-1)])
        return out


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
        max_diff = max(max_diff, float(np.abs(log_a - log_b).max()))
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
    assert b.calls == 2 * b.nfe and a.nfe == 1 + b.nfe


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
