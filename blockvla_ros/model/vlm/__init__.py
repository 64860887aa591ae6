"""Pretrained vision-language models as the AR backbone: PaliGemma, Idefics3/SmolVLM, Qwen2-VL/Qwen2.5-VL.

`layout` (numpy, used at run time) holds the prompt layout; `families`, `vision` and `load` (torch + transformers)
build and split the HF model; `random_folder` writes random-weight folders in a family's layout (tests, benchmarks).
"""
