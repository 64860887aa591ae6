"""A tiny random-init AR backbone folder for the benchmark task: Llama weights + a word-level tokenizer.

The demo recipe trains from this folder exactly as a user trains from their own backbone (`model.backbone_path`,
`text_tokenizer: auto`): `save_pretrained` layout, tokenizer files exported with the policy. A word-level vocabulary
over the task's instructions gives ~6 text tokens per instruction instead of ~40 bytes, which makes the colour
word one token the policy can attend to (and the prefix 2x shorter).

Why Llama and not Qwen2: AutoTokenizer picks the tokenizer class from the model type, and a Qwen2 folder forces
Qwen2Tokenizer, which does not read a word-level tokenizer.json (it maps every instruction to special tokens only;
`HFTextTokenizer` refuses that).
"""
from __future__ import annotations

import re
from pathlib import Path

from blockvla_ros.tasks.spec import COLORS, SHAPES, TEMPLATES

SPECIALS = ('[PAD]', '[UNK]', '[BOS]')  # ids 0, 1, 2
_WORD = re.compile(r'\w+|[^\w\s]+')     # what the Whitespace pre-tokenizer splits on


def task_vocabulary() -> list[str]:
    """Every word and punctuation mark the benchmark's instruction templates can produce, sorted."""
    words = set(COLORS) | set(SHAPES)
    for templates in TEMPLATES.values():
        for t in templates:
            words.update(w.lower() for w in _WORD.findall(re.sub(r'\{[cs]\d\}', ' ', t)))
    return sorted(words)


def build_word_tokenizer(words: list[str]):
    """A `PreTrainedTokenizerFast`: lower-case, split on whitespace and punctuation, [BOS] first, [UNK] for the
    rest of the world (an unknown word is a valid but uninformative token, not an error)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token='[UNK]'))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single='[BOS] $A', special_tokens=[('[BOS]', 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='[BOS]', pad_token='[PAD]', unk_token='[UNK]')


def write_word_backbone(out, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                        intermediate_size: int = 256, max_positions: int = 512, seed: int = 0,
                        words: list[str] | None = None) -> Path:
    """Write a random-init LlamaForCausalLM (seeded) with a word-level tokenizer over `words` (default: the
    tabletop task's vocabulary) to `out` (atomically: an existing folder is replaced only once the new one is
    complete). Returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from blockvla_ros.io.atomic import atomic_directory

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f'hidden_size {hidden_size} must divide by num_heads {num_heads}, and num_heads by '
                         f'num_kv_heads {num_kv_heads}')
    tokenizer = build_word_tokenizer(task_vocabulary() if words is None else list(words))
    vocab_size = 8 * -(-len(tokenizer) // 8)  # room to spare, a multiple of 8
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
                         pad_token_id=0, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
