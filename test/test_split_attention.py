"""Attention over [cache ; new tokens] without copying the cache, and the in-place cache writes.

The "copy version" is what HF does by default: append the new K/V to a DynamicCache (a concatenation per layer) and
run sdpa / eager attention over it. The split attention and the in-place writes must compute the same thing.
"""
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from blockvla_ros.model.graphs import BackboneGraph, past_inputs
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.split_attention import SplitCache, use_split_attention
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.pass_masks import action_mask
from blockvla_ros.runtime.torch_engine import TorchEngine

from test_decoding_parity import _observation
from tiny import LLAMA, QWEN2, tiny_config


def _random_mask(gen, n, t_max):
    mask = torch.rand(1, 1, n, t_max + n, generator=gen) > 0.4
    mask[..., t_max:] |= torch.eye(n, dtype=torch.bool)  # every token sees itself
    return mask


def _concat_cache(kv):
    return DynamicCache(ddp_cache_data=[(kv[i, 0][None], kv[i, 1][None]) for i in range(kv.shape[0])])


@pytest.mark.parametrize('backbone', [QWEN2, LLAMA], ids=['qwen2-gqa2', 'llama-gqa4'])
@pytest.mark.parametrize('n', [1, 3, 7])
def test_split_attention_equals_sdpa_over_the_concatenated_cache(backbone, n):
    policy = BlockVLAPolicy(tiny_config(backbone=backbone)).eval()
    layers, kv_heads, head_dim = policy.kv_shape
    t_max = policy.config.max_seq_len
    gen = torch.Generator().manual_seed(n)
    kv = torch.randn(layers, 2, kv_heads, t_max, head_dim, generator=gen)
    embeds = torch.randn(1, n, policy.hidden_size, generator=gen)
    positions = (20 + torch.arange(n))[None]
    mask = _random_mask(gen, n, t_max)
    with torch.no_grad():
        logits, new_kv = BackboneGraph(policy)(embeds, positions, mask, None, past_inputs(kv))
        ref = policy.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         past_key_values=_concat_cache(kv), use_cache=True)  # sdpa, cache concatenated
    ref_logits = policy.action_logits(ref.last_hidden_state)
    ref_new = torch.stack([torch.stack([lay.keys[0, :, t_max:], lay.values[0, :, t_max:]])
                           for lay in ref.past_key_values.layers])
    assert (logits - ref_logits).abs().max() <= 1e-5 and (new_kv - ref_new).abs().max() <= 1e-5
    # logit_rows: the last layer computes only those rows past its K/V; they and every row's K/V are unchanged
    seen = []  # the rows the last layer's MLP computes (a hook that runs before the graph's own scatter-back)
    hook = policy.llm.layers[-1].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    for rows in ([n - 1], [0], list(range(n // 2, n)), [n - 1, 0]):
        with torch.no_grad():
            part, part_kv = BackboneGraph(policy)(embeds, positions, mask, torch.tensor(rows), past_inputs(kv))
        assert part.shape == (1, len(rows), policy.config.n_bins) and seen.pop() == len(rows)
        assert (part - ref_logits[:, rows]).abs().max() <= 1e-5 and torch.equal(part_kv, new_kv)
    hook.remove()
    assert policy.llm.config._attn_implementation == 'sdpa'  # restored after the graph ran


class CopyEngine(TorchEngine):
    """The copy version: the cache is a DynamicCache that every pass concatenates onto (HF's default), trimmed back
    to the committed slots after the pass. Masks and embeddings are the runtime's; only the cache handling differs."""

    def prefill(self, prefix):
        self._dyn = DynamicCache()
        self._len = 0
        return super().prefill(prefix)

    def prefill_step(self, prefix, tokens, commit=0, block_size=1, rows=None):
        """Not folded: the prefill and the step as two passes (this engine's cache follows `_prefix_pass` and
        `step`; the folded pass is checked against the uncached reference in test_decoding_parity)."""
        return self.prefill(prefix), self.step(tokens, commit, block_size, rows)

    def _backbone(self, embeds, positions, mask, rows):
        n, t_max = embeds.shape[1], self.cache.max_len
        keep = self._len  # slots in the concatenated cache (prefix + committed)
        cols = np.concatenate([np.arange(keep), t_max + np.arange(n)])
        with torch.no_grad():
            out = self.policy.llm(inputs_embeds=self._t(embeds), attention_mask=self._t(mask[..., cols]),
                                  position_ids=self._t(positions), past_key_values=self._dyn, use_cache=True)
            logits = self.policy.action_logits(out.last_hidden_state)[0].numpy()[rows]
        new_kv = torch.stack([torch.stack([lay.keys[0, :, keep:], lay.values[0, :, keep:]])
                              for lay in self._dyn.layers])
        for lay in self._dyn.layers:  # back to the committed slots
            lay.keys, lay.values = lay.keys[:, :, :keep], lay.values[:, :, :keep]
        self._pending = new_kv
        return logits, new_kv

    def step(self, tokens, commit=0, block_size=1, rows=None):
        logits = super().step(tokens, commit, block_size, rows)
        if commit:  # the committed slots join the concatenated cache
            for i, lay in enumerate(self._dyn.layers):
                lay.keys = torch.cat([lay.keys, self._pending[i, 0][None, :, :commit]], 2)
                lay.values = torch.cat([lay.values, self._pending[i, 1][None, :, :commit]], 2)
            self._len += commit
        return logits

    def _prefix_pass(self, embeds, positions, attention, valid, lo, hi):
        logits = super()._prefix_pass(embeds, positions, attention, valid, lo, hi)
        for i, lay in enumerate(self._dyn.layers):
            lay.keys = torch.cat([lay.keys, self._pending[i, 0][None]], 2)
            lay.values = torch.cat([lay.values, self._pending[i, 1][None]], 2)
        self._len += hi - lo
        return logits


@pytest.mark.parametrize('decoder', ['blockdiff', 'ar'])
def test_in_place_cache_update_equals_the_copy_version(decoder):
    config = tiny_config(schedule='fixed', steps_per_block=2)
    policy = BlockVLAPolicy(config).eval()
    prefix = _observation(config, 5)
    inplace, copy = TorchEngine(policy, reuse_instruction=False), CopyEngine(policy, reuse_instruction=False)
    a = Decoder(config, decoder)(inplace, prefix, trace=True)
    b = Decoder(config, decoder)(copy, prefix, trace=True)
    assert np.array_equal(a.tokens, b.tokens) and a.nfe == b.nfe
    assert max(float(np.abs(x[2] - y[2]).max(initial=0.0)) for x, y in zip(a.trace, b.trace)) <= 1e-5
    filled = copy._len  # prefix + committed slots: the in-place buffer holds exactly the concatenation
    concat = torch.stack([torch.stack([lay.keys[0], lay.values[0]]) for lay in copy._dyn.layers])
    assert (inplace.cache.buffer[:, :, :, :filled] - concat).abs().max() <= 1e-5
    assert inplace.cache.valid[:filled].sum() == inplace.prefix_valid.sum() + inplace.n_committed
    assert not inplace.cache.valid[filled:].any()


def test_gemma2_softcap_and_scaling_are_honoured():
    """Gemma2 scales by query_pre_attn_scalar and soft-caps attention logits: split == eager over the concatenation."""
    cfg = AutoConfig.for_model('gemma2', vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=20,
                               attn_logit_softcapping=0.5, max_position_embeddings=256)
    cfg._attn_implementation = 'eager'
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).base_model.eval()
    gen = torch.Generator().manual_seed(1)
    t_max, n = 12, 4
    kv = torch.randn(2, 2, 2, t_max, 8, generator=gen) * 3
    embeds = torch.randn(1, n, 32, generator=gen)
    positions = (t_max + torch.arange(n))[None]
    mask = _random_mask(gen, n, t_max)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)  # eager wants floats
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=additive, position_ids=positions,
                    past_key_values=_concat_cache(kv), use_cache=True).last_hidden_state
        cache = SplitCache([(kv[i, 0][None], kv[i, 1][None]) for i in range(2)])
        with use_split_attention(model):
            out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True, split_cache=cache).last_hidden_state
    assert (out - ref).abs().max() <= 1e-5
    assert model.config._attn_implementation == 'eager'


def test_a_sliding_window_no_mask_applies_is_refused():
    """The windows are applied by the masks (test_sliding_windows); a config whose attention_windows lost the
    backbone's window would silently attend past it, so the graph refuses to run."""
    backbone = dict(QWEN2, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    policy = BlockVLAPolicy(tiny_config(backbone=backbone)).eval()
    assert policy.config.attention_windows == [8]
    policy.config = policy.config.replace(attention_windows=[])
    t_max = policy.config.max_seq_len
    kv = torch.zeros(2, 2, 2, t_max, 16)
    with pytest.raises(ValueError, match='sliding window of 8 tokens.*no mask applies it'), torch.no_grad():
        mask = torch.ones(1, 1, 2, t_max + 2, dtype=torch.bool)
        BackboneGraph(policy)(torch.zeros(1, 2, 64), torch.arange(2)[None], mask, None, past_inputs(kv))


def test_action_mask_rows():
    """Clean tokens are block-causal and never see noisy ones; the noisy block sees the clean tokens and itself."""
    valid = np.zeros(10, bool)
    valid[2:6] = True
    m = action_mask(valid, first=4, commit=4, n=6, block_size=2)[0, 0]  # clean tokens 4..7 = blocks 2, 2, 3, 3
    assert (m[:, :10] == valid).all()
    own = m[:, 10:].astype(int)
    assert own.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                            [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
