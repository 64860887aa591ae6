"""Training across processes: a real 2-process gloo (CPU) run through torchrun, and a real SIGKILL + resume."""
import os
import signal
import subprocess
import sys
import time

import pytest

from blockvla_ros.training.checkpoint import list_checkpoints
from blockvla_ros.training.metrics import read_metrics
from blockvla_ros.training.trainer import train

from test_training import make_config, one_thread, record, train_losses  # noqa: F401  (one_thread: fixture)

pytestmark = pytest.mark.slow


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
