"""Backbones from a local HF folder, HF vision towers, and policy save/load."""
import pytest
import numpy as np
import torch

from blockvla_ros.model.config import BlockVLAConfig
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import ByteTokenizer
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.preprocess import Preprocessor
from blockvla_ros.runtime.torch_engine import TorchEngine

from tiny import GEMMA2, QWEN2, tiny_config


def _prefix(config):
    pre = Preprocessor(config, ByteTokenizer(config.max_text_tokens, 512))
    return pre(np.full((48, 40, 3), 90, np.uint8), 'open the drawer')  # another size: resized


def test_backbone_from_local_folder_reuses_its_action_rows(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(QWEN2, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop('model_type'), **spec))
    hf.save_pretrained(tmp_path / 'ar_ckpt')
    config = tiny_config(backbone_path=str(tmp_path / 'ar_ckpt'))
    policy = BlockVLAPolicy(config)
    # the action head starts from the LM head rows of the last n_bins vocabulary ids
    assert torch.equal(policy.action_head.weight, hf.lm_head.weight[-256:])
    assert torch.equal(policy.action_embed.weight[:256], hf.model.embed_tokens.weight[-256:])
    assert torch.equal(policy.llm.layers[0].mlp.up_proj.weight, hf.model.layers[0].mlp.up_proj.weight)
    # saved with a self-contained backbone spec: reloads without the original folder
    policy.save(tmp_path / 'policy')
    (tmp_path / 'ar_ckpt' / 'model.safetensors').unlink()
    again = BlockVLAPolicy.load(tmp_path / 'policy')
    assert again.config.backbone_path is None and again.config.backbone['model_type'] == 'qwen2'
    prefix = _prefix(config)
    a = Decoder(config)(TorchEngine(policy.eval()), prefix).tokens
    b = Decoder(again.config)(TorchEngine(again), prefix).tokens
    assert np.array_equal(a, b)


def test_hf_vision_tower_by_config():
    vision = {'type': 'hf', 'num_tokens': 16, 'config': {
        'model_type': 'siglip_vision_model', 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 1,
        'num_attention_heads': 2, 'image_size': 32, 'patch_size': 8}}
    config = tiny_config(vision=vision)
    policy = BlockVLAPolicy(config).eval()
    prefix = _prefix(config)
    with torch.no_grad():
        tokens = policy.encode_image(torch.from_numpy(prefix.pixels))
    assert tokens.shape == (1, 16, 64)
    res = Decoder(config)(TorchEngine(policy), prefix)
    assert res.tokens.shape == (config.n_action_tokens,) and (res.tokens < 256).all()


def test_hf_vision_tower_from_a_folder_is_exported_inline(tmp_path):
    """The policy folder's config names no folder outside it: a tower loaded from `vision.path` is described by its
    config, and the policy rebuilt from that config has the same weights layout (issue 13 item 3)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tower = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8)
    SiglipVisionModel(tower).save_pretrained(tmp_path / 'tower')
    policy = BlockVLAPolicy(tiny_config(vision={'type': 'hf', 'num_tokens': 16, 'path': str(tmp_path / 'tower')}))
    portable = policy.portable_config()
    assert 'path' not in portable.vision and portable.vision['config']['model_type'] == 'siglip_vision_model'
    rebuilt = BlockVLAPolicy(portable)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in policy.state_dict().items()}


def test_config_describes_backbone_or_folder():
    cfg = BlockVLAConfig()
    assert cfg.backbone['model_type'] == 'qwen2' and cfg.prefix_len == cfg.max_text_tokens + 64


def _word_level_folder(folder, model_type):
    """A folder holding a word-level tokenizer.json and a `model_type` config (no weights needed to tokenize)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(['[PAD]', '[UNK]', '[BOS]', 'touch', 'the', 'red', 'blue', 'block'])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single='[BOS] $A', special_tokens=[('[BOS]', 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='[PAD]', unk_token='[UNK]',
                            bos_token='[BOS]').save_pretrained(folder)
    (folder / 'config.json').write_text(json.dumps({'model_type': model_type}))
    return folder


def test_tokenizer_that_drops_the_instruction_is_refused(tmp_path):
    """A word-level tokenizer in a qwen2 folder loads as Qwen2Tokenizer and encodes every instruction to [BOS]
    alone: training on it would be blind to the instruction, so encoding says so instead."""
    from blockvla_ros.model.text_tokenizer import load_text_tokenizer

    good = load_text_tokenizer('auto', 8, 8, _word_level_folder(tmp_path / 'llama', 'llama'))
    red, _ = good.encode('touch the red block')
    blue, valid = good.encode('touch the blue block')
    assert valid.sum() == 5 and (red != blue).any()
    unknown, valid = good.encode('warm up')  # out-of-vocabulary words: [BOS] [UNK] [UNK], accepted
    assert list(unknown[valid]) == [2, 1, 1]
    bad = load_text_tokenizer('auto', 8, 8, _word_level_folder(tmp_path / 'qwen2', 'qwen2'))
    with pytest.raises(ValueError, match='special tokens only'):
        bad.encode('touch the red block')


# --- model.attn_implementation --------------------------------------------------------------------------------------
def _loss(policy, seed=0):
    from blockvla_ros.model.losses import Batch, compute_loss

    gen = torch.Generator().manual_seed(seed)
    cfg = policy.config
    text_valid = torch.ones(2, cfg.max_text_tokens, dtype=torch.bool)
    text_valid[0, :5] = False  # left padding: padded keys must stay masked under every implementation
    batch = Batch(torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen),
                  torch.randint(0, 512, (2, cfg.max_text_tokens), generator=gen), text_valid,
                  torch.randint(0, cfg.n_bins, (2, cfg.n_action_tokens), generator=gen))
    return compute_loss(policy, batch, generator=torch.Generator().manual_seed(seed + 1))[0]


def test_eager_attention_computes_what_sdpa_computes():
    """eager adds the mask to the scores: our bool masks reach it as additive masks (a bool one is silently wrong)."""
    sdpa = BlockVLAPolicy(tiny_config()).eval()
    eager = BlockVLAPolicy(tiny_config(attn_implementation='eager')).eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.llm.config._attn_implementation == 'eager' and sdpa.llm.config._attn_implementation == 'sdpa'
    with torch.no_grad():
        assert float(_loss(eager)) == pytest.approx(float(_loss(sdpa)), abs=1e-5)
    prefix = _prefix(sdpa.config)
    a = Decoder(sdpa.config)(TorchEngine(sdpa), prefix)
    b = Decoder(eager.config)(TorchEngine(eager), prefix)  # cached steps: prefill, refine and commit masks
    assert np.array_equal(a.tokens, b.tokens) and a.nfe == b.nfe


def test_attn_implementation_is_validated_and_gemma2_names_the_setting():
    with pytest.raises(ValueError, match="attn_implementation must be one of \\('sdpa', 'eager'\\)"):
        tiny_config(attn_implementation='flash_attention_2')
    with pytest.raises(ValueError, match="set model.attn_implementation to one of \\['eager'\\]"):
        BlockVLAPolicy(tiny_config(backbone=GEMMA2))  # Gemma2 has no sdpa support in transformers
    policy = BlockVLAPolicy(tiny_config(backbone=GEMMA2, attn_implementation='eager'))
    assert policy.llm.config.model_type == 'gemma2'
    optim = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):  # the same batch: the loss must fall (softcapped eager attention, our additive masks)
        loss = _loss(policy)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    res = Decoder(policy.config)(TorchEngine(policy.eval()), _prefix(policy.config))
    assert res.tokens.shape == (policy.config.n_action_tokens,)
    saved = policy.portable_config()
    assert saved.attn_implementation == 'eager' and BlockVLAConfig.from_dict(saved.to_dict()) == saved
