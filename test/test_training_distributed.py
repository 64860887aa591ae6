"""Training across processes: real 2-process gloo (CPU) runs through torchrun (DDP) and accelerate launch (FSDP2),
and a real SIGKILL + resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.training.checkpoint import list_checkpoints
from blockvla_ros.training.metrics import read_metrics
from blockvla_ros.training.trainer import train

from test_training import make_config, record, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('ROS_DOMAIN_ID', None)
    return env


@pytest.fixture(scope='module')
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp('dist_bags')
    record(root / 'mcap', 'mcap', 'raw', seed=0)
    record(root / 'sqlite', 'sqlite3', 'png', 'JointState', seed=1)
    return root


def test_two_process_gloo_run_matches_one_process(tmp_path, bags):
    """2 processes x 4 samples == 1 process x 2 micro-batches of 4: the same batches, masks and update."""
    config = make_config(tmp_path / 'ddp', [bags], steps=12, eval_interval=12, save_interval=100, log_interval=4,
                         eval_decode_samples=0)
    config.save(tmp_path / 'ddp.yaml')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           '-m', 'blockvla_ros.training.cli', '--config', str(tmp_path / 'ddp.yaml')],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count('checkpoint:') == 1  # only rank 0 reports
    assert [s for s, _ in list_checkpoints(tmp_path / 'ddp')] == [12]  # one checkpoint, written once
    ddp = read_metrics(tmp_path / 'ddp' / 'metrics.jsonl')
    assert [r['step'] for r in ddp if r['split'] == 'train'] == [4, 8, 12]

    accum = train(config.replace({'train.out_dir': str(tmp_path / 'accum'), 'train.grad_accum': 2}))
    single = train(config.replace({'train.out_dir': str(tmp_path / 'single')}))
    d, a, s = train_losses(ddp), train_losses(accum.history), train_losses(single.history)
    for step in (4, 8, 12):
        assert d[step] == pytest.approx(a[step], rel=2e-3), (step, d, a)
        assert d[step] == pytest.approx(s[step], rel=0.15), (step, d, s)
    dv = train_losses(ddp, 'val', 'val_loss')
    assert dv[12] == pytest.approx(accum.val_loss, rel=2e-3) and dv[12] < dv[0]


FSDP_CONFIG = Path(__file__).resolve().parents[1] / 'config' / 'train' / 'accelerate_fsdp.yaml'


def _accelerate_fsdp(config_path, *extra):
    """The shipped FSDP accelerate config, on 2 processes (train.device=cpu: gloo). Not accelerate's --cpu flag: it
    drops the FSDP settings (its CPU launcher passes none of them on)."""
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(FSDP_CONFIG),
           '--num_processes', '2', '--main_process_port', '0', '-m', 'blockvla_ros.training.cli',
           '--config', str(config_path), '--no-progress', *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)


def test_two_process_fsdp_on_cpu_matches_one_process_and_resumes(tmp_path, bags):
    """FSDP2 through accelerate on gloo, with gradient checkpointing: sharded params/grads/AdamW state give the update
    of 1 process x 2 micro-batches; the checkpoint is gathered to full weights, and a second launch resumes from it."""
    config = make_config(tmp_path / 'fsdp', [bags], steps=8, eval_interval=8, save_interval=4, log_interval=2,
                         eval_decode_samples=0, gradient_checkpointing=True, device='cpu')
    config.save(tmp_path / 'fsdp.yaml')
    first = _accelerate_fsdp(tmp_path / 'fsdp.yaml', '--max-steps', '4')
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert 'FSDP2 on CPU over gloo: 2 processes' in first.stderr
    second = _accelerate_fsdp(tmp_path / 'fsdp.yaml')  # resumes at step 4: sharded optimizer state loaded back
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(tmp_path / 'fsdp')] == [4, 8]
    ckpt = list_checkpoints(tmp_path / 'fsdp')[-1][1]
    state = json.loads((ckpt / 'training_state' / 'state.json').read_text())
    assert state['distributed'] == 'FSDP' and state['world_size'] == 2 and state['step'] == 8
    BlockVLAPolicy.load(ckpt)  # full (gathered) weights under the plain names

    accum = train(config.replace({'train.out_dir': str(tmp_path / 'accum'), 'train.grad_accum': 2}))
    f, a = train_losses(read_metrics(tmp_path / 'fsdp' / 'metrics.jsonl')), train_losses(accum.history)
    assert sorted(f) == [2, 4, 6, 8]
    for step in (2, 4, 6, 8):
        assert f[step] == pytest.approx(a[step], rel=2e-3), (step, f, a)
    fv = train_losses(read_metrics(tmp_path / 'fsdp' / 'metrics.jsonl'), 'val', 'val_loss')
    assert fv[8] == pytest.approx(accum.val_loss, rel=2e-3) and fv[8] < fv[0]


def test_sigkill_during_training_then_resume_continues_the_same_curve(tmp_path, bags):
    config = make_config(tmp_path / 'killed', [bags / 'mcap'], steps=400, save_interval=3, eval_interval=1000,
                         log_interval=1, eval_decode_samples=0)
    config.save(tmp_path / 'k.yaml')
    proc = subprocess.Popen([sys.executable, '-m', 'blockvla_ros.training.cli', '--config', str(tmp_path / 'k.yaml'),
                             '--no-progress'], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list_checkpoints(tmp_path / 'killed')) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, 'no second checkpoint in time'
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: possibly in the middle of the next save
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    resumed_from = list_checkpoints(tmp_path / 'killed')[-1][0]
    stop = resumed_from + 4
    resumed = train(config.replace({'train.max_steps': stop}))
    fresh = train(config.replace({'train.max_steps': stop, 'train.out_dir': str(tmp_path / 'fresh')}))
    assert resumed.step == fresh.step == stop
    records = read_metrics(tmp_path / 'killed' / 'metrics.jsonl')
    assert [x['step'] for x in records if x['split'] == 'train'] == list(range(1, stop + 1))  # no step twice
    r, f = train_losses(records), train_losses(fresh.history)
    for step in range(1, stop + 1):
        assert r[step] == pytest.approx(f[step], rel=1e-4, abs=1e-5), (step, r[step], f[step])
    assert resumed.val_loss == pytest.approx(fresh.val_loss, rel=1e-4)
    assert not list((tmp_path / 'killed' / 'checkpoints').glob('.step_*'))
