"""Loading a pretrained VLM (local folder or config dict) and splitting it into the parts a policy uses.

    VLMParts.vision           its vision tower + connector (pixels -> image tokens in the LM's embedding space)
    VLMParts.language_model   its language model without the LM head: the backbone
    VLMParts.lm_head          the LM head's weight (initialises the action head from the last n_bins rows)
    VLMParts.layout           its prompt with the instruction slot (model.vlm.layout.PromptLayout)
    VLMParts.processor        its image processor config at the policy's fixed resolution

A folder is read the way `save_pretrained` wrote it, with `local_files_only` and never `trust_remote_code`. The prompt
layout comes from the folder's tokenizer and chat template: the prompt of two probe instructions is tokenized as
the HF processor does, and the template around the instruction must come out the same both times (else the error
says where it differs).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...paths import pretrained_folder
from .families import Family, _size_list, family_of
from .layout import PromptLayout, Segment

log = logging.getLogger(__name__)

PROBES = ('pick up the red cube', 'move the arm to the left of the blue bowl')
CHAT_TEMPLATE_FILES = ('chat_template.jinja', 'chat_template.json', 'processor_config.json', 'tokenizer_config.json')


@dataclass
class VLMParts:
    family: Family
    hf_config: object
    vision: object  # nn.Module
    language_model: object  # nn.Module
    lm_head: object  # torch.Tensor [vocab, hidden] or None
    layout: PromptLayout
    processor: dict
    softcap: Optional[float]  # final logit soft-capping of the LM head (Gemma2), kept for the action head


def vlm_config_dict(hf_config) -> dict:
    """A config dict that rebuilds the VLM without its folder (saved with checkpoints)."""
    d = hf_config.to_diff_dict()
    for k in ('architectures', 'transformers_version', '_name_or_path', 'torch_dtype', 'dtype'):
        d.pop(k, None)
    for sub in ('text_config', 'vision_config'):
        if isinstance(d.get(sub), dict):
            for k in ('transformers_version', '_name_or_path', 'torch_dtype', 'dtype', 'architectures'):
                d[sub].pop(k, None)
    d['model_type'] = hf_config.model_type
    return d


def _hf_model(path: Optional[Path], spec: Optional[dict], attn_implementation: str, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if path is not None:
        path = pretrained_folder(path, 'model.vlm_path')
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if getattr(config, 'vision_config', None) is None:
            raise ValueError(f'model.vlm_path {path} holds a {config.model_type} model with no vision tower: give a '
                             'text-only language model as model.backbone_path (with the built-in vision encoder)')
        family = family_of(config.model_type)
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                            dtype=torch.float32,
                                                            attn_implementation=attn_implementation)
        return family, config, model
    spec = dict(spec)
    model_type = spec.pop('model_type', None)
    if not model_type:
        raise ValueError('model.vlm needs a model_type (paligemma, idefics3, smolvlm, qwen2_vl, qwen2_5_vl)')
    family = family_of(model_type)
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation)
    return family, config, model.float()


def read_chat_template(folder: Path) -> Optional[str]:
    """The chat template saved in a VLM folder (processor or tokenizer files), or None."""
    for name in CHAT_TEMPLATE_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith('.jinja'):
            return f.read_text()
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f'{f}: not valid JSON ({e})') from None
        if isinstance(data, dict) and isinstance(data.get('chat_template'), str):
            return data['chat_template']
    return None


def read_processor_config(folder: Path) -> dict:
    f = folder / 'preprocessor_config.json'
    if not f.is_file():
        raise FileNotFoundError(f'{folder}: no preprocessor_config.json (the VLM\'s image processor settings)')
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{f}: not valid JSON ({e})') from None


def _runs(ids: list, token: int) -> list:
    """[(start, end)] of the maximal runs of `token` in `ids`."""
    out, start = [], None
    for i, t in enumerate(list(ids) + [None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            out.append((start, i))
            start = None
    return out


def _occurrences(ids: list, sub: list) -> list:
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]


def prompt_pieces(family: Family, tokenizer, chat_template, n_image: int, image_token_id: int,
                  instruction: str) -> tuple[list, list, list]:
    """(ids before the image tokens, ids between image and instruction, ids after the instruction) of the prompt
    the HF processor builds for `instruction`."""
    text = family.prompt(instruction, n_image, tokenizer, chat_template)
    ids = list(tokenizer(text, add_special_tokens=family.add_special_tokens)['input_ids'])
    runs = _runs(ids, image_token_id)
    if len(runs) != 1 or runs[0][1] - runs[0][0] != n_image:
        raise ValueError(f'{family.name}: the prompt should hold one run of {n_image} image tokens (id '
                         f'{image_token_id}), found runs {runs}: does the tokenizer know the image token?')
    slot = list(tokenizer(family.slot_format.format(instruction), add_special_tokens=False)['input_ids'])
    a, b = runs[0]
    found = [i for i in _occurrences(ids, slot) if i >= b]
    if len(found) != 1:
        raise ValueError(f'{family.name}: the instruction tokenized alone ({slot}) is not found once after the image '
                         f'in the whole prompt ({ids}); the tokenizer merges it with the template around it')
    s = found[0]
    return ids[:a], ids[b:s], ids[s + len(slot):]


def build_layout(family: Family, tokenizer, chat_template: Optional[str], n_image: int, image_grid: tuple,
                 image_token_id: int, slot_len: int, state: bool) -> PromptLayout:
    """The family's prompt around an instruction slot of `slot_len` tokens (see prompt_pieces)."""
    pieces = [prompt_pieces(family, tokenizer, chat_template, n_image, image_token_id, p) for p in PROBES]
    if pieces[0] != pieces[1]:
        raise ValueError(f'{family.name}: the prompt template around the instruction depends on the instruction '
                         f'({pieces[0]} vs {pieces[1]}); it cannot be a fixed layout')
    before, between, after = pieces[0]
    segs = [('template_0', 'fixed', before), ('image', 'image', n_image), ('template_1', 'fixed', between),
            ('text', 'text', slot_len), ('template_2', 'fixed', after)] + ([('state', 'state', 1)] if state else [])
    return _layout(family, segs, image_grid)


def bare_layout(family: Family, n_image: int, image_grid: tuple, slot_len: int, state: bool) -> PromptLayout:
    """[image][instruction][state]: for a `model.vlm` config dict without tokenizer files (tests)."""
    segs = [('image', 'image', n_image), ('text', 'text', slot_len)] + ([('state', 'state', 1)] if state else [])
    return _layout(family, segs, image_grid)


def _layout(family: Family, segments: list, image_grid: tuple) -> PromptLayout:
    """(name, source, length or ids) -> the family's layout; empty template pieces are left out."""
    span = 'prefix' if family.prefix_lm else None
    segs = [Segment(name, len(x), source, span, tuple(x)) if source == 'fixed' else Segment(name, x, source, span)
            for name, source, x in segments if source != 'fixed' or len(x)]
    return PromptLayout(segments=tuple(segs), rope_dims=family.rope_dims, position_offset=family.position_offset,
                        image_grid=tuple(image_grid) if family.rope_dims == 3 else (),
                        slot_format=family.slot_format)


def load_vlm(path=None, spec: Optional[dict] = None, *, slot_len: int, state: bool, image_size=None,
             layout: Optional[dict] = None, processor: Optional[dict] = None, attn_implementation: str = 'sdpa',
             seed: int = 0) -> VLMParts:
    """Build the VLM from `path` (a local folder) or `spec` (a config dict) and split it.

    `layout` / `processor`: already resolved (a checkpoint's config): used as they are, and checked against the
    model; otherwise resolved here from the folder (or, for a config dict, the bare layout and default processor)."""
    if (path is None) == (spec is None):
        raise ValueError('give exactly one of model.vlm_path (a local folder) and model.vlm (a config dict)')
    folder = Path(path) if path is not None else None
    family, hf_config, model = _hf_model(folder, spec, attn_implementation, seed)
    image_size = _size_list(image_size, 'model.vlm_image_size')
    if processor is None:
        saved = read_processor_config(folder) if folder is not None else {}
        processor = family.processor_config(saved, hf_config, image_size)
    grid = family.image_grid(hf_config, processor)
    n_image = grid[0] * grid[1]
    if layout is not None:
        lay = PromptLayout.from_dict(layout)
    elif folder is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        lay = build_layout(family, tokenizer, read_chat_template(folder), n_image, grid,
                           family.image_token_id(hf_config), slot_len, state)
    else:
        lay = bare_layout(family, n_image, grid, slot_len, state)
    if lay.n_image_tokens != n_image or lay.slot_len != slot_len or lay.has_state != bool(state):
        raise ValueError(f'prompt layout ({lay.n_image_tokens} image tokens, slot {lay.slot_len}, state '
                         f'{lay.has_state}) does not match the model ({n_image}, {slot_len}, {bool(state)})')
    head = model.get_output_embeddings()
    text_cfg = hf_config.get_text_config()
    return VLMParts(family=family, hf_config=hf_config, vision=family.vision(model, processor),
                    language_model=family.language_model(model),
                    lm_head=head.weight.detach().clone() if head is not None else None, layout=lay,
                    processor=processor, softcap=getattr(text_cfg, 'final_logit_softcapping', None))
