"""Each VLM family, split into the policy's parts, computes what the HF model computes on the HF processor's prompt.

Random VLM folders (model.vlm.random_folder: save_pretrained layout, real tokenizer classes) for PaliGemma,
PaliGemma2, SmolVLM, Idefics3, Qwen2-VL and Qwen2.5-VL. Checked against the family's own HF processor and model:
the prompt layout (template ids, image token count), the vision part (= get_image_features), the positions
(Qwen2-VL's get_rope_index; PaliGemma's 1-indexed positions), and the language model's hidden states over the
prefix with our explicit mask and positions, the instruction slot left-padded (= the HF forward on the unpadded
prompt, PaliGemma with its prefix-LM token_type_ids).
"""
import numpy as np
import pytest
import torch

from blockvla_ros.model.vlm.layout import PromptLayout, Segment
from blockvla_ros.model.vlm.load import load_vlm
from blockvla_ros.model.vlm.random_folder import write_random_vlm
from blockvla_ros.runtime.image_processors import build_image_processor

from vlm_reference import hf_inputs, hf_prefix_hidden, hf_processor

SLOT = 12
QWEN_HW = [56, 84]  # a 2 x 3 grid of merged image tokens
SHAPES = ['paligemma-tiny', 'paligemma2-tiny', 'smolvlm-tiny', 'idefics3-tiny', 'qwen2_vl-tiny', 'qwen2_5_vl-tiny']
INSTRUCTION = 'put the green bowl on the plate'


def _attn(shape):
    return 'eager' if shape == 'paligemma2-tiny' else 'sdpa'


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('vlms')
    return {s: write_random_vlm(root / s, s, seed=1) for s in SHAPES}


def _parts(folders, shape, **kw):
    image_size = QWEN_HW if shape.startswith('qwen') else None
    return load_vlm(folders[shape], slot_len=SLOT, state=False, image_size=image_size,
                    attn_implementation=_attn(shape), **kw)


def _slot(tokenizer, layout, text):
    ids = tokenizer(layout.slot_format.format(text), add_special_tokens=False)['input_ids']
    slot_ids = np.zeros((1, layout.slot_len), np.int64)
    slot_valid = np.zeros((1, layout.slot_len), bool)
    slot_ids[0, -len(ids):], slot_valid[0, -len(ids):] = ids, True  # left-padded
    return slot_ids, slot_valid


def _image(parts, rng):
    h, w = (QWEN_HW if parts.family.name == 'qwen2_vl' else (45, 61))
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _ours(parts, folder, image, instruction):
    """Prefix hidden states [1, P, hidden] and validity [P] through the split parts, as the policy runs them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    lay = parts.layout
    slot_ids, slot_valid = _slot(tok, lay, instruction)
    pixels = torch.from_numpy(build_image_processor(parts.processor)(image))  # [1, ...]: one image
    valid = lay.valid(slot_valid)  # [1, P]
    with torch.no_grad():
        image_tokens = parts.vision(pixels)  # [1, Ni, hidden]
        embeds = parts.language_model.get_input_embeddings()(torch.from_numpy(lay.template_ids(slot_ids)))
        a, b = lay.span_of('image')
        embeds = torch.cat([embeds[:, :a], image_tokens, embeds[:, b:]], 1)
        pos = torch.from_numpy(lay.positions(valid))  # [1, P] or [3, 1, P]
        mask = torch.from_numpy(lay.attention(valid))[:, None]  # [1, 1, P, P]
        if _attn_impl(parts) == 'eager':  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        out = parts.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
    return out.last_hidden_state, valid[0], image_tokens


def _attn_impl(parts):
    return parts.language_model.config._attn_implementation


@pytest.mark.parametrize('shape', SHAPES)
def test_prefix_matches_the_hf_model_on_its_own_prompt(folders, shape):
    from transformers import AutoModelForImageTextToText

    folder = folders[shape]
    parts = _parts(folders, shape)
    image = _image(parts, np.random.default_rng(0))
    proc = hf_processor(folder, parts)
    inputs = hf_inputs(proc, parts, image, INSTRUCTION)
    ids = inputs['input_ids'][0].tolist()
    lay = parts.layout
    # the layout is the processor's prompt, the slot's padding removed
    from transformers import AutoTokenizer

    slot_ids, slot_valid = _slot(AutoTokenizer.from_pretrained(folder), lay, INSTRUCTION)
    image_id = parts.family.image_token_id(parts.hf_config)
    ours = lay.template_ids(slot_ids, fill=image_id)[0][lay.valid(slot_valid)[0]]
    assert ours.tolist() == ids
    # the image processor: our numpy pixels are the HF processor's
    hf_pixels = inputs['pixel_values'].numpy()
    np_pixels = build_image_processor(parts.processor)(image)
    assert hf_pixels.size == np_pixels.size and np.abs(hf_pixels.reshape(np_pixels.shape) - np_pixels).max() <= 1e-5
    hf_model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True,
                                                           attn_implementation=_attn(shape)).eval()
    hidden, valid, image_tokens = _ours(parts, folder, image, INSTRUCTION)
    # the vision part is the model's get_image_features
    kw = {k: inputs[k] for k in ('image_grid_thw',) if k in inputs}
    with torch.no_grad():
        feats = hf_model.model.get_image_features(inputs['pixel_values'], **kw).pooler_output
    feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
    assert torch.allclose(image_tokens.reshape(-1), feats.reshape(-1), atol=1e-5)
    reference = hf_prefix_hidden(hf_model, inputs)  # [1, T, hidden]
    assert reference.shape[1] == int(valid.sum())
    diff = (hidden[0, torch.from_numpy(valid)] - reference[0]).abs().max().item()
    assert diff <= 1e-4, f'{shape}: prefix hidden states differ from the HF model by {diff}'


@pytest.mark.parametrize('shape', ['qwen2_vl-tiny', 'qwen2_5_vl-tiny'])
def test_mrope_positions_are_get_rope_index(folders, shape):
    from transformers import AutoModelForImageTextToText

    parts = _parts(folders, shape)
    proc = hf_processor(folders[shape], parts)
    hf_model = AutoModelForImageTextToText.from_pretrained(folders[shape], local_files_only=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[shape])
    image = _image(parts, np.random.default_rng(1))
    for text in ('stack the blocks', 'touch the yellow circle then the purple square'):
        inputs = hf_inputs(proc, parts, image, text)
        ref, delta = hf_model.model.get_rope_index(inputs['input_ids'], inputs['mm_token_type_ids'],
                                                   image_grid_thw=inputs['image_grid_thw'])
        slot_ids, slot_valid = _slot(tok, parts.layout, text)
        valid = parts.layout.valid(slot_valid)[0]  # [P]
        ours = parts.layout.positions(valid)  # [3, P]
        assert (ours[:, valid] == ref[:, 0].numpy()).all()
        # actions continue the temporal axis where generation would: max position + 1, on all three axes
        first = int(ref.max()) + 1
        assert (parts.layout.action_positions(valid, 0, 5) == first + np.arange(5)).all()
        assert parts.layout.next_position(valid) == ref.shape[-1] + int(delta)


def test_paligemma_positions_count_from_one_and_the_prefix_is_bidirectional(folders):
    lay = _parts(folders, 'paligemma-tiny').layout
    assert {s.span for s in lay.segments} == {'prefix'} and lay.position_offset == 1
    text_valid = np.zeros((1, SLOT), bool)
    text_valid[0, -3:] = True
    valid = lay.valid(text_valid)  # [1, P]
    n_valid = lay.length - SLOT + 3
    assert lay.positions(valid)[0][valid[0]].tolist() == list(range(1, n_valid + 1))
    assert lay.action_positions(valid[0], 2, 2).tolist() == [n_valid + 3, n_valid + 4]
    mask = lay.attention(valid)[0]
    assert mask[0, lay.length - 1] and mask[lay.length - 1, 0]  # image sees the prompt and vice versa
    a, _ = lay.span_of('text')
    assert mask[:, a].sum() == 1 and mask[a, a]  # a padding key is attended by itself only


def test_action_head_rows_and_lm_parts(folders):
    parts = _parts(folders, 'smolvlm-tiny')
    vocab = parts.hf_config.get_text_config().vocab_size
    assert parts.lm_head.shape == (vocab, parts.hf_config.get_text_config().hidden_size)
    assert parts.softcap is None
    assert _parts(folders, 'paligemma2-tiny').softcap == 30.0


def test_layout_round_trips_and_refuses_bad_layouts():
    lay = PromptLayout(segments=(Segment('t', 2, 'fixed', ids=(5, 6)), Segment('image', 6, 'image'),
                                 Segment('text', 4, 'text'), Segment('state', 1, 'state')),
                       rope_dims=3, image_grid=(2, 3))
    assert PromptLayout.from_dict(lay.to_dict()) == lay
    with pytest.raises(ValueError, match='image_grid'):
        PromptLayout(segments=(Segment('image', 6, 'image'), Segment('text', 4, 'text')), rope_dims=3,
                     image_grid=(2, 2))
    with pytest.raises(ValueError, match='exactly one image'):
        PromptLayout(segments=(Segment('text', 4, 'text'),))
    with pytest.raises(ValueError, match='last'):
        PromptLayout(segments=(Segment('state', 1, 'state'), Segment('image', 1, 'image'),
                               Segment('text', 4, 'text')))
    with pytest.raises(ValueError, match='one id per slot'):
        Segment('t', 2, 'fixed', ids=(1,))
    with pytest.raises(ValueError, match='slot'):
        lay.valid(np.ones((1, 3), bool))


def test_unsupported_model_type_is_named(tmp_path):
    with pytest.raises(ValueError, match='not supported'):
        load_vlm(spec={'model_type': 'llava'}, slot_len=4, state=False)
    with pytest.raises(FileNotFoundError, match='not a folder'):
        load_vlm(tmp_path / 'missing', slot_len=4, state=False)


def test_a_hub_cache_folder_or_a_folder_without_config_json_is_named(tmp_path):
    """The hub cache's repo folder (models--org--name, what ~/.cache/huggingface/hub holds) is the folder users
    point at; transformers answered 'Unrecognized model ... Should have a `model_type` key in its config.json'
    about a config.json that is not there. Both model paths say what is missing and where the snapshot is."""
    from blockvla_ros.model.policy import build_backbone

    from tiny import tiny_config

    repo = tmp_path / 'models--HuggingFaceTB--SmolVLM2-256M-Video-Instruct'
    (repo / 'snapshots' / ('0' * 40)).mkdir(parents=True)
    (repo / 'blobs').mkdir()
    snapshot = str(repo / 'snapshots' / ('0' * 40))
    with pytest.raises(FileNotFoundError, match='hub cache') as info:
        load_vlm(repo, slot_len=4, state=False)
    assert 'model.vlm_path' in str(info.value) and snapshot in str(info.value)
    with pytest.raises(FileNotFoundError, match='hub cache') as info:
        build_backbone(tiny_config(backbone_path=str(repo)))
    assert 'model.backbone_path' in str(info.value) and snapshot in str(info.value)
    with pytest.raises(FileNotFoundError, match='no config.json') as info:
        load_vlm(tmp_path, slot_len=4, state=False)
    assert 'save_pretrained' in str(info.value)


def test_a_vlm_as_backbone_path_or_a_text_lm_as_vlm_path_names_the_other_key(folders, tmp_path):
    """The two README commands differ in one key; swapping them gave transformers' 'Unrecognized configuration class
    ... for AutoModelForCausalLM' followed by a list of 200 config classes, or 'VLM model_type qwen2 is not
    supported'."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from blockvla_ros.model.policy import build_backbone

    from tiny import QWEN2, tiny_config

    with pytest.raises(ValueError, match='model.vlm_path') as info:
        build_backbone(tiny_config(backbone_path=str(folders['smolvlm-tiny'])))
    assert 'vision-language' in str(info.value) and len(str(info.value)) < 400
    spec = dict(QWEN2)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop('model_type'), **spec)).save_pretrained(
        tmp_path / 'lm')
    with pytest.raises(ValueError, match='model.backbone_path') as info:
        load_vlm(tmp_path / 'lm', slot_len=4, state=False)
    assert 'no vision tower' in str(info.value)


@pytest.mark.parametrize('shape', ['paligemma-tiny', 'smolvlm-tiny', 'qwen2_vl-tiny'])
def test_slot_tokenizer_is_the_hf_tokenizer_without_transformers(folders, shape):
    from transformers import AutoTokenizer

    from blockvla_ros.model.vlm.slot_tokenizer import slot_tokenizer

    parts = _parts(folders, shape)
    ours = slot_tokenizer(folders[shape], 48, parts.layout.to_dict())
    hf = AutoTokenizer.from_pretrained(folders[shape])
    for text in ('pick up the red cube', 'Push  the BLUE block, then stop!', 'déplace le bras à gauche'):
        ids, valid = ours.encode(text)
        expected = hf(parts.layout.slot_format.format(text), add_special_tokens=False)['input_ids']
        assert ids[valid].tolist() == expected and valid[-len(expected):].all()  # left-padded
    special = '<image>' if shape != 'qwen2_vl-tiny' else '<|im_end|>'
    with pytest.raises(ValueError, match='special tokens'):
        ours.encode(f'pick {special} up')
    with pytest.raises(ValueError, match='at most'):
        ours.encode('stack the blocks ' * 40)


@pytest.mark.parametrize('shape', ['paligemma-tiny', 'qwen2_vl-tiny'])
def test_traceable_masks_and_positions_equal_the_numpy_layout(folders, shape):
    from blockvla_ros.model.masks import position_ids, training_mask

    lay = _parts(folders, shape).layout
    text_valid = np.zeros((2, SLOT), bool)
    text_valid[0, -3:], text_valid[1, -7:] = True, True
    valid = lay.valid(text_valid)  # [2, P]
    pos = position_ids(torch.from_numpy(valid), 5, 2, lay).numpy()  # [(3,) 2, P + 10]
    p = lay.length
    assert np.array_equal(pos[..., :p], lay.positions(valid))
    for i in range(2):
        acts = lay.action_positions(valid[i], 0, 5)
        assert np.array_equal(pos[..., i, p:p + 5], acts) and np.array_equal(pos[..., i, p + 5:], acts)
    mask = training_mask(torch.from_numpy(valid), 6, 3, 'blockdiff', lay).numpy()  # [2, 1, T, T]
    assert np.array_equal(mask[:, 0, :p, :p], lay.attention(valid))
    assert not mask[:, 0, :p, p:].any() and (mask[:, 0, p:, :p] == valid[:, None, :]).all()
