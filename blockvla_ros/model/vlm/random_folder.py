"""Random-weight VLM folders in a family's exact `save_pretrained` layout, with a small trained tokenizer.

Nothing is downloaded: the tests and the real-shape benchmark write a folder that loads like the real checkpoint
(config.json + model.safetensors, preprocessor_config.json, processor_config.json, the chat template and the
tokenizer files of the family's tokenizer class: GemmaTokenizer, GPT2Tokenizer, Qwen2Tokenizer), only with random
weights and a BPE vocabulary of a few hundred tokens trained on robot instructions.

    shape            model type     what it is
    paligemma-tiny   paligemma      SigLIP 32 px / patch 8 (16 image tokens) + Gemma, hidden 64
    paligemma2-tiny  paligemma      the same with a Gemma2 language model
    smolvlm-tiny     smolvlm        SmolVLM vision 32 px / patch 8, pixel shuffle 2 (4 image tokens) + Llama
    idefics3-tiny    idefics3       the same in Idefics3's layout
    qwen2_vl-tiny    qwen2_vl       Qwen2-VL vision (patch 14, merge 2) + M-RoPE text model, hidden 64
    qwen2_5_vl-tiny  qwen2_5_vl     Qwen2.5-VL (windowed vision attention) + M-RoPE text model
    smolvlm2-256m    smolvlm        SmolVLM2-256M's shapes (256 M parameters, 1.0 GB in fp32)
"""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = ('pick up the red cube', 'push the blue block to the left', 'put the green bowl on the plate',
          'move the arm up and right', 'open the drawer', 'close the gripper', 'touch the yellow circle then the '
          'purple square', 'place the orange triangle next to the cube', 'stack the blocks', 'You are a helpful '
          'assistant.', 'system user assistant User Assistant', 'what is in the image? describe it.')

SMOLVLM_TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content']"
                    "[0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}"
                    "{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}"
                    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}"
                    "{{ 'Assistant:' }}{% endif %}")
QWEN2_VL_TEMPLATE = ("{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
                     "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
                     "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
                     "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                     "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
                     "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SMOL_SPECIALS = ['<|im_start|>', '<end_of_utterance>', '<fake_token_around_image>', '<image>', '<global-img>']
QWEN_SPECIALS = ['<|im_start|>', '<|im_end|>', '<|vision_start|>', '<|vision_end|>', '<|image_pad|>',
                 '<|video_pad|>']

_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
_TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                    image_size=32)
_MROPE = {'rope_type': 'default', 'rope_theta': 10000.0, 'mrope_section': [4, 2, 2]}  # head_dim 16: 8 = 4+2+2

SHAPES = {
    'paligemma-tiny': ('paligemma', dict(vision_config=dict(model_type='siglip_vision_model', **_TINY_SIGLIP),
                                         text_config=dict(model_type='gemma', head_dim=16, **_TINY_TEXT))),
    'paligemma2-tiny': ('paligemma', dict(vision_config=dict(model_type='siglip_vision_model', **_TINY_SIGLIP),
                                          text_config=dict(model_type='gemma2', head_dim=16, sliding_window=512,
                                                           attn_logit_softcapping=None,
                                                           final_logit_softcapping=30.0, **_TINY_TEXT))),
    'smolvlm-tiny': ('smolvlm', dict(scale_factor=2, vision_config=dict(model_type='smolvlm_vision', **_TINY_SIGLIP),
                                     text_config=dict(model_type='llama', **_TINY_TEXT))),
    'idefics3-tiny': ('idefics3', dict(scale_factor=2,
                                       vision_config=dict(model_type='idefics3_vision', **_TINY_SIGLIP),
                                       text_config=dict(model_type='llama', **_TINY_TEXT))),
    'qwen2_vl-tiny': ('qwen2_vl', dict(vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2,
                                                          mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                                                          temporal_patch_size=2),
                                       text_config=dict(rope_parameters=_MROPE, **_TINY_TEXT))),
    'qwen2_5_vl-tiny': ('qwen2_5_vl', dict(vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64,
                                                              intermediate_size=64, num_heads=2, patch_size=14,
                                                              spatial_merge_size=2, temporal_patch_size=2,
                                                              window_size=56, fullatt_block_indexes=[1]),
                                           text_config=dict(rope_parameters=_MROPE, **_TINY_TEXT))),
    'smolvlm2-256m': ('smolvlm', dict(scale_factor=4, vocab_size=49280,
                                      vision_config=dict(model_type='smolvlm_vision', hidden_size=768,
                                                         intermediate_size=3072, num_hidden_layers=12,
                                                         num_attention_heads=12, patch_size=16, image_size=512),
                                      text_config=dict(model_type='llama', vocab_size=49280, hidden_size=576,
                                                       intermediate_size=1536, num_hidden_layers=30,
                                                       num_attention_heads=9, num_key_value_heads=3,
                                                       max_position_embeddings=8192, rope_theta=100000.0,
                                                       rms_norm_eps=1e-5, tie_word_embeddings=True))),
}


def _train_bpe(byte_level: bool, specials: list, vocab_size: int = 420) -> tuple[dict, list]:
    """A BPE vocabulary + merges on CORPUS: byte-level (GPT2/Qwen2) or SentencePiece-style ('▁', byte fallback)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.Replace(' ', '▁')
        tok.pre_tokenizer = pre_tokenizers.Split(pattern='▁', behavior='merged_with_next')
        alphabet = sorted(set(''.join(CORPUS).replace(' ', '▁')) | set('0123456789.,?!:\n'))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(list(CORPUS) * 4, trainer)
    model = json.loads(tok.to_str())['model']
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(' ')) for m in model['merges']]
    return dict(model['vocab']), merges


def build_tokenizer(model_type: str):
    """The family's tokenizer class over a small trained BPE, with its special tokens."""
    if model_type == 'paligemma':
        from transformers import GemmaTokenizer

        specials = ['<pad>', '<eos>', '<bos>', '<unk>', '<mask>']
        vocab, merges = _train_bpe(False, specials)
        for b in range(256):  # byte fallback pieces, as SentencePiece vocabularies hold them
            vocab.setdefault(f'<0x{b:02X}>', len(vocab))
        tok = GemmaTokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({'additional_special_tokens': ['<image>']})
        return tok
    if model_type in ('smolvlm', 'idefics3'):
        from transformers import GPT2Tokenizer

        vocab, merges = _train_bpe(True, ['<|endoftext|>'])
        tok = GPT2Tokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({'additional_special_tokens': SMOL_SPECIALS})
        tok.add_tokens([f'<row_{r}_col_{c}>' for r in range(1, 7) for c in range(1, 7)])
        return tok
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(True, ['<|endoftext|>'])
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({'additional_special_tokens': QWEN_SPECIALS})
    return tok


def _image_processor(model_type: str, config):
    if model_type == 'paligemma':
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        side = config.vision_config.image_size
        proc = SiglipImageProcessorPil(size={'height': side, 'width': side})
        proc.image_seq_length = config.text_config.num_image_tokens
        return proc, {'processor_class': 'PaliGemmaProcessor'}
    if model_type in ('smolvlm', 'idefics3'):
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        side = config.vision_config.image_size
        # the checkpoints' own settings: splitting on, first resize up to 4x the tile (the policy turns both off)
        proc = SmolVLMImageProcessorPil(size={'longest_edge': 4 * side}, max_image_size={'longest_edge': side})
        if model_type == 'idefics3':
            proc_dict = proc.to_dict()
            proc_dict['image_processor_type'] = 'Idefics3ImageProcessor'
            proc = proc_dict
        seq = (side // config.vision_config.patch_size) ** 2 // config.scale_factor ** 2
        cls = 'SmolVLMProcessor' if model_type == 'smolvlm' else 'Idefics3Processor'
        return proc, {'processor_class': cls, 'image_seq_len': seq}
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cls = 'Qwen2VLProcessor' if model_type == 'qwen2_vl' else 'Qwen2_5_VLProcessor'
    return Qwen2VLImageProcessorPil(), {'processor_class': cls}


def _config(model_type: str, spec: dict, tokenizer):
    from transformers import AutoConfig

    spec = json.loads(json.dumps(spec))
    text = spec['text_config']
    vocab = spec.pop('vocab_size', None) or 8 * -(-len(tokenizer) // 8)  # room to spare, a multiple of 8
    text['vocab_size'] = vocab
    image_id = tokenizer.convert_tokens_to_ids('<|image_pad|>' if model_type.startswith('qwen') else '<image>')
    if model_type == 'paligemma':
        spec.update(image_token_index=image_id, vocab_size=vocab, projection_dim=text['hidden_size'],
                    hidden_size=text['hidden_size'])
        text.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    elif model_type in ('smolvlm', 'idefics3'):
        spec.update(image_token_id=image_id)
        text.update(pad_token_id=None, bos_token_id=tokenizer.convert_tokens_to_ids('<|im_start|>'),
                    eos_token_id=tokenizer.convert_tokens_to_ids('<end_of_utterance>'))
    else:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
        spec.update(image_token_id=image_id, video_token_id=ids['<|video_pad|>'],
                    vision_start_token_id=ids['<|vision_start|>'], vision_end_token_id=ids['<|vision_end|>'])
        text.update(bos_token_id=tokenizer.convert_tokens_to_ids('<|endoftext|>'),
                    eos_token_id=ids['<|im_end|>'])
        spec['vision_config']['out_hidden_size' if model_type == 'qwen2_5_vl' else 'hidden_size'] = \
            text['hidden_size']
    return AutoConfig.for_model(model_type, **spec)


def write_random_vlm(out, shape: str, seed: int = 0) -> Path:
    """Write a random-init VLM of `shape` (see SHAPES) with its processor and tokenizer files to `out`
    (atomically: an existing folder is replaced only once the new one is complete). Returns the folder."""
    import torch
    from transformers import AutoModelForImageTextToText

    from ...io.atomic import atomic_directory

    if shape not in SHAPES:
        raise ValueError(f'unknown VLM shape {shape!r}; known: {sorted(SHAPES)}')
    model_type, spec = SHAPES[shape]
    tokenizer = build_tokenizer(model_type)
    config = _config(model_type, spec, tokenizer)
    torch.manual_seed(seed)
    attn = 'eager' if config.get_text_config().model_type == 'gemma2' else 'sdpa'  # Gemma2 has no sdpa path
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn)
    image_processor, processor_cfg = _image_processor(model_type, config)
    out = Path(out)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if isinstance(image_processor, dict):
            (tmp / 'preprocessor_config.json').write_text(json.dumps(image_processor, indent=2))
        else:
            image_processor.save_pretrained(tmp)
        (tmp / 'processor_config.json').write_text(json.dumps(processor_cfg, indent=2))
        template = {'paligemma': None, 'qwen2_vl': QWEN2_VL_TEMPLATE, 'qwen2_5_vl': QWEN2_VL_TEMPLATE}.get(
            model_type, SMOLVLM_TEMPLATE)
        if template:
            (tmp / 'chat_template.jinja').write_text(template)
    return out
