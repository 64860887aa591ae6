"""The prefix layout of a policy (model.prefix_layout over model.vlm.layout.PromptLayout): one home, no torch."""
import subprocess
import sys

import numpy as np
import pytest

from blockvla_ros.model.prefix_layout import PromptLayout, Segment, generic_layout, graph_positions, layout_for

from tiny import tiny_config


def test_layout_of_a_config():
    lay = layout_for(tiny_config(state_dim=2))
    assert [(s.name, s.length, s.source) for s in lay.segments] == [
        ('text', 40, 'text'), ('image', 4, 'image'), ('state', 1, 'state')]
    assert lay.length == 45 and lay.instruction_len == 40 and lay.offsets['image'] == slice(40, 44)
    first = layout_for(tiny_config(prefix_order='image_first'))
    assert [s.name for s in first.segments] == ['image', 'text'] and first.instruction_len == 0
    assert PromptLayout.from_dict(first.to_dict()) == first


def test_valid_positions_and_action_positions_skip_padding():
    lay = PromptLayout(segments=(Segment('text', 5, 'text'), Segment('image', 4, 'image'),
                                 Segment('state', 1, 'state')))
    valid = lay.valid(np.array([False, False, True, True, True]))
    assert valid.tolist() == [False, False, True, True, True] + [True] * 5
    assert lay.positions(valid).tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert int(lay.next_position(valid)) == 8 and lay.action_positions(valid, 3, 2).tolist() == [11, 12]
    assert graph_positions(lay.action_positions(valid, 0, 2)).shape == (1, 2)
    expect = np.tril(np.ones((10, 10), bool)) & valid[None] | np.eye(10, dtype=bool)
    assert np.array_equal(lay.attention(valid), expect)


def test_instruction_split_only_before_any_observation_and_span():
    bos = Segment('bos', 1, 'fixed', ids=(2,))
    text, image = Segment('text', 3, 'text'), Segment('image', 4, 'image')
    assert PromptLayout(segments=(bos, text, image)).instruction_len == 4  # template + slot, then the image
    assert PromptLayout(segments=(bos, image, text)).instruction_len == 0
    prefix_lm = PromptLayout(segments=(Segment('text', 3, 'text', span='p'), Segment('image', 4, 'image', span='p')))
    assert prefix_lm.instruction_len == 0  # the instruction attends to the image: its K/V depends on it
    assert generic_layout(7).length == 7


def test_mrope_positions_reach_the_graph_as_three_rows():
    lay = PromptLayout(segments=(Segment('text', 3, 'text'), Segment('image', 4, 'image')), rope_dims=3,
                       image_grid=(2, 2))
    pos = lay.action_positions(lay.valid(np.array([False, True, True])), 0, 2)
    assert pos.shape == (3, 2) and (pos == pos[0]).all()
    assert graph_positions(pos).shape == (3, 1, 2)
    with pytest.raises(ValueError, match='image_grid'):
        PromptLayout(segments=(Segment('text', 3, 'text'), Segment('image', 4, 'image')), rope_dims=3)


def test_layout_and_masks_import_without_torch():
    code = ('import sys\nimport blockvla_ros.model.prefix_layout, blockvla_ros.model.masks, '
            'blockvla_ros.runtime.pass_masks\nprint("torch" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == 'False', out.stderr[-2000:]
