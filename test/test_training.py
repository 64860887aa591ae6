"""Training subpackage: real rosbag2 recordings (mcap + sqlite3, raw + compressed), tiny models, a few dozen steps."""
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from blockvla_ros.io.actions import generic_names
from blockvla_ros.io.bag_reader import BagError, Episode
from blockvla_ros.model.action_tokenizer import ActionTokenizer, NormStats
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.model.text_tokenizer import load_text_tokenizer
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.preprocess import Preprocessor, image_processor_for, prepare_image
from blockvla_ros.runtime.torch_engine import TorchEngine
from blockvla_ros.tasks.recording import record_demonstrations
from blockvla_ros.training import cli
from blockvla_ros.training.bag_data import load_episodes
from blockvla_ros.training.checkpoint import list_checkpoints
from blockvla_ros.training.config import TrainConfig, load_train_config
from blockvla_ros.training.dataset import ChunkDataset, fit_images, split_episodes
from blockvla_ros.training.lora import merge_lora_state
from blockvla_ros.training.metrics import read_metrics
from blockvla_ros.training.sampler import StepBatchSampler
from blockvla_ros.training.trainer import train

from tiny import GEMMA2, QWEN2

MODEL = dict(backbone=dict(QWEN2), vision={'type': 'patch', 'patch_size': 16, 'dim': 32}, image_size=32,
             max_text_tokens=40, action_dim=3, chunk_len=4, block_size=3, steps_per_block=3, state_dim=2)
TOPICS = {'state': '/joint_states'}  # image / instruction / action: the recording defaults


pytestmark = pytest.mark.usefixtures('one_thread')


def record(out, storage='mcap', image_format='raw', action_msg='JointTrajectory', episodes=3, seed=0):
    return record_demonstrations(out, tasks=['touch_red', 'touch_blue'], episodes_per_task=episodes, seed=seed,
                                 storage=storage, image_format=image_format, action_msg=action_msg, progress=False)


def make_config(out_dir, bags, model=None, data=None, **train_opts) -> TrainConfig:
    opts = dict(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, log_interval=1, eval_interval=10,
                save_interval=10, out_dir=str(out_dir), progress=False, eval_decode_samples=2)
    opts.update(train_opts)
    return TrainConfig.from_dict({'model': {**MODEL, **(model or {})},
                                  'data': {'bags': [str(b) for b in bags], 'topics': dict(TOPICS),
                                           'val_fraction': 0.3, **(data or {})},
                                  'train': opts})


def train_losses(records, split='train', key='loss'):
    return {r['step']: r[key] for r in records if r.get('split') == split}


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    """One dataset directory holding both storage formats and both image kinds (and two action message types)."""
    root = tmp_path_factory.mktemp('bags')
    record(root / 'mcap_raw', 'mcap', 'raw', 'JointTrajectory', seed=0)
    record(root / 'sqlite_jpeg', 'sqlite3', 'jpeg', 'Float32MultiArray', seed=1)
    return root


@pytest.fixture(scope='module')
def ar_checkpoint(tmp_path_factory):
    """A tiny AR backbone in a local HF folder (save_pretrained layout)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(QWEN2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop('model_type'), **spec))
    path = tmp_path_factory.mktemp('ar') / 'qwen_tiny'
    hf.save_pretrained(path)
    return path


# --- end to end ---------------------------------------------------------------------------------------------------
def test_trains_on_both_bag_formats_from_an_ar_checkpoint_and_the_checkpoint_decodes(tmp_path, bags, ar_checkpoint):
    config = make_config(tmp_path / 'run', [bags], model={'backbone_path': str(ar_checkpoint)}, steps=30)
    result = train(config)

    assert result.stopped == 'done' and result.step == 30
    data = result.data
    assert data['bags'] == 12 and data['episodes_train'] + data['episodes_val'] == 12 and data['episodes_val'] >= 2
    val = train_losses(result.history, 'val', 'val_loss')
    assert set(val) == {0, 10, 20, 30}
    assert val[30] < 0.8 * val[0], val  # the held-out loss falls
    train_loss = train_losses(result.history)
    assert np.mean([train_loss[s] for s in range(26, 31)]) < 0.6 * np.mean([train_loss[s] for s in range(1, 6)])
    assert all(r['samples_per_s'] > 0 for r in result.history if r['split'] == 'train')

    # metrics file, curve, and one checkpoint per save interval (keep 2)
    out = tmp_path / 'run'
    assert [r['step'] for r in read_metrics(out / 'metrics.jsonl') if r['split'] == 'train'] == list(range(1, 31))
    assert (out / 'loss_curve.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert [s for s, _ in list_checkpoints(out)] == [20, 30]
    assert not [p for p in out.rglob('*') if p.suffix in ('.pt', '.pth', '.bin', '.pkl', '.tmp')]

    # the checkpoint is a self-contained policy folder: reload without the AR folder, decode, denormalize
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(result.checkpoint, ckpt)
    policy = BlockVLAPolicy.load(ckpt)
    assert policy.config.backbone_path is None and policy.config.decoder == 'blockdiff'
    assert policy.config.action_names == ['ee_dx', 'ee_dy', 'gripper'] and policy.config.state_dim == 2
    stats = NormStats.load(ckpt / 'stats.json')
    tok = ActionTokenizer(stats, policy.config.n_bins)
    pre = Preprocessor(policy.config, load_text_tokenizer('byte', 40, 512), tok)
    episodes, _ = load_episodes(config.data, config.model_config(), progress=False)
    ep = episodes[0]
    res = Decoder(policy.config)(TorchEngine(policy), pre(ep.images[0], ep.instruction, ep.states[0]))
    actions = tok.decode(res.tokens)
    assert actions.shape == (4, 3) and np.all(np.isfinite(actions))
    assert np.all(actions >= np.asarray(stats.action_low) - 1e-6)
    assert np.all(actions <= np.asarray(stats.action_high) + 1e-6)
    # statistics come from the training episodes only
    state = json.loads((ckpt / 'training_state' / 'state.json').read_text())
    assert state['step'] == 30 and stats.n_samples < sum(len(e.actions) for e in episodes)
    # the held-out episodes are named by recording (export's calibration reads only their bags)
    split = json.loads((ckpt / 'val_split.json').read_text())['episodes']
    assert len(split) == data['episodes_val'] and {e['bag'] for e in split} <= {e.bag_path for e in episodes}


def test_auto_tokenizer_travels_with_the_checkpoint_of_a_bf16_run(tmp_path, bags, ar_checkpoint):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / 'ar_with_tokenizer'  # an AR checkpoint with its own (byte-level BPE, 300 ids) tokenizer
    shutil.copytree(ar_checkpoint, folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(['touch the red block', 'press the blue object', 'tap the red circle'] * 5, vocab_size=300,
                            min_frequency=1, special_tokens=['<|endoftext|>'])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token='<|endoftext|>',
                            pad_token='<|endoftext|>').save_pretrained(folder)
    config = make_config(tmp_path / 'run', [bags / 'mcap_raw'], steps=3, eval_interval=3, save_interval=3,
                         precision='bf16', model={'backbone_path': str(folder), 'text_tokenizer': 'auto'})
    result = train(config)
    assert result.stopped == 'done' and np.isfinite(result.val_loss)
    ckpt = result.checkpoint
    assert BlockVLAPolicy.load(ckpt).config.text_tokenizer == 'auto'
    ids, valid = load_text_tokenizer('auto', 40, 512, ckpt).encode('tap the blue circle')
    assert 3 <= valid.sum() < len('tap the blue circle') and ids.max() < 300  # BPE ids, not bytes
    assert np.array_equal(ids, load_text_tokenizer('auto', 40, 512, folder).encode('tap the blue circle')[0])


@pytest.mark.parametrize('mode', ['ar', 'fulldiff'])
def test_baseline_modes_train_on_the_same_data_and_save_their_decoder(tmp_path, bags, mode):
    config = make_config(tmp_path / mode, [bags / 'mcap_raw'], steps=8, eval_interval=8, save_interval=8, mode=mode)
    result = train(config)
    val = train_losses(result.history, 'val', 'val_loss')
    assert val[8] < val[0]
    saved = BlockVLAPolicy.load(result.checkpoint).config
    assert saved.train_mode == mode and saved.decoder == mode
    assert [r['decoder'] for r in result.history if 'decoder' in r] == [mode, mode]


# --- training at size: gradient checkpointing, bf16 frozen weights, LoRA, other attention -------------------------
def test_gradient_checkpointing_computes_the_same_steps(tmp_path, bags):
    config = make_config(tmp_path / 'plain', [bags / 'mcap_raw'], steps=4, eval_interval=4, save_interval=4,
                         eval_decode_samples=0)
    plain = train(config)
    recomputed = train(config.replace({'train.out_dir': str(tmp_path / 'gc'), 'train.gradient_checkpointing': True}))
    p, g = train_losses(plain.history), train_losses(recomputed.history)
    assert sorted(p) == [1, 2, 3, 4]
    for step in p:
        assert g[step] == pytest.approx(p[step], rel=1e-5, abs=1e-6), (step, p, g)
    assert recomputed.val_loss == pytest.approx(plain.val_loss, rel=1e-5)


def test_lora_on_a_bf16_frozen_backbone_with_checkpointing_trains_and_merges_into_fp32(tmp_path, bags):
    from blockvla_ros.training.assemble import build_policy

    config = make_config(tmp_path / 'lora', [bags / 'mcap_raw'], steps=10, eval_interval=10, save_interval=10,
                         lr=1e-2, precision='bf16', frozen_dtype='bf16', gradient_checkpointing=True,
                         lora={'enabled': True, 'r': 4, 'alpha': 8})
    policy = build_policy(config.model_config(), config)
    dtypes = {n: p.dtype for n, p in policy.named_parameters()}
    assert dtypes['llm.layers.0.self_attn.q_proj.base_layer.weight'] == torch.bfloat16  # frozen: half the bytes
    assert dtypes['llm.embed_tokens.weight'] == torch.bfloat16
    assert dtypes['llm.layers.0.self_attn.q_proj.lora_A.default.weight'] == torch.float32  # trained: fp32
    assert dtypes['action_head.weight'] == dtypes['vision.proj.weight'] == torch.float32
    assert policy.llm.is_activation_checkpointing

    result = train(config)
    val = train_losses(result.history, 'val', 'val_loss')
    assert val[10] < val[0], val
    from safetensors import safe_open

    with safe_open(str(tmp_path / 'lora' / 'checkpoints' / 'step_00000010' / 'model.safetensors'), 'pt') as f:
        assert f.get_slice('llm.layers.0.self_attn.q_proj.weight').get_dtype() == 'F32'  # merged, not rounded
        assert not any('lora' in k for k in f.keys())
    loaded = BlockVLAPolicy.load(result.checkpoint)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with pytest.raises(ValueError, match='frozen_dtype=bf16 needs train.precision=bf16'):
        config.replace({'train.precision': 'fp32'})


def test_gemma2_trains_with_eager_attention(tmp_path, bags):
    config = make_config(tmp_path / 'gemma2', [bags / 'mcap_raw'], steps=8, eval_interval=8, save_interval=8,
                         model={'backbone': dict(GEMMA2), 'attn_implementation': 'eager'})
    result = train(config)
    val = train_losses(result.history, 'val', 'val_loss')
    assert val[8] < val[0], val
    assert BlockVLAPolicy.load(result.checkpoint).llm.config._attn_implementation == 'eager'
    with pytest.raises(ValueError, match='model.attn_implementation'):
        train(config.replace({'model.attn_implementation': 'sdpa', 'train.out_dir': str(tmp_path / 'sdpa')}))


# --- resume --------------------------------------------------------------------------------------------------------
def test_stopped_and_resumed_run_continues_the_same_loss_curve(tmp_path, bags):
    full = train(make_config(tmp_path / 'full', [bags / 'mcap_raw'], steps=12, eval_interval=6, save_interval=6))
    part = make_config(tmp_path / 'part', [bags / 'mcap_raw'], steps=12, eval_interval=6, save_interval=6,
                       data={'num_workers': 1})  # a loader worker process: the same batches in the same order
    first = train(part.replace({'train.max_steps': 7}))
    assert first.stopped == 'max_steps' and first.step == 7
    # a kill during the next save leaves a temporary directory behind: it must be ignored and cleaned up
    (tmp_path / 'part' / 'checkpoints' / '.step_00000009.abc.tmp' / 'training_state').mkdir(parents=True)
    second = train(part)
    assert second.stopped == 'done' and second.step == 12
    assert [r['step'] for r in second.history if r['split'] == 'train'] == list(range(8, 13))
    records = read_metrics(tmp_path / 'part' / 'metrics.jsonl')
    assert [r['step'] for r in records if r['split'] == 'train'] == list(range(1, 13))  # one continuous curve
    a, b = train_losses(full.history), train_losses(records)
    for step in range(8, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a[step], b[step])
    assert second.val_loss == pytest.approx(full.val_loss, rel=1e-4)
    assert not list((tmp_path / 'part' / 'checkpoints').glob('.step_*'))
    # nothing left to do: resuming a finished run returns at once
    again = train(part)
    assert again.stopped == 'nothing_to_do' and again.step == 12


@pytest.mark.parametrize('damaged', ['trainable.safetensors', 'optimizer.safetensors'])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damaged):
    """A truncated training-state file (a partial copy, a failing disk) raised safetensors' own SafetensorError:
    blockvla-train printed a traceback instead of its error line."""
    from safetensors.torch import save_file

    from blockvla_ros.training.checkpoint import STATE_DIR, load_training_state

    ckpt = tmp_path / 'step_00000010'
    (ckpt / STATE_DIR).mkdir(parents=True)
    for name in ('config.json', 'stats.json'):
        (ckpt / name).write_text('{}')
    save_file({'w': torch.zeros(4)}, str(ckpt / 'model.safetensors'))
    (ckpt / STATE_DIR / 'state.json').write_text(json.dumps({'format': 1, 'step': 10}))
    for name in ('trainable.safetensors', 'optimizer.safetensors'):
        save_file({'w': torch.zeros(4)}, str(ckpt / STATE_DIR / name))
    assert load_training_state(ckpt)[2]['step'] == 10
    (ckpt / STATE_DIR / damaged).write_bytes((ckpt / STATE_DIR / damaged).read_bytes()[:20])
    with pytest.raises(ValueError, match=f'{damaged}: not a readable safetensors file.*--resume never'):
        load_training_state(ckpt)


def test_a_run_never_writes_into_a_folder_holding_a_later_run(tmp_path, bags):
    """train.resume=never (or an older checkpoint) on a folder holding checkpoints: the saver kept the old step_N
    where the new run reached N, pruning deleted others and metrics.jsonl was restarted: two runs mixed silently."""
    out = tmp_path / 'run'
    first = train(make_config(out, [bags / 'mcap_raw'], steps=4, save_interval=2, eval_interval=100,
                              eval_decode_samples=0))
    before = {p.name: (p / 'model.safetensors').read_bytes() for _, p in list_checkpoints(out)}
    metrics = (out / 'metrics.jsonl').read_text()
    with pytest.raises(ValueError, match=r'already holds checkpoints of another run \(steps \[2, 4\]\): resume it'):
        train(make_config(out, [bags / 'mcap_raw'], steps=4, lr=1e-3, resume='never'))
    with pytest.raises(ValueError, match=r'steps \[4\]\) past step 2 of .*step_00000002: this run would mix'):
        train(make_config(out, [bags / 'mcap_raw'], steps=4, resume=str(out / 'checkpoints' / 'step_00000002')))
    assert {p.name: (p / 'model.safetensors').read_bytes() for _, p in list_checkpoints(out)} == before
    assert (out / 'metrics.jsonl').read_text() == metrics and first.step == 4


def test_a_checkpoint_that_cannot_be_written_is_an_error_line_and_leaves_no_partial_folder(tmp_path, bags, capsys):
    """A full disk (here: a real EFBIG from RLIMIT_FSIZE, as ENOSPC on a full disk) made blockvla-train end in a
    SafetensorError traceback."""
    import resource
    import signal

    cfg = tmp_path / 'c.yaml'
    make_config(tmp_path / 'run', [bags / 'mcap_raw'], steps=2, save_interval=1, eval_interval=100,
                eval_decode_samples=0).save(cfg)
    limits, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))  # the tiny policy's weights are ~0.7 MB
    try:
        rc = cli.main(['--config', str(cfg), '--no-progress'])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old_handler)
    err = capsys.readouterr().err
    assert rc == 2 and 'blockvla-train: error: cannot write the checkpoint' in err and 'step_00000001' in err, err
    assert 'no checkpoint was saved' in err and 'Traceback' not in err
    assert os.listdir(tmp_path / 'run' / 'checkpoints') == []  # the temporary folder is gone


def test_time_budget_stops_with_a_checkpoint(tmp_path, bags):
    result = train(make_config(tmp_path / 'tb', [bags / 'mcap_raw'], steps=1000, time_budget_s=1e-3))
    assert result.stopped == 'time_budget' and result.step == 1
    assert [s for s, _ in list_checkpoints(tmp_path / 'tb')] == [1]


def test_relative_bag_paths_are_recorded_absolute_so_export_finds_them_from_anywhere(tmp_path, bags, monkeypatch):
    """README trains with data.bags=[bags/] from one directory; blockvla-export's calibration reads the run's
    validation split from the checkpoint (train_config.yaml, val_split.json). Those held the relative paths, so an
    export from another directory stopped with 'bags: does not exist'. A moved run says which flags help."""
    from blockvla_ros.model.config import BlockVLAConfig
    from blockvla_ros.model.text_tokenizer import ByteTokenizer
    from blockvla_ros.training.validation import SPLIT_FILE, held_out_windows

    monkeypatch.chdir(bags)
    result = train(make_config(tmp_path / 'rel', ['mcap_raw'], steps=1, time_budget_s=1e-3))
    ckpt = Path(result.checkpoint)
    saved = load_train_config(ckpt / 'train_config.yaml')
    assert saved.data.bags == [str(bags / 'mcap_raw')]
    recorded = [e['bag'] for e in json.loads((ckpt / SPLIT_FILE).read_text())['episodes']]
    assert recorded and all(b.startswith(str(bags / 'mcap_raw') + '/') for b in recorded), recorded
    monkeypatch.chdir(tmp_path)
    config = BlockVLAConfig.load(ckpt / 'config.json')
    tokenizers = (ByteTokenizer(config.max_text_tokens, config.backbone['vocab_size']),
                  ActionTokenizer(NormStats.load(ckpt / 'stats.json'), config.n_bins))
    windows, source = held_out_windows(ckpt / 'train_config.yaml', config, *tokenizers, max_windows=2)
    assert len(windows) == 2 and 'as recorded in' in source

    moved = tmp_path / 'moved'  # a run whose bags are not where it recorded them (a copied run, an old one)
    moved.mkdir()
    saved.replace({'data.bags': ['bags/']}).save(moved / 'train_config.yaml')
    with pytest.raises(ValueError, match='--calibration-bags') as info:
        held_out_windows(moved / 'train_config.yaml', config, *tokenizers)
    assert "['bags/']" in str(info.value) and '--no-calibrate' in str(info.value)


def test_an_fsdp_config_naming_another_backbones_layer_class_names_this_ones():
    """config/train/accelerate_fsdp.yaml wraps Qwen2DecoderLayer; a Llama-based backbone (SmolVLM's, Llama's) got
    accelerate's 'Could not find the transformer layer class Qwen2DecoderLayer in the model.' and no way forward.
    The error accelerate raises for this policy, then what training says instead."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from blockvla_ros.training.distributed import fsdp_wrap_error

    from tiny import LLAMA, tiny_config

    policy = BlockVLAPolicy(tiny_config(LLAMA))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy='transformer_based_wrap',
                                            transformer_cls_names_to_wrap=['Qwen2DecoderLayer'])
    with pytest.raises(ValueError) as info:
        fsdp2_prepare_auto_wrap_policy(plugin, policy)
    message = str(fsdp_wrap_error(info.value, policy))
    assert 'Qwen2DecoderLayer' in message and message.endswith('decoder layer class: LlamaDecoderLayer'), message
    other = ValueError('something else')
    assert fsdp_wrap_error(other, policy) is other


def test_sigterm_stops_after_the_step_with_a_checkpoint(tmp_path, bags):
    import os
    import signal
    import threading

    out = tmp_path / 'term'

    def terminate_after_first_checkpoint():
        for _ in range(6000):
            if list_checkpoints(out):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            threading.Event().wait(0.01)

    thread = threading.Thread(target=terminate_after_first_checkpoint, daemon=True)
    thread.start()
    result = train(make_config(out, [bags / 'mcap_raw'], steps=1000, save_interval=2, eval_interval=1000))
    thread.join()
    assert result.stopped == 'signal' and 2 < result.step < 1000
    assert list_checkpoints(out)[-1][0] == result.step  # the step it stopped at was saved
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored


# --- bad input -------------------------------------------------------------------------------------------------------
def _write_bag(path, actions, storage='mcap', with_messages=True, width=None, instruction=True):
    """A bag written with rosbags directly (RecordingWriter refuses NaN): 32x32 images, state, Float32 actions."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    T = ts.types
    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns = {name: w.add_connection(topic, t, typestore=ts) for name, topic, t in (
            ('image', '/camera/image_raw', 'sensor_msgs/msg/Image'), ('text', '/instruction', 'std_msgs/msg/String'),
            ('state', '/joint_states', 'sensor_msgs/msg/JointState'),
            ('action', '/joint_command', 'std_msgs/msg/Float32MultiArray')) if instruction or name != 'text'}
        if not with_messages:
            return path
        t0 = 1_700_000_000 * 10**9
        for k, action in enumerate(actions):
            t = t0 + k * 10**8
            stamp = T['builtin_interfaces/msg/Time'](sec=t // 10**9, nanosec=t % 10**9)
            header = T['std_msgs/msg/Header'](stamp=stamp, frame_id='')
            msgs = {'image': T['sensor_msgs/msg/Image'](header=header, height=32, width=32, encoding='rgb8',
                                                        is_bigendian=0, step=96,
                                                        data=np.full(32 * 32 * 3, 10 * k % 250, np.uint8)),
                    'state': T['sensor_msgs/msg/JointState'](header=header, name=['x', 'y'],
                                                             position=np.array([0.1 * k, 0.0]),
                                                             velocity=np.zeros(0), effort=np.zeros(0)),
                    'action': T['std_msgs/msg/Float32MultiArray'](
                        layout=T['std_msgs/msg/MultiArrayLayout'](dim=[], data_offset=0),
                        data=np.asarray(action, np.float32))}
            if k == 0 and instruction:
                msgs['text'] = T['std_msgs/msg/String'](data='touch the red block')
            for name, msg in msgs.items():
                w.write(conns[name], t, ts.serialize_cdr(msg, msg.__msgtype__))
    return path


def _data(bags, **kw):
    return make_config('/nonexistent', bags, data=kw)


def test_missing_topic_error_lists_the_topics_the_bag_has(tmp_path, bags):
    config = _data([bags / 'mcap_raw'], topics={'state': '/joint_states', 'image': '/wrist_cam/image'})
    with pytest.raises(BagError) as err:
        load_episodes(config.data, config.model_config(), progress=False)
    msg = str(err.value)
    assert "'/wrist_cam/image'" in msg and 'touch_blue_seed0_ep0000' in msg
    for topic in ('/camera/image_raw', '/instruction', '/joint_states', '/joint_command'):
        assert topic in msg


def test_wrong_action_width_names_the_bag_and_the_knob(tmp_path, bags):
    config = make_config('/nonexistent', [bags / 'sqlite_jpeg'], model={'action_dim': 4, 'block_size': 4})
    with pytest.raises(BagError, match=r'sqlite_jpeg.*has width 3 but model.action_dim is 4'):
        load_episodes(config.data, config.model_config(), progress=False)


def test_empty_and_corrupt_bags_are_errors_or_skipped_with_a_warning(tmp_path, bags, caplog):
    root = tmp_path / 'mixed'
    shutil.copytree(bags / 'mcap_raw', root / 'good')
    _write_bag(root / 'empty', [], with_messages=False)
    corrupt = root / 'corrupt'
    shutil.copytree(bags / 'mcap_raw' / 'touch_red_seed0_ep0000', corrupt)
    mcap = next(corrupt.glob('*.mcap'))
    mcap.write_bytes(mcap.read_bytes()[:200] + b'\x00garbage' * 50)
    model = TrainConfig.from_dict({'model': MODEL}).model_config()
    with pytest.raises(BagError, match=r'corrupt'):
        load_episodes(_data([corrupt]).data, model, progress=False)
    with pytest.raises(BagError, match=r'empty.*bag is empty'):
        load_episodes(_data([root / 'empty']).data, model, progress=False)
    with caplog.at_level(logging.WARNING):
        episodes, report = load_episodes(_data([root], on_bad_bag='skip').data, model, progress=False)
    assert len(episodes) == 6 and report.bags == 8
    assert sorted(p.rsplit('/', 1)[-1] for p, _ in report.skipped_bags) == ['corrupt', 'empty']
    assert '2 of 8 bags skipped' in caplog.text
    # a directory without a single bag is an error, not an empty training run
    (tmp_path / 'nothing').mkdir()
    with pytest.raises(ValueError, match='no rosbag2 recordings'):
        load_episodes(_data([tmp_path / 'nothing']).data, model, progress=False)


def test_model_state_names_pick_the_policys_joints_from_a_wider_joint_state(tmp_path):
    """A robot's /joint_states carries more joints (arm + fingers) than the policy reads: model.state_names picks them
    by name, in that order (training required the state width to equal every joint of the message)."""
    from blockvla_ros.training.assemble import read_and_split

    _write_bag(tmp_path / 'bag', np.zeros((12, 3), np.float32))  # JointState names x, y; x = 0.1 k, y = 0
    config = _data([tmp_path / 'bag'])
    config.model.update(state_dim=1, state_names=['x'])
    episodes, _ = load_episodes(config.data, config.model_config(), progress=False)
    np.testing.assert_allclose(np.concatenate([ep.states for ep in episodes])[:, 0], 0.1 * np.arange(12), atol=1e-6)
    assert episodes[0].state_names == ['x']
    assert read_and_split(config, progress=False)[2].state_names == ['x']  # what policy.yaml names as state inputs
    config.model.update(state_dim=2, state_names=['y', 'x'])
    episodes, _ = load_episodes(config.data, config.model_config(), progress=False)
    assert episodes[0].state_names == ['y', 'x'] and np.all(episodes[0].states[:, 0] == 0)
    config.model.update(state_dim=1, state_names=['wrist'])
    with pytest.raises(BagError, match=r"\['wrist'\].*'/joint_states'.*\['x', 'y'\]"):
        load_episodes(config.data, config.model_config(), progress=False)


def test_model_action_names_order_the_bags_columns_by_name(bags):
    """model.action_names in another order than a JointTrajectory's joint_names: the columns follow the names (they
    kept the bag's order under the given labels, so the node would publish each action under another joint's name);
    names partly the bag's are an error naming model.action_names; names none of the bag's relabel by position."""
    from blockvla_ros.training.assemble import read_and_split

    config = _data([bags / 'mcap_raw'])
    plain, _ = load_episodes(config.data, config.model_config(), progress=False)
    bag_names = plain[0].action_names
    assert len(bag_names) == 3 and bag_names != generic_names(3)
    given = bag_names[::-1]
    config.model.update(action_names=given)
    episodes, report = load_episodes(config.data, config.model_config(), progress=False)
    assert episodes[0].action_names == given and report.reordered_bags
    np.testing.assert_array_equal(episodes[0].actions, plain[0].actions[:, ::-1])
    assert read_and_split(config, progress=False)[2].action_names == given
    config.model.update(action_names=[bag_names[1], bag_names[0], 'wrist'])  # some of the bag's names, swapped
    with pytest.raises(BagError, match=r"action names .* differ from .*'wrist'\] \(model.action_names; names given"):
        load_episodes(config.data, config.model_config(), progress=False)
    config.model.update(action_names=['j0', 'j1', 'j2'])  # none of the bag's: the policy's own labels, by position
    episodes, _ = load_episodes(config.data, config.model_config(), progress=False)
    np.testing.assert_array_equal(episodes[0].actions, plain[0].actions)
    assert read_and_split(config, progress=False)[2].action_names == ['j0', 'j1', 'j2']


def test_a_bag_without_an_instruction_topic_trains_on_data_instruction(tmp_path, bags):
    """Recordings of one task often carry no instruction topic: data.instruction gives the text; a bag that has the
    topic as well, or neither, is an error saying which."""
    _write_bag(tmp_path / 'bag', np.zeros((12, 3), np.float32), instruction=False)
    config = _data([tmp_path / 'bag'], instruction='pick up the cube')
    episodes, _ = load_episodes(config.data, config.model_config(), progress=False)
    assert [(ep.instruction, len(ep)) for ep in episodes] == [('pick up the cube', 12)]
    with pytest.raises(BagError, match=r"'/instruction' is not in the bag.*train with data.instruction"):
        load_episodes(_data([tmp_path / 'bag']).data, config.model_config(), progress=False)
    with pytest.raises(BagError, match=r"mcap_raw.*has instruction topic '/instruction' and data.instruction"):
        load_episodes(_data([bags / 'mcap_raw'], instruction='pick').data, config.model_config(), progress=False)
    with pytest.raises(ValueError, match='data.instruction'):
        _data([tmp_path / 'bag'], instruction=' ')


def test_nan_actions_are_skipped_counted_and_reported(tmp_path, caplog):
    actions = np.tile(np.array([[0.1, -0.2, 0.0]], np.float32), (12, 1))
    actions[[3, 7], 1] = np.nan
    actions[9, 0] = np.inf
    _write_bag(tmp_path / 'nan_bag', actions, storage='sqlite3')
    config = _data([tmp_path / 'nan_bag'])
    with caplog.at_level(logging.WARNING):
        episodes, report = load_episodes(config.data, config.model_config(), progress=False)
    assert report.counts['dropped_nan_action'] == 3 and len(episodes[0].actions) == 9
    assert np.all(np.isfinite(episodes[0].actions))
    assert 'skipped 3 ticks with NaN/inf actions' in caplog.text


def test_a_batch_larger_than_the_training_set_is_named_in_a_warning(tmp_path, bags, caplog):
    """The sampler repeats windows to fill a batch larger than the training set: it trains (smoke runs and overfit
    checks do this: benchmarks/convergence.py's test) and says so, naming the key."""
    with caplog.at_level(logging.WARNING):
        train(make_config(tmp_path / 'big', [bags / 'mcap_raw'], batch_size=64, steps=1, eval_interval=10,
                          save_interval=10))
    assert re.search(r'train.batch_size 64 is larger than the training set \(\d+ windows', caplog.text)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, bags, capsys):
    cfg = tmp_path / 'train.yaml'
    make_config(tmp_path / 'run', [bags / 'mcap_raw']).save(cfg)
    assert cli.main(['--config', str(cfg), 'data.topics.action=/arm/command', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.startswith('blockvla-train: error:') and "'/arm/command'" in err and '/joint_command' in err
    assert cli.main(['--config', str(cfg), 'train.batch_size=7', 'train.grad_accum=2']) == 2
    assert 'divisible' in capsys.readouterr().err
    assert cli.main(['--config', str(cfg), 'train.lr']) == 2
    assert 'key.sub=value' in capsys.readouterr().err
    assert cli.main(['--config', str(tmp_path / 'missing.yaml')]) == 2


# --- config, data pieces -------------------------------------------------------------------------------------------
def test_yaml_config_overrides_and_print(tmp_path, capsys):
    path = tmp_path / 'c.yaml'
    make_config(tmp_path / 'o', ['x']).save(path)
    config = load_train_config(path, ['train.lr=3e-4', 'train.mode=ar', 'model.backbone.hidden_size=32',
                                      'data.bags=[a, b]', 'train.lora.r=4'])
    assert config.train.lr == 3e-4 and config.data.bags == ['a', 'b'] and config.train.lora.r == 4
    model = config.model_config()
    assert model.train_mode == 'ar' and model.decoder == 'ar' and model.backbone['hidden_size'] == 32
    with pytest.raises(ValueError, match=r"train: unknown keys \['lrr'\]"):
        load_train_config(path, ['train.lrr=1'])
    with pytest.raises(ValueError, match='model section.*not divisible by block_size 5'):
        load_train_config(path, ['model.block_size=5'])  # 4 x 3 = 12 action tokens
    with pytest.raises(ValueError, match='contradicts train.mode'):
        load_train_config(path, ['model.train_mode=ar'])
    assert cli.main(['--config', str(path), 'train.steps=7', '--print-config']) == 0
    assert 'steps: 7' in capsys.readouterr().out


@pytest.mark.parametrize('override, message', [
    ('train.lr=null', 'train.lr must be a finite number, got None'),
    ('train.lr=.inf', 'train.lr must be a finite number'),
    ('data.rate_hz=true', 'data.rate_hz must be a finite number'),
    ('train.warmup_steps=abc', 'train.warmup_steps must be an integer'),
    ('train.keep_checkpoints=abc', 'train.keep_checkpoints must be an integer'),
    ('data.val_max_windows=abc', 'data.val_max_windows must be an integer'),
    ('train.progress=maybe', 'train.progress must be true or false'),
    ('train.lora.enabled=maybe', 'train.lora.enabled must be true or false'),
    ('train.lora=5', 'train.lora must be a mapping'),
    ('train.lora.target_modules=q_proj', 'train.lora.target_modules must be a list'),
    ('train.betas=[a,b]', r'train.betas must be two numbers in \[0, 1\)'),
    ('train.betas=[2,3]', r'train.betas must be two numbers in \[0, 1\)'),
    ('train.seed=-1', 'train.seed must be an int >= 0'),
    ('train.out_dir=null', 'train.out_dir must be a non-empty string'),
    ('data.topics.image=5', 'data.topics.image must be a topic name'),
    ('data.bags=[1]', 'data.bags must be a list of paths'),
    ('model=5', 'model must be a mapping'),
    ('train=5', 'train must be a mapping'),
])
def test_a_wrong_type_in_any_key_is_an_error_naming_the_key(tmp_path, override, message):
    """These reached a TypeError / AttributeError traceback from a comparison (or, train.seed=-1, numpy's
    'expected non-negative integer' after the bags were read)."""
    path = tmp_path / 'c.yaml'
    make_config(tmp_path / 'o', ['x']).save(path)
    with pytest.raises(ValueError, match=message):
        load_train_config(path, [override])


def test_cli_path_flags_stay_strings(tmp_path, capsys):
    """--out 2024 was parsed as YAML (an int), --resume 'a: b' as a mapping."""
    path = tmp_path / 'c.yaml'
    make_config(tmp_path / 'o', ['x']).save(path)
    assert cli.main(['--config', str(path), '--out', '2024', '--resume', 'runs/a: b', '--print-config']) == 0
    printed = yaml.safe_load(capsys.readouterr().out)['train']
    assert printed['out_dir'] == '2024' and printed['resume'] == 'runs/a: b'


def test_the_shipped_configs_are_valid():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    from blockvla_ros.tasks.spec import TASKS

    root = Path(__file__).resolve().parents[1] / 'config' / 'train'
    config = load_train_config(root / 'example.yaml')
    model = config.model_config()
    assert config.train.mode == 'blockdiff' and model.decoder == 'blockdiff' and model.block_size == model.action_dim
    text = load_text_tokenizer(model.text_tokenizer, model.max_text_tokens, model.backbone['vocab_size'])
    for task in TASKS.values():  # every tabletop instruction fits the prefix
        for shape in ('circle', 'square'):
            for instruction in task.instructions({c: shape for c in task.targets}):
                text.encode(instruction)
    assert load_config_from_file(str(root / 'accelerate_ddp.yaml')).distributed_type == 'MULTI_GPU'
    fsdp = load_config_from_file(str(root / 'accelerate_fsdp.yaml'))
    assert fsdp.distributed_type == 'FSDP' and fsdp.fsdp_config['fsdp_state_dict_type'] == 'FULL_STATE_DICT'


def test_windows_split_and_tail_policy():
    rng = np.random.default_rng(0)
    eps = [Episode(f'ep{i}', f'touch {i}', rng.integers(0, 255, (n, 48, 40, 3), dtype=np.uint8),
                   rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32),
                   np.arange(n)) for i, n in enumerate([2, 6, 9, 5, 7])]
    train_eps, val_eps = split_episodes(eps, 0.4, seed=3)
    assert len(val_eps) == 2 and not {e.bag_path for e in train_eps} & {e.bag_path for e in val_eps}
    assert split_episodes(eps, 0.4, seed=3)[1][0].bag_path == val_eps[0].bag_path  # deterministic
    config = TrainConfig.from_dict({'model': MODEL}).model_config()
    stats = NormStats.from_data(np.concatenate([e.actions for e in eps]), np.concatenate([e.states for e in eps]))
    text = load_text_tokenizer('byte', 40, 512)
    repeat = ChunkDataset(eps, config, text, ActionTokenizer(stats), 'repeat')
    drop = ChunkDataset(eps, config, text, ActionTokenizer(stats), 'drop')
    assert len(repeat) == 29 and len(drop) == 0 + 3 + 6 + 2 + 4  # H = 4
    last = repeat.window_actions(1)  # episode 0 (2 ticks), window at tick 1: the last action repeated
    assert np.array_equal(last, np.repeat(eps[0].actions[1:2], 4, axis=0))
    item = repeat[3]
    assert item['pixels'].shape == (3, 32, 32) and item['actions'].shape == (12,) and item['state'].shape == (2,)
    # frames are resized once at load, exactly as the runtime would resize the camera image
    resized = fit_images(eps[1].images, image_processor_for(config))
    assert np.array_equal(prepare_image(resized[0], config), prepare_image(eps[1].images[0], config))
    with pytest.raises(ValueError, match=r"ep0 \('touch x+'\): instruction is 41 tokens"):
        fields = [getattr(eps[0], k) for k in ('images', 'actions', 'states', 'stamps_ns')]
        ChunkDataset([Episode('ep0', 'touch ' + 'x' * 34, *fields)], config, text, ActionTokenizer(stats))


def test_data_order_is_a_function_of_the_step_and_independent_of_the_process_layout():
    one = StepBatchSampler(50, 8, world=1, rank=0, accum=2, seed=1, start=0, stop=20)
    two = [StepBatchSampler(50, 8, world=2, rank=r, accum=1, seed=1, start=0, stop=20) for r in range(2)]
    for step in range(20):
        assert one.indices(step, 0) == two[0].indices(step, 0) and one.indices(step, 1) == two[1].indices(step, 0)
    batches = list(one)
    resumed = list(StepBatchSampler(50, 8, world=1, rank=0, accum=2, seed=1, start=7, stop=20))
    assert resumed == batches[14:]
    epoch0 = [i for b in batches[:13] for i in b][:50]  # the first 50 samples are one permutation
    assert sorted(epoch0) == list(range(50))


def test_lora_needs_peft_or_merges_like_peft(tmp_path, bags):
    try:
        import peft  # noqa: F401
        has_peft = True
    except ImportError:
        has_peft = False
    config = make_config(tmp_path / 'lora', [bags / 'mcap_raw'], steps=4, eval_interval=4, save_interval=4,
                         lora={'enabled': True, 'r': 4, 'alpha': 8})
    if not has_peft:
        with pytest.raises(ImportError, match='`peft` package'):
            train(config)
    else:  # pragma: no cover - peft is optional
        result = train(config)
        policy = BlockVLAPolicy.load(result.checkpoint)  # merged, plain names
        assert not any('lora' in k for k in policy.state_dict())
    # merge arithmetic on a peft-layout state dict
    w, a, b, bias = torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2), torch.randn(5)
    merged = merge_lora_state({'llm.q.base_layer.weight': w, 'llm.q.base_layer.bias': bias,
                               'llm.q.lora_A.default.weight': a, 'llm.q.lora_B.default.weight': b,
                               'head.weight': w}, config.train.lora)
    assert sorted(merged) == ['head.weight', 'llm.q.bias', 'llm.q.weight']
    x = torch.randn(3, 6)
    assert torch.allclose(x @ merged['llm.q.weight'].T, x @ w.T + (x @ a.T @ b.T) * 2.0, atol=1e-5)
