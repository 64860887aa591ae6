"""Sliding-window attention (Mistral, Qwen2 with windows, Gemma2/3's alternating layers) is honoured.

On a plain causal sequence longer than the window, the policy must compute what the backbone's own forward computes
(HF builds its sliding-window masks itself there): the training path (`run_backbone` with the training mask) and the
runtime path (the engine's pass masks over the KV cache, split attention) alike. A window the policy cannot apply is
refused when the policy is built, naming the key.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from blockvla_ros.model.attention_windows import mask_windows
from blockvla_ros.model.masks import position_ids, training_mask
from blockvla_ros.model.policy import BlockVLAPolicy, attention_mask_for
from blockvla_ros.runtime.engine import PrefixInputs
from blockvla_ros.runtime.ort_engine import OrtEngine
from blockvla_ros.runtime.policy_folder import PolicyFolderError, load_policy_folder, write_manifest
from blockvla_ros.runtime.torch_engine import TorchEngine
from blockvla_ros.runtime.torch_static_engine import StaticTorchEngine

from tiny import GEMMA2, GEMMA2_WINDOW, GEMMA3_WINDOW, MISTRAL, QWEN2, QWEN2_WINDOW, WINDOW, tiny_config

BACKBONES = {'mistral': (MISTRAL, 'sdpa', [WINDOW]), 'qwen2-window': (QWEN2_WINDOW, 'sdpa', [None, WINDOW]),
             'gemma2': (GEMMA2_WINDOW, 'eager', [None, WINDOW]), 'gemma3': (GEMMA3_WINDOW, 'eager', [None, WINDOW])}


def _policy(name):
    backbone, attn, _ = BACKBONES[name]
    torch.manual_seed(0)
    policy = BlockVLAPolicy(tiny_config(backbone=backbone, attn_implementation=attn)).eval()
    with torch.no_grad():  # random action rows: the logits must not be near-constant
        policy.action_embed.weight.normal_(0, 1.0)
    return policy


def _full_prefix(config, seed=0):
    """An observation whose instruction fills every text slot: the sequence is plain causal, positions 0, 1, ..."""
    rng = np.random.default_rng(seed)
    s, lt = config.image_size, config.max_text_tokens
    return PrefixInputs(pixels=rng.normal(size=(1, 3, s, s)).astype(np.float32),
                        text_ids=rng.integers(0, 512, (1, lt)), text_valid=np.ones((1, lt), bool))


def _own_forward(policy, embeds):
    """The backbone's own forward (its own causal + sliding-window masks) -> action logits [T, n_bins]."""
    with torch.no_grad():
        hidden = policy.llm(inputs_embeds=torch.from_numpy(embeds)).last_hidden_state
        return policy.action_logits(hidden)[0].numpy()


@pytest.mark.parametrize('name', list(BACKBONES))
def test_the_policy_equals_the_backbones_own_forward_past_the_window(name):
    policy = _policy(name)
    config = policy.config
    assert config.attention_windows == BACKBONES[name][2] and config.max_seq_len > 7 * WINDOW
    prefix = _full_prefix(config)
    tokens = np.random.default_rng(1).integers(0, config.n_bins, config.n_action_tokens)
    tables = TorchEngine(policy).tables
    embeds = np.concatenate([TorchEngine(policy)._prefix_embeds(prefix), tables.actions(tokens)], 1)  # [1, T, h]
    ref = _own_forward(policy, embeds)
    p = config.prefix_len
    for engine in (TorchEngine(policy), StaticTorchEngine(policy)):  # the reference and the GPU engine (on CPU)
        # prefill (instruction, then observation), then the actions as committed AR tokens in two passes
        got = [engine.prefill(prefix)[None], engine.step(tokens[:5], commit=5), engine.step(tokens[5:], commit=7)]
        diff = np.abs(np.concatenate(got) - ref[p - 1:]).max()
        assert diff <= 1e-4, f'{name}: {type(engine).__name__} passes differ from the backbone by {diff}'
    # training: one forward with the AR training mask (plain causal here) and its positions
    valid = torch.ones(1, p, dtype=torch.bool)
    mask = training_mask(valid, len(tokens), 1, 'ar', policy.layout)
    with torch.no_grad():
        hidden, _ = policy.run_backbone(torch.from_numpy(embeds), position_ids(valid, len(tokens), 1, policy.layout),
                                        mask)
        train = policy.action_logits(hidden)[0].numpy()
    assert np.abs(train - ref).max() <= 1e-4, f'{name}: training forward differs by {np.abs(train - ref).max()}'
    # and the window matters here: the same policy without it computes something else
    causal = torch.ones(1, 1, len(ref), len(ref), dtype=torch.bool).tril()
    with torch.no_grad():  # (what the policy did before: its own 4-D mask, so HF never applied the window)
        full = policy.llm(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.arange(len(ref))[None],
                          attention_mask=attention_mask_for(causal, config.attn_implementation, torch.float32))
        unwindowed = policy.action_logits(full.last_hidden_state)[0].numpy()
    assert np.abs(unwindowed - ref).max() > 1e-2


def test_a_window_longer_than_the_sequence_changes_nothing():
    """Real Gemma2 / Mistral windows (4096) exceed a policy's sequence: one mask, the graph as before."""
    policy = BlockVLAPolicy(tiny_config(backbone=GEMMA2, attn_implementation='eager'))
    assert policy.llm.config.sliding_window == 4096 and policy.config.attention_windows == []


def test_unsupported_windows_are_refused_at_load():
    from transformers import AutoConfig

    chunked = dict(QWEN2, layer_types=['full_attention', 'chunked_attention'])
    with pytest.raises(ValueError, match="backbone.layer_types: 'chunked_attention'"):
        BlockVLAPolicy(tiny_config(backbone=chunked))
    qwen2_vl_text = AutoConfig.for_model('qwen2', **{k: v for k, v in QWEN2_WINDOW.items() if k != 'model_type'})
    with pytest.raises(ValueError, match='sliding_window 7 .* M-RoPE'):
        mask_windows(qwen2_vl_text, max_seq_len=56, rope_dims=3)
    with pytest.raises(ValueError, match='attention_windows'):
        tiny_config(attention_windows=[0])
    with pytest.raises(ValueError, match='backbone.use_bidirectional_attention with a sliding window'):  # two-sided
        BlockVLAPolicy(tiny_config(backbone=dict(GEMMA3_WINDOW, use_bidirectional_attention=True),
                                   attn_implementation='eager'))


def test_a_folder_whose_mask_rows_disagree_with_its_windows_is_refused_at_load(tmp_path):
    """policy.yaml says two windows (full + sliding), the exported backbone takes one mask row: refused by name at
    load, never an ONNX Runtime shape error in the middle of a chunk."""
    folder = tmp_path / 'demo'
    shutil.copytree(Path(__file__).resolve().parents[1] / 'models' / 'demo', folder)
    doc = yaml.safe_load((folder / 'policy.yaml').read_text())
    doc['config']['attention_windows'] = [None, 5]
    (folder / 'policy.yaml').write_text(yaml.safe_dump(doc, sort_keys=False))
    write_manifest(folder)
    with pytest.raises(PolicyFolderError, match=r'backbone.onnx takes 1 mask rows, config.attention_windows'):
        OrtEngine(load_policy_folder(folder), threads=1)


def test_a_gemma3_policy_exports_with_parity_and_two_mask_rows(tmp_path):
    """Gemma3's sliding layers (own rotary base) through the ONNX export: ORT equals torch on every decoder."""
    from blockvla_ros.export.policy_writer import export_policy
    from blockvla_ros.model.action_tokenizer import NormStats

    policy = _policy('gemma3')
    policy.save(tmp_path / 'checkpoint')
    actions = np.random.default_rng(0).uniform(-1, 1, (200, policy.config.action_dim))
    NormStats.from_data(actions, None).save(tmp_path / 'checkpoint' / 'stats.json')
    report = export_policy(tmp_path / 'checkpoint', tmp_path / 'gemma3', parity_samples=1, tolerance=1e-3,
                           threads=1, progress=False)
    assert report.parity and set(report.parity[0]['decoders']) == {'blockdiff', 'ar', 'fulldiff'}
    for r in report.parity:
        assert r['max_abs_diff'] <= 1e-3 and r['tokens_equal'], r
    spec = load_policy_folder(tmp_path / 'gemma3')
    assert spec.config.attention_windows == [None, WINDOW] and spec.graphs['backbone'].tensor('mask').shape[0] == 2
