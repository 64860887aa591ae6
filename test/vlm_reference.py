"""The HF side of the VLM tests: each family's own processor and model on a random VLM folder.

Two processors cannot be built as they are on this machine: Qwen2-VL's and SmolVLM's insist on a video processor,
which needs torchvision (no CPU build of it matches the pinned CPU torch here). Qwen2-VL's processor is built with
the video processor left out (the check of that argument is skipped; images never touch it). SmolVLM's also needs
`num2words`; a SmolVLM folder is checked with Idefics3's processor instead, whose single-image prompt is the same
code (`<fake_token_around_image><global-img><image>*N<fake_token_around_image>`) and chat template handling.
"""
from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def _no_video_processor():
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        if name == 'video_processor' and arg is None:
            return None
        return original(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def hf_processor(folder, parts):
    """The family's HF processor over the folder's tokenizer and PIL image processor at the policy's settings."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from blockvla_ros.model.vlm.load import read_chat_template

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model_type = parts.hf_config.model_type
    template = read_chat_template(folder)
    if model_type == 'paligemma':
        from transformers import PaliGemmaProcessor

        ip = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend='pil')
        return PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer)
    if model_type in ('smolvlm', 'idefics3'):
        from transformers import Idefics3Processor

        fixed = {k: parts.processor[k] for k in ('do_image_splitting', 'max_image_size', 'size')}
        ip = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend='pil', **fixed)
        return Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=parts.layout.n_image_tokens,
                                 chat_template=template)
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = Qwen2VLProcessor if model_type == 'qwen2_vl' else Qwen2_5_VLProcessor
    ip = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend='pil')
    with _no_video_processor():
        return cls(image_processor=ip, tokenizer=tokenizer, video_processor=None, chat_template=template)


def hf_inputs(processor, parts, image: np.ndarray, instruction: str) -> dict:
    """What the HF processor gives the HF model for one image and `instruction` (torch tensors)."""
    model_type = parts.hf_config.model_type
    if model_type == 'paligemma':
        text = instruction  # the processor writes "<image>"*N + BOS + text + "\n" itself
    else:
        messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': instruction}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return dict(processor(images=[image], text=[text], return_tensors='pt'))


def hf_prefix_hidden(hf_model, inputs: dict):
    """The HF model's last hidden states [1, T, hidden] over the processor's prompt (its own masks/positions)."""
    import torch

    keep = {k: v for k, v in inputs.items() if k in ('input_ids', 'attention_mask', 'pixel_values', 'token_type_ids',
                                                     'pixel_attention_mask', 'image_grid_thw', 'mm_token_type_ids')}
    with torch.no_grad():
        return hf_model.model(**keep).last_hidden_state
