"""An honest overfit test: each loss memorizes a few fixed examples and its decoder then reproduces them."""
import numpy as np
import pytest
import torch

from blockvla_ros.model.losses import Batch, compute_loss
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import ByteTokenizer
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.preprocess import Preprocessor
from blockvla_ros.runtime.torch_engine import TorchEngine

from tiny import tiny_config


def _examples(config, n=3):
    rng = np.random.default_rng(0)
    pre = Preprocessor(config, ByteTokenizer(config.max_text_tokens, 512))
    texts = ['touch red', 'touch blue', 'touch green then red'][:n]
    obs = [pre(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), t) for t in texts]
    actions = torch.from_numpy(rng.integers(0, config.n_bins, (n, config.n_action_tokens)))
    batch = Batch(*(torch.from_numpy(np.concatenate(x)) for x in
                    ([o.pixels for o in obs], [o.text_ids for o in obs], [o.text_valid for o in obs])), actions)
    return obs, actions, batch


@pytest.mark.parametrize('mode,decoders', [('blockdiff', ['blockdiff']), ('ar', ['ar']),
                                           ('fulldiff', ['fulldiff', 'fulldiff_nocache'])])
def test_each_loss_overfits_and_its_decoder_reproduces_the_examples(mode, decoders):
    torch.manual_seed(0)
    config = tiny_config(train_mode=mode, schedule='fixed')
    policy = BlockVLAPolicy(config)
    obs, actions, batch = _examples(config)
    engine = TorchEngine(policy)
    before = [Decoder(config, decoders[0])(engine, o).tokens for o in obs]
    assert not all(np.array_equal(b, a.numpy()) for b, a in zip(before, actions))  # not trivially solved
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        loss, _info = compute_loss(policy, batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:10]), losses[::20]
    policy.eval()
    for dec in decoders:
        for o, a in zip(obs, actions):
            got = Decoder(config, dec)(engine, o).tokens
            assert np.array_equal(got, a.numpy()), f'{mode}/{dec}: {got} != {a.numpy()}'
    if mode == 'blockdiff':  # the threshold schedule decodes the memorized chunks too, in no more passes
        thr = config.replace(schedule='threshold', threshold=0.9)
        for o, a in zip(obs, actions):
            res = Decoder(thr, 'blockdiff')(engine, o)
            assert np.array_equal(res.tokens, a.numpy())
            assert res.nfe <= Decoder(config, 'blockdiff')(engine, o).nfe
