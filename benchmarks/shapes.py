"""Real backbone shapes with random weights: an HF folder written tensor by tensor, and a policy checkpoint on it.

    SHAPES['qwen2.5-0.5b']   Qwen2.5-0.5B dimensions (494 M params, 1.98 GB fp32)
    SHAPES['smollm2-360m']   SmolLM2-360M dimensions (362 M params)
    SHAPES['qwen3-0.6b']     Qwen3-0.6B dimensions (596 M params, 2.38 GB fp32; its backbone graph, the embedding
                             table aside, 1.76 GB: below protobuf's 2 GiB)
    SHAPES['qwen2.5-0.5b-40l']  Qwen2.5-0.5B widths in 40 layers instead of 24 (732 M params; the backbone graph
                             2.38 GB fp32: above protobuf's 2 GiB, so its weights must go to external data)
    SHAPES['tiny']           a toy Qwen2 for smoke tests of the harnesses
    SHAPES['smolvlm2-256m']  a whole VLM (model.vlm_path): SmolVLM2-256M dimensions (256 M params with its LM head;
                             the policy keeps 228 M), written by blockvla_ros.model.vlm.random_folder with its
                             processor and tokenizer files (real_size.py only; `smolvlm-tiny` for smoke tests)

Nothing is downloaded: the configs carry the published dimensions and every weight is random (normal(0, 0.02)
matrices, unit norms, zero biases). `write_random_backbone` never holds more than one shard (~0.5 GB) of weights:
the model is built on the meta device only to learn the tensor names and shapes, and each shard is generated and
written on its own, in the sharded `save_pretrained` layout (`model.safetensors.index.json`) that
`from_pretrained` reads. Used by real_size.py, train_memory.py and decode_latency.py's `--shape`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SHAPES = {
    'qwen2.5-0.5b': dict(model_type='qwen2', vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    'smollm2-360m': dict(model_type='llama', vocab_size=49152, hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    'qwen3-0.6b': dict(model_type='qwen3', vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True),
    'qwen2.5-0.5b-40l': dict(model_type='qwen2', vocab_size=151936, hidden_size=896, intermediate_size=4864,
                             num_hidden_layers=40, num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=True),
    'tiny': dict(model_type='qwen2', vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=True),
}

# Whole pretrained VLMs (model.vlm_path): their folder, processor and tokenizer come from model.vlm.random_folder
VLM_SHAPES = ('smolvlm2-256m', 'smolvlm-tiny')  # the tiny one: smoke tests
for _vlm in VLM_SHAPES:
    SHAPES[_vlm] = {'vlm': f'{_vlm} (blockvla_ros.model.vlm.random_folder.SHAPES)'}
# A VLM policy: its own image processor and prompt; 32 instruction slots for its tokenizer, the demo's action space
VLM_POLICY = dict(text_tokenizer='auto', max_text_tokens=32, action_dim=3, state_dim=2, chunk_len=8, block_size=3,
                  steps_per_block=3, schedule='fixed', n_bins=32)

# The demo policy's vision / action settings (config/train/demo.yaml): 64x64 image, 16 patch tokens, a state token,
# 8 x 3 = 24 action tokens in blocks of 3, 32 bins; 48 text slots (the byte tokenizer: a random shape has no tokenizer
# files, and the tabletop instructions take up to ~40 bytes) -> prefix 65.
POLICY = dict(max_text_tokens=48, vision={'type': 'patch', 'patch_size': 16, 'dim': 64, 'pos_embed': 'sincos'},
              image_size=64, action_dim=3, state_dim=2, chunk_len=8, block_size=3, steps_per_block=3,
              schedule='fixed', n_bins=32)
SHARD_BYTES = 512 << 20


def hf_config(shape: str):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f'unknown shape {shape!r}; known: {sorted(SHAPES)}')
    if shape in VLM_SHAPES:
        raise ValueError(f'{shape} is a whole VLM, not a causal LM (real_size.py measures it)')
    spec = dict(SHAPES[shape])
    return AutoConfig.for_model(spec.pop('model_type'), **spec)


def param_count(shape: str) -> int:
    """Parameters of the causal LM (tied embeddings counted once), from a meta-device build."""
    return sum(n for _name, n, _ in _tensors(hf_config(shape)))


def backbone_graph_bytes(shape: str) -> int:
    """fp32 weight bytes of the policy's backbone graph: the causal LM without its input embedding, which policy
    folder format 2 keeps in tables.safetensors (the shapes here tie the LM head to it; the action head is small)."""
    cfg = hf_config(shape)
    return 4 * (param_count(shape) - cfg.vocab_size * cfg.hidden_size)


def _tensors(cfg):
    """[(name, numel, shape)] of the causal LM's parameters, each stored tensor once (tied ones skipped)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(cfg)
    return [(name, p.numel(), tuple(p.shape)) for name, p in model.named_parameters()]  # deduplicates tied weights


def _random(name: str, shape: tuple, std: float, gen):
    import torch

    if len(shape) == 1:  # norm scales 1, biases 0 (what HF's init does)
        return torch.ones(shape) if 'norm' in name else torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def write_random_backbone(shape: str, folder: Path, seed: int = 0) -> Path:
    """The HF folder of `shape` with random fp32 weights, one shard in memory at a time. -> folder."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    if shape in VLM_SHAPES:
        from blockvla_ros.model.vlm.random_folder import write_random_vlm

        return folder if (folder / 'config.json').is_file() else write_random_vlm(folder, shape, seed=seed)
    if (folder / 'model.safetensors.index.json').is_file():
        return folder  # already written (same shape: the config is compared)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(shape)
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(cfg, 'initializer_range', 0.02))
    groups, current, size = [], [], 0
    for name, numel, shp in _tensors(cfg):
        if current and size + numel * 4 > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += numel * 4
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
        shard = {name: _random(name, shp, std, gen) for name, shp in group}
        total += sum(t.numel() * 4 for t in shard.values())
        save_file(shard, str(folder / file), metadata={'format': 'pt'})
        weight_map.update({name: file for name in shard})
        del shard
    cfg.save_pretrained(folder)
    (folder / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=1))
    return folder


def make_policy_checkpoint(backbone: Path, out: Path, seed: int = 0, **policy_overrides) -> Path:
    """A policy checkpoint (config.json + model.safetensors + stats.json) on the backbone folder. -> out.

    The parts the backbone folder does not hold (vision encoder, projector, action head...) are initialized from torch
    seeded with `seed`: the same checkpoint every time, so real_size.py's token agreement on random weights compares
    like with like across runs (unseeded, the SmolLM2-360M int4 agreement moved from 0.944 to 0.062 between two runs of
    the same code: docs/benchmarks/real_size.md)."""
    import torch

    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.config import BlockVLAConfig
    from blockvla_ros.model.policy import BlockVLAPolicy

    out = Path(out)
    if (Path(backbone) / 'preprocessor_config.json').is_file():  # a whole VLM: its prompt, processor, tokenizer
        config = BlockVLAConfig(vlm_path=str(backbone), **{**VLM_POLICY, **policy_overrides})
    else:
        config = BlockVLAConfig(backbone_path=str(backbone), **{**POLICY, **policy_overrides})
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        policy = BlockVLAPolicy(config).eval()
    policy.save(out)
    if config.is_vlm:  # the checkpoint carries the tokenizer the exporter copies into the policy folder
        (out / 'tokenizer.json').write_bytes((Path(backbone) / 'tokenizer.json').read_bytes())
    rng = np.random.default_rng(0)
    NormStats.from_data(rng.normal(size=(500, config.action_dim)),
                        rng.normal(size=(500, config.state_dim)) if config.state_dim else None).save(out / 'stats.json')
    return out
