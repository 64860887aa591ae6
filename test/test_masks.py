"""The vectorized attention masks equal an element-wise reference written from DESIGN.md's rules."""
import itertools

import pytest
import torch

from blockvla_ros.model.masks import decoding_reference_mask, position_ids, training_mask


def reference(prefix_valid, n_actions, block_size, mode):
    """Loop-based mask: returns [T][T] of bools for one sample."""
    p = len(prefix_valid)
    toks = [('prefix', 0, i) for i in range(p)]
    if mode == 'blockdiff':
        toks += [('noisy', i // block_size, i) for i in range(n_actions)]
        toks += [('clean', i // block_size, i) for i in range(n_actions)]
    elif mode == 'ar':
        toks += [('clean', i, i) for i in range(n_actions)]
    else:
        toks += [('noisy', 0, i) for i in range(n_actions)]
    valid = list(prefix_valid) + [True] * (len(toks) - p)
    out = []
    for qi, (qk, qb, _) in enumerate(toks):
        row = []
        for ki, (kk, kb, _) in enumerate(toks):
            if qi == ki:
                row.append(True)
                continue
            if not valid[ki]:
                row.append(False)
                continue
            if qk == 'prefix':
                ok = kk == 'prefix' and ki <= qi
            elif kk == 'prefix':
                ok = True  # every action token sees the (valid) prefix
            elif qk == 'clean':
                ok = kk == 'clean' and kb <= qb
            else:  # noisy query: itself (its block) + clean blocks strictly before
                ok = (kk == 'noisy' and kb == qb) or (kk == 'clean' and kb < qb)
            row.append(ok)
        out.append(row)
    return torch.tensor(out)


SHAPES = [(3, 4, 2), (5, 6, 3), (7, 12, 4), (4, 8, 8), (6, 9, 1)]


@pytest.mark.parametrize('mode', ['blockdiff', 'ar', 'fulldiff'])
@pytest.mark.parametrize('p,L,B', SHAPES)
def test_training_mask_matches_reference(mode, p, L, B):
    g = torch.Generator().manual_seed(p * 100 + L)
    valid = torch.rand(2, p, generator=g) > 0.3
    valid[:, -1] = True
    got = training_mask(valid, L, B, mode)
    assert got.shape == (2, 1, got.shape[-1], got.shape[-1])
    for i in range(2):
        assert torch.equal(got[i, 0], reference(valid[i].tolist(), L, B, mode)), (mode, p, L, B, i)


def test_blockdiff_mask_spot_checks():
    """Hand-checked entries of the DESIGN.md picture (P=3, L=4, B=2)."""
    m = training_mask(torch.ones(1, 3, dtype=torch.bool), 4, 2, 'blockdiff')[0, 0]
    P, N, C = 0, 3, 7  # offsets of prefix, noisy copy, clean copy
    assert not m[P + 0, P + 1]  # prefix is causal
    assert not m[P + 2, N + 0] and not m[P + 2, C + 0]  # prefix never sees actions
    assert m[N + 0, N + 1] and m[N + 1, N + 0]  # noisy block bidirectional
    assert not m[N + 0, C + 0]  # noisy block 0 does not see its own clean copy
    assert m[N + 2, C + 1] and not m[N + 2, C + 2]  # noisy block 1 sees clean block 0 only
    assert not m[N + 2, N + 0]  # noisy blocks never see other noisy blocks
    assert m[C + 2, C + 0] and m[C + 0, C + 1] and not m[C + 1, C + 2]  # clean: block causal
    assert not m[C + 0, N + 0]  # clean never sees noisy


def test_reference_decoding_mask_is_the_clean_prefix_of_the_training_mask():
    """[prefix][committed clean blocks][current block] sees what the cached decode sees."""
    valid = torch.tensor([[False, True, True, True]])
    for committed, cur in itertools.product([0, 3, 6], [3]):
        m = decoding_reference_mask(valid, committed, cur, 3)[0, 0]
        p = 4
        cur_rows = m[p + committed:]
        assert cur_rows[:, 1:p + committed].all() and not cur_rows[:, 0].any()  # all valid cache, no padding
        assert cur_rows[:, p + committed:].all()  # bidirectional inside the step


def test_positions_duplicate_across_copies_and_skip_padding():
    valid = torch.tensor([[False, False, True, True, True]])
    pos = position_ids(valid, 4, 2)
    assert pos[0, :5].tolist() == [0, 0, 0, 1, 2]
    assert pos[0, 5:9].tolist() == [3, 4, 5, 6] and pos[0, 9:].tolist() == [3, 4, 5, 6]
