"""Tiny random policies shared by the tests (no files, no hub)."""
from blockvla_ros.model.config import BlockVLAConfig

QWEN2 = {'model_type': 'qwen2', 'vocab_size': 512, 'hidden_size': 64, 'intermediate_size': 128,
         'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
         'max_position_embeddings': 1024}
LLAMA = {'model_type': 'llama', 'vocab_size': 512, 'hidden_size': 64, 'intermediate_size': 128,
         'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 1,
         'max_position_embeddings': 1024}


def tiny_config(backbone=None, **overrides) -> BlockVLAConfig:
    base = dict(backbone=dict(backbone or QWEN2), vision={'type': 'patch', 'patch_size': 16, 'dim': 32},
                image_size=32, max_text_tokens=40, action_dim=3, chunk_len=4, block_size=3, steps_per_block=3)
    base.update(overrides)
    return BlockVLAConfig(**base)


GEMMA2 = {'model_type': 'gemma2', 'vocab_size': 512, 'hidden_size': 64, 'intermediate_size': 128,
          'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 16,
          'max_position_embeddings': 1024}
