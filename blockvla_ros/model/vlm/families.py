"""What each supported VLM family is: its HF model types, which parts are which, what its pretraining did.

    family      model types                 language model            prefix attention   positions
    paligemma   paligemma (PaliGemma 1/2)   model.language_model      bidirectional      1-D, from 1
    idefics3    idefics3, smolvlm           model.text_model          causal             1-D
    qwen2_vl    qwen2_vl, qwen2_5_vl        model.language_model      causal             M-RoPE (3-D)

and how its processor builds a prompt: the text the HF processor tokenizes for one image and an instruction, with
the image placeholder already expanded to the image tokens (PaliGemma: "<image>"*N + BOS + text + "\\n";
Idefics3/SmolVLM: the chat template, "<image>" -> <fake><global-img><image>*N<fake>; Qwen2-VL: the chat template,
"<|image_pad|>" -> N of them).
"""
from __future__ import annotations

from typing import Optional

IMAGE_SIZE_FREE = (224, 224)  # Qwen2-VL's default fixed resolution when model.vlm_image_size is not given


def _size_list(value, name: str) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, int):
        value = [value, value]
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f'{name} must be [height, width] in pixels, got {value!r}')
    return int(value[0]), int(value[1])


class Family:
    name = 'abstract'
    model_types: tuple = ()
    prefix_lm = False  # True: the whole prefix attends bidirectionally (one span), else causal
    rope_dims = 1  # 3: multimodal rotary positions (Qwen2-VL)
    position_offset = 0
    slot_format = '{}'  # the instruction as its slot holds it (plain text around it that no special token delimits)
    add_special_tokens = True  # what the HF processor passes to the tokenizer for the whole prompt

    # --- parts ------------------------------------------------------------------------------------------------
    def language_model(self, hf_model):
        raise NotImplementedError

    def vision(self, hf_model, processor):
        raise NotImplementedError

    # --- image tokens -----------------------------------------------------------------------------------------
    def n_image_tokens(self, hf_config, processor) -> int:
        rows, cols = self.image_grid(hf_config, processor)
        return rows * cols

    def image_grid(self, hf_config, processor) -> tuple:
        """(rows, cols) of the image tokens the language model sees."""
        raise NotImplementedError

    def processor_config(self, saved: dict, hf_config, image_size: Optional[tuple]) -> dict:
        """The processor config of the policy: the saved one (or defaults) at one fixed resolution."""
        raise NotImplementedError

    # --- prompt -----------------------------------------------------------------------------------------------
    def prompt(self, instruction: str, n_image_tokens: int, tokenizer, chat_template: Optional[str]) -> str:
        """The text the HF processor tokenizes for one image (placeholder expanded) and `instruction`."""
        raise NotImplementedError

    def image_token_id(self, hf_config) -> int:
        for key in ('image_token_id', 'image_token_index'):
            value = getattr(hf_config, key, None)
            if value is not None:
                return int(value)
        raise ValueError(f'{self.name}: the model config names no image token id')


def _render(chat_template: Optional[str], family: str, instruction: str, tokenizer) -> str:
    if not chat_template:
        raise ValueError(f'{family}: the VLM folder has no chat template (chat_template.jinja, chat_template.json or '
                         'tokenizer_config.json); the prompt format cannot be rebuilt')
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': instruction}]}]
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=chat_template,
                                        add_generation_prompt=True, **specials)
    return rendered[0]


class PaliGemma(Family):
    name = 'paligemma'
    model_types = ('paligemma',)
    prefix_lm = True  # image + prompt attend to each other
    position_offset = 1  # PaliGemma's positions are 1-indexed
    slot_format = '{}\n'
    add_special_tokens = False  # the processor turns the tokenizer's BOS/EOS adding off and writes BOS itself

    def language_model(self, hf_model):
        return hf_model.model.language_model

    def vision(self, hf_model, processor):
        from .vision import PaliGemmaVision

        return PaliGemmaVision(hf_model)

    def image_grid(self, hf_config, processor) -> tuple:
        v = hf_config.vision_config
        return v.image_size // v.patch_size, v.image_size // v.patch_size

    def processor_config(self, saved: dict, hf_config, image_size) -> dict:
        side = int(hf_config.vision_config.image_size)
        cfg = {'image_processor_type': 'SiglipImageProcessor', **saved}
        size = cfg.setdefault('size', {'height': side, 'width': side})
        if (int(size.get('height', 0)), int(size.get('width', 0))) != (side, side):
            raise ValueError(f'paligemma: processor size {size} differs from the vision tower ({side}x{side})')
        if image_size not in (None, (side, side)):
            raise ValueError(f'paligemma: model.vlm_image_size {list(image_size)} differs from the pretrained '
                             f'resolution {side}x{side} (its position embeddings fix it)')
        return cfg

    def prompt(self, instruction, n_image_tokens, tokenizer, chat_template) -> str:
        return '<image>' * n_image_tokens + tokenizer.bos_token + self.slot_format.format(instruction)


class Idefics3(Family):
    name = 'idefics3'
    model_types = ('idefics3', 'smolvlm')

    def language_model(self, hf_model):
        return hf_model.model.text_model

    def vision(self, hf_model, processor):
        from .vision import Idefics3Vision

        return Idefics3Vision(hf_model)

    def image_grid(self, hf_config, processor) -> tuple:
        v = hf_config.vision_config
        side = v.image_size // v.patch_size // int(hf_config.scale_factor)
        return side, side

    def processor_config(self, saved: dict, hf_config, image_size) -> dict:
        side = int(hf_config.vision_config.image_size)
        default_type = 'SmolVLMImageProcessor' if hf_config.model_type == 'smolvlm' else 'Idefics3ImageProcessor'
        cfg = {'image_processor_type': default_type, **saved}
        # static shapes: no splitting; the first resize goes straight to the tower's side (instead of, e.g.,
        # up to 2048 px and back down to 512 with splitting off)
        cfg['do_image_splitting'] = False
        cfg['max_image_size'] = {'longest_edge': side}
        cfg['size'] = {'longest_edge': side}
        if image_size not in (None, (side, side)):
            raise ValueError(f'{hf_config.model_type}: model.vlm_image_size {list(image_size)} differs from the '
                             f'vision tower\'s {side}x{side}')
        return cfg

    def prompt(self, instruction, n_image_tokens, tokenizer, chat_template) -> str:
        text = _render(chat_template, self.name, instruction, tokenizer)
        if text.count('<image>') != 1:
            raise ValueError(f'{self.name}: the chat template should place one <image>, got {text!r}')
        image = '<fake_token_around_image><global-img>' + '<image>' * n_image_tokens + '<fake_token_around_image>'
        return text.replace('<image>', image)


class Qwen2VL(Family):
    name = 'qwen2_vl'
    model_types = ('qwen2_vl', 'qwen2_5_vl')
    rope_dims = 3

    def language_model(self, hf_model):
        return hf_model.model.language_model

    def vision(self, hf_model, processor):
        from ...runtime.image_processors import Qwen2VLProcessor
        from .vision import Qwen2VLVision

        return Qwen2VLVision(hf_model, Qwen2VLProcessor(processor).grid_thw)

    def image_grid(self, hf_config, processor) -> tuple:
        h, w = processor['grid_hw']
        factor = int(processor.get('patch_size', 14)) * int(processor.get('merge_size', 2))
        return h // factor, w // factor

    def processor_config(self, saved: dict, hf_config, image_size) -> dict:
        v = hf_config.vision_config
        cfg = {'image_processor_type': 'Qwen2VLImageProcessor', **saved}
        for key, value in (('patch_size', v.patch_size), ('merge_size', v.spatial_merge_size),
                           ('temporal_patch_size', v.temporal_patch_size)):
            if int(cfg.setdefault(key, value)) != int(value):
                raise ValueError(f'{self.name}: processor {key} {cfg[key]} differs from the vision config ({value})')
        factor = int(v.patch_size) * int(v.spatial_merge_size)
        hw = image_size or IMAGE_SIZE_FREE
        if hw[0] % factor or hw[1] % factor:
            raise ValueError(f'{self.name}: model.vlm_image_size {list(hw)} must be multiples of patch_size * '
                             f'merge_size = {factor}')
        cfg['grid_hw'] = [int(hw[0]), int(hw[1])]
        return cfg

    def prompt(self, instruction, n_image_tokens, tokenizer, chat_template) -> str:
        text = _render(chat_template, self.name, instruction, tokenizer)
        if text.count('<|image_pad|>') != 1:
            raise ValueError(f'{self.name}: the chat template should place one <|image_pad|>, got {text!r}')
        return text.replace('<|image_pad|>', '<|image_pad|>' * n_image_tokens)


FAMILIES = (PaliGemma(), Idefics3(), Qwen2VL())


def family_of(model_type: str) -> Family:
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f'VLM model_type {model_type!r} is not supported; supported: {supported}')
