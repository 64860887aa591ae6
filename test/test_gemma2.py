"""Gemma2 backbones: eager attention with logit soft-capping, query_pre_attn_scalar, alternating sliding-window
layers, embeddings scaled by sqrt(hidden) (folded into the runtime's text table), a final logit soft-cap and tied
embeddings. The policy starts as its causal LM, trains (block diffusion, the real trainer), exports with parity on
every decoder, and decodes with the KV cache as without it.
"""
import numpy as np
import pytest
import torch
import yaml

from blockvla_ros.export.policy_writer import export_policy
from blockvla_ros.model.graphs import tables
from blockvla_ros.model.masks import position_ids, training_mask
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.policy_folder import load_policy_folder
from blockvla_ros.runtime.torch_engine import TorchEngine

from test_decoding_parity import UncachedEngine, _observation
from tiny import GEMMA2_WINDOW, tiny_config


pytestmark = pytest.mark.usefixtures('one_thread')


def test_a_gemma2_policy_starts_as_its_causal_lm(tmp_path):
    """Text-table rows in (sqrt(hidden) folded in), action logits out == Gemma2ForCausalLM's logits over the last
    n_bins ids, on a sequence longer than the sliding window: softcaps, scaling, windows and the tied head all hold."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(GEMMA2_WINDOW, final_logit_softcapping=0.3)  # binds on a random model's small logits
    spec.pop('model_type')
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model('gemma2', **spec), attn_implementation='eager')
    assert lm.config.tie_word_embeddings and lm.lm_head.weight is lm.model.embed_tokens.weight
    lm.save_pretrained(tmp_path / 'gemma2')
    policy = BlockVLAPolicy(tiny_config(backbone_path=str(tmp_path / 'gemma2'), attn_implementation='eager')).eval()
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    embeds = torch.from_numpy(tables(policy)['text_embed'].numpy()[ids.numpy()])  # what the runtime looks up
    valid = torch.ones(1, 30, dtype=torch.bool)
    with torch.no_grad():
        ref = lm.eval()(input_ids=ids).logits[0, :, -policy.config.n_bins:]
        hidden, _ = policy.run_backbone(embeds, position_ids(valid, 0, 1), training_mask(valid, 0, 1, 'ar'))
        got = policy.action_logits(hidden)[0]
    assert policy.softcap == 0.3 and float(ref.abs().max()) > 0.1
    assert (got - ref).abs().max() <= 1e-5


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny Gemma2 (windows binding, softcaps) trained 6 block-diffusion steps by the real trainer on recordings."""
    from blockvla_ros.tasks.recording import record_demonstrations
    from blockvla_ros.training.config import TrainConfig
    from blockvla_ros.training.trainer import train

    root = tmp_path_factory.mktemp('gemma2')
    record_demonstrations(root / 'bags', tasks=['touch_red', 'touch_blue'], episodes_per_task=2, progress=False)
    model = dict(backbone=dict(GEMMA2_WINDOW), attn_implementation='eager', train_mode='blockdiff',
                 vision={'type': 'patch', 'patch_size': 16, 'dim': 32}, image_size=32, max_text_tokens=40,
                 action_dim=3, chunk_len=4, block_size=3, steps_per_block=3, state_dim=2)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(TrainConfig.from_dict({
            'model': model, 'data': {'bags': [str(root / 'bags')], 'topics': {'state': '/joint_states'},
                                     'val_fraction': 0.3},
            'train': dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, log_interval=1, eval_interval=6,
                          save_interval=6, out_dir=str(root / 'run'), progress=False, eval_decode_samples=1)}))
    finally:
        torch.set_num_threads(old)
    return root, result


def test_gemma2_trains_and_exports_with_parity_on_every_decoder(trained):
    root, result = trained
    losses = [r['loss'] for r in result.history if r.get('split') == 'train']
    assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    report = export_policy(result.checkpoint, root / 'models' / 'gemma2', parity_samples=2, tolerance=1e-3,
                           threads=1, progress=False)
    for r in report.parity:
        assert r['max_abs_diff'] <= 1e-3 and r['tokens_equal'], r
    assert set(report.parity[0]['decoders']) == {'blockdiff', 'ar', 'fulldiff'}
    spec = load_policy_folder(root / 'models' / 'gemma2')
    assert spec.config.attention_windows == [None, 7]
    assert spec.graphs['backbone'].tensor('mask').shape[0] == 2  # full-attention and sliding layers: two rows
    doc = yaml.safe_load((root / 'models' / 'gemma2' / 'policy.yaml').read_text())
    assert doc['config']['backbone']['model_type'] == 'gemma2' and doc['config']['attn_implementation'] == 'eager'


@pytest.mark.parametrize('decoder', ['blockdiff', 'ar', 'fulldiff'])
def test_trained_gemma2_decodes_cached_as_uncached(trained, decoder):
    _, result = trained
    policy = BlockVLAPolicy.load(result.checkpoint)
    config = policy.config
    prefix = _observation(config, 2, state=True)
    cached = Decoder(config, decoder)(TorchEngine(policy), prefix, trace=True)
    ref = Decoder(config, decoder)(UncachedEngine(policy, 1 if decoder == 'ar' else config.block_size), prefix,
                                   trace=True)
    assert cached.nfe == ref.nfe and np.array_equal(cached.tokens, ref.tokens)
    diff = max(float(np.abs(a[2] - b[2]).max(initial=0.0)) for a, b in zip(cached.trace, ref.trace))
    assert diff <= 1e-4, diff
