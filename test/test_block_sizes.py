"""Policies trained with several block sizes (model.train_block_sizes): validation, the per-step draw, decoding."""
import numpy as np
import pytest
import torch

from blockvla_ros.model.losses import compute_loss
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.torch_engine import TorchEngine

from test_overfit import _examples
from tiny import tiny_config


pytestmark = pytest.mark.usefixtures('one_thread')


def test_train_block_sizes_are_validated():
    cfg = tiny_config(chunk_len=4, block_size=3, train_block_sizes=[12, 3, 6])  # 12 action tokens
    assert cfg.block_sizes == [3, 6, 12] and tiny_config().block_sizes == [3]
    with pytest.raises(ValueError, match=r'train_block_sizes \[5\] do not divide the 12'):
        tiny_config(train_block_sizes=[3, 5])
    with pytest.raises(ValueError, match='block_size 3 is not one of train_block_sizes'):
        tiny_config(train_block_sizes=[6, 12])
    for bad in ([0], [True], ['6'], 6, [3.0]):
        with pytest.raises(ValueError, match='train_block_sizes must be a list'):
            tiny_config(train_block_sizes=bad)


def test_each_step_draws_one_block_size_and_trains_with_it():
    """A seeded call equals the single-size loss of the size it drew, with the generator advanced past the draw."""
    torch.manual_seed(0)
    mixed = tiny_config(train_block_sizes=[3, 6, 12], mask_eps=0.2)
    policy = BlockVLAPolicy(mixed).eval()
    _obs, _actions, batch = _examples(mixed)
    drawn = set()
    for seed in range(12):
        size = [3, 6, 12][int(torch.randint(3, (1,), generator=torch.Generator().manual_seed(seed)))]
        drawn.add(size)
        got, _ = compute_loss(policy, batch, generator=torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)
        torch.randint(3, (1,), generator=gen)  # the draw
        policy.config = mixed.replace(block_size=size, train_block_sizes=[])
        want, _ = compute_loss(policy, batch, generator=gen)
        policy.config = mixed
        assert torch.allclose(got, want), (seed, size)
    assert drawn == {3, 6, 12}


def test_a_policy_trained_with_three_sizes_decodes_with_each():
    torch.manual_seed(0)
    config = tiny_config(train_block_sizes=[3, 6, 12], schedule='fixed')
    policy = BlockVLAPolicy(config)
    obs, actions, batch = _examples(config)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _info = compute_loss(policy, batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    engine = TorchEngine(policy)
    for size in (3, 6, 12):
        cfg = config.replace(block_size=size, steps_per_block=3)
        for o, a in zip(obs, actions):
            res = Decoder(cfg, 'blockdiff')(engine, o)
            assert np.array_equal(res.tokens, a.numpy()), (size, res.tokens, a.numpy())
            assert res.steps == [3] * (12 // size)
