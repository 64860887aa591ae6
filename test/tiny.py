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

# sliding windows shorter than a tiny policy's sequence (56 tokens: 40 text + 4 image + 12 actions)
WINDOW = 7
MISTRAL = dict(QWEN2, model_type='mistral', head_dim=16, sliding_window=WINDOW)  # every layer slides
QWEN2_WINDOW = dict(QWEN2, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                    max_window_layers=1)  # layer 0 full, layers 1-2 slide
GEMMA2_WINDOW = dict(GEMMA2, sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                     query_pre_attn_scalar=10)  # alternating layers; softcaps and a scaling that bind at this size
GEMMA3_WINDOW = dict(GEMMA2, model_type='gemma3_text', sliding_window=WINDOW, query_pre_attn_scalar=10,
                     layer_types=['sliding_attention', 'full_attention'], rope_local_base_freq=100.0,
                     rope_theta=10000.0)  # a sliding layer with its own rotary base, then a full one
