"""The demo recipe's starting points: word-tokenizer backbone folder, sin/cos patch positions, vision pretraining,
and `vision.init_from` in training (real transformers / tokenizers / safetensors, tiny sizes)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import load_text_tokenizer
from blockvla_ros.model.vision import PatchEncoder, sincos_grid
from blockvla_ros.tasks import TASKS, TabletopEnv
from blockvla_ros.tasks.backbone import task_vocabulary, write_word_backbone
from blockvla_ros.tasks.cli import main as task_cli
from blockvla_ros.tasks.spec import COLORS
from blockvla_ros.tasks.vision_pretrain import pretrain_patch_encoder, render_scenes
from blockvla_ros.training.assemble import load_vision_weights
from blockvla_ros.training.trainer import train

from test_training import make_config, record
from tiny import tiny_config


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
    return write_word_backbone(tmp_path_factory.mktemp('bb') / 'backbone', hidden_size=32, num_layers=1,
                               num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_word_backbone_tokenizes_every_instruction_without_unknown_words(backbone):
    tok = load_text_tokenizer('auto', 20, 64, backbone)
    unk = tok.tok.unk_token_id
    colour_ids = {c: tok.tok.convert_tokens_to_ids(c) for c in COLORS}
    assert len(set(colour_ids.values())) == len(COLORS) and unk not in colour_ids.values()
    longest = 0
    for name in TASKS:
        for seed in range(12):
            text = TabletopEnv(name, seed).reset().instruction
            ids, valid = tok.encode(text)
            longest = max(longest, int(valid.sum()))
            assert unk not in ids[valid], text
            # the target colours appear as their own tokens, in the order the task names them
            seen = [c for i in ids[valid] for c, cid in colour_ids.items() if i == cid]
            assert seen == list(TASKS[name].targets), (text, seen)
    assert longest <= 16
    # words outside the task vocabulary are [UNK], not an error; case and punctuation are normalised
    ids, valid = tok.encode('Grab the RED thing!')
    assert list(ids[valid]).count(unk) == 3 and colour_ids['red'] in ids[valid]
    assert set(task_vocabulary()) >= {'touch', 'then', 'finally', ','}


def test_word_backbone_builds_a_policy_and_is_seeded(backbone, tmp_path):
    cfg = tiny_config(backbone_path=str(backbone), text_tokenizer='auto', max_text_tokens=20)
    policy = BlockVLAPolicy(cfg)
    assert policy.llm.config.model_type == 'llama'
    assert policy.llm.config.vocab_size >= len(task_vocabulary()) + 3
    again = write_word_backbone(tmp_path / 'again', hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=64)
    other = write_word_backbone(tmp_path / 'other', hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=64, seed=1)
    a, b, c = (load_file(str(p / 'model.safetensors')) for p in (backbone, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match='must divide'):
        write_word_backbone(tmp_path / 'bad', hidden_size=30, num_heads=4)
    assert not (tmp_path / 'bad').exists()


def test_sincos_positions_are_a_distinct_smooth_grid():
    grid = sincos_grid(4, 16)
    assert grid.shape == (16, 16)
    dist = torch.cdist(grid, grid)
    assert dist[~torch.eye(16, dtype=bool)].min() > 0.1  # every patch its own code
    # neighbours are closer than far corners
    assert dist[0, 1] < dist[0, 3] and dist[0, 4] < dist[0, 12] and dist[0, 5] < dist[0, 15]
    enc = PatchEncoder(64, 16, 16, pos_embed='sincos')
    assert torch.equal(enc.pos.data[0], grid) and enc.pos.requires_grad
    assert PatchEncoder(64, 16, 16).pos.abs().max() < 0.2
    with pytest.raises(ValueError, match='divisible by 4'):
        tiny_config(vision={'type': 'patch', 'patch_size': 8, 'dim': 30, 'pos_embed': 'sincos'})
    with pytest.raises(ValueError, match="'learned' or 'sincos'"):
        tiny_config(vision={'type': 'patch', 'patch_size': 8, 'dim': 32, 'pos_embed': 'rope'})


def test_rendered_scene_labels_mark_each_object_centre():
    # 8x8 patches of 0.25 table units: two centres (>= 0.45 apart) never share one
    s = render_scenes(6, 64, 8, seed=3)
    assert s.images.shape == (6, 64, 64, 3) and s.images.dtype == np.uint8
    for i in range(6):
        assert sorted(s.labels[i][s.labels[i] > 0]) == [1, 2, 3, 4]  # each colour's centre in exactly one patch
        for patch in np.flatnonzero(s.labels[i]):
            row, col = divmod(patch, 8)
            centre = np.array([(col + 0.5 + s.offsets[i, patch, 0]) * 8, (row + 0.5 + s.offsets[i, patch, 1]) * 8])
            r, c = np.clip(centre.astype(int), 0, 63)[::-1]
            colour = s.images[i, r, c].astype(int)
            expected = {1: (220, 40, 40), 2: (40, 180, 60), 3: (40, 80, 230), 4: (235, 210, 40)}[s.labels[i, patch]]
            # the pixel at the labelled centre has the object's colour (or the effector drawn over it)
            assert np.abs(colour - expected).max() < 40 or colour.max() < 60, (i, patch, colour)
    assert not np.array_equal(render_scenes(2, 64, 8, seed=4).images, s.images[:2])


def test_pretrain_vision_learns_where_the_colours_are(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(vision={'type': 'patch', 'patch_size': 16, 'dim': 32, 'pos_embed': 'sincos'}, image_size=64)
    out = tmp_path / 'vision.safetensors'
    r = pretrain_patch_encoder(cfg, out, steps=150, scenes=600, batch_size=32)
    assert r['object_patch_accuracy_before'] < 0.5 < 0.8 < r['object_patch_accuracy'], r
    enc = PatchEncoder(64, 16, 32)
    load_vision_weights(enc, out)
    saved = load_file(str(out))
    assert all(torch.equal(enc.state_dict()[k], saved[k]) for k in saved)
    # a file for another vision config is refused by name
    with pytest.raises(ValueError, match='does not match model.vision'):
        load_vision_weights(PatchEncoder(64, 8, 32), out)
    with pytest.raises(FileNotFoundError, match='vision.init_from'):
        load_vision_weights(enc, tmp_path / 'missing.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match='not a readable safetensors'):
        load_vision_weights(enc, tmp_path / 'junk.safetensors')


def test_training_starts_from_init_from_and_the_cli_writes_both(tmp_path, capsys):
    bags = record(tmp_path / 'bags', episodes=2)
    vision = {'type': 'patch', 'patch_size': 16, 'dim': 32, 'pos_embed': 'sincos',
              'init_from': str(tmp_path / 'vision.safetensors')}
    cfg = make_config(tmp_path / 'run', [tmp_path / 'bags'], model={'vision': vision}, steps=2, save_interval=2)
    cfg.save(tmp_path / 'train.yaml')
    assert task_cli(['pretrain-vision', '--config', str(tmp_path / 'train.yaml'), '--out', vision['init_from'],
                     '--steps', '5', '--scenes', '40']) == 0
    assert 'held-out colour accuracy' in capsys.readouterr().out
    saved = load_file(vision['init_from'])
    # before any step the policy's encoder holds the file's weights (lr 0 keeps them)
    cfg0 = make_config(tmp_path / 'run0', [tmp_path / 'bags'], model={'vision': vision}, steps=1, lr=1e-12,
                       warmup_steps=0, weight_decay=0.0, save_interval=1)
    trained = BlockVLAPolicy.load(train(cfg0).checkpoint)
    for k, v in saved.items():
        assert torch.allclose(trained.vision.state_dict()[k], v, atol=1e-6), k
    assert bags and task_cli(['make-backbone', '--out', str(tmp_path / 'bb'), '--hidden-size', '32', '--layers',
                              '1', '--heads', '2', '--kv-heads', '1', '--intermediate-size', '64']) == 0
    assert (tmp_path / 'bb' / 'tokenizer.json').is_file() and (tmp_path / 'bb' / 'config.json').is_file()
    assert task_cli(['pretrain-vision', '--config', str(tmp_path / 'nope.yaml'), '--out', 'x']) == 2
