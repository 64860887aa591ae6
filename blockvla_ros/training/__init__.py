"""Finetuning BlockVLA policies from rosbag2 demonstrations (blockvla-train).

    from blockvla_ros.training import load_train_config, train
    result = train(load_train_config('config/train/example.yaml', ['train.mode=ar']))
    result.checkpoint   # newest checkpoint: a policy folder (config.json, model.safetensors, stats.json)

Modules: config (TrainConfig + overrides), bag_data (bags -> episodes), dataset (episodes -> chunk windows),
sampler (step-determined data order), assemble (run set-up), trainer (the loop), distributed (the Accelerator:
DDP, FSDP2 also on CPU), memory (gradient checkpointing, bf16 frozen weights), train_state + checkpoint
(atomic safetensors checkpoints), optim, lora (peft), validation, metrics, cli. torch is imported where used.
"""
from .config import TrainConfig, load_train_config
from .trainer import TrainResult, train

__all__ = ['TrainConfig', 'TrainResult', 'load_train_config', 'train']
