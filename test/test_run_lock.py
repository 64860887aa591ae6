"""Issue 13 items 9 and 10 (tools): one blockvla-train per out_dir (flock: a killed run's lock is free again);
`--out` naming an existing file is refused before any work; a SIGKILL-ed blockvla-export leaves temporary
folders that the next export removes (a live export's are left alone)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blockvla_ros.evaluation import cli as replay_cli
from blockvla_ros.export import cli as export_cli
from blockvla_ros.io.atomic import atomic_directory
from blockvla_ros.io.file_lock import FileLock, LockedError, try_flock
from blockvla_ros.training import cli as train_cli

from test_training import make_config, record
from tiny_policy import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HOLD = ('import sys, time; sys.path.insert(0, {root!r}); from blockvla_ros.io.file_lock import {what}; '
        'x = {call}; print("held", flush=True); time.sleep(600)')


def _hold_in_child(call: str, what: str) -> subprocess.Popen:
    """A child process that takes a lock and then sleeps (to be SIGKILL-ed)."""
    proc = subprocess.Popen([sys.executable, '-c', HOLD.format(root=str(ROOT), what=what, call=call)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    root = tmp_path_factory.mktemp('lockbags')
    record(root / 'bag', episodes=1)
    return root / 'bag'


def test_second_train_on_the_same_out_dir_is_refused(bag, tmp_path, capsys):
    cfg = tmp_path / 'train.yaml'
    out_dir = tmp_path / 'run'
    make_config(out_dir, [bag], steps=2, eval_interval=2, save_interval=2, eval_decode_samples=0).save(cfg)
    out_dir.mkdir()
    with FileLock(out_dir / '.lock', 'training run folder'):  # as a running blockvla-train holds it
        assert train_cli.main(['--config', str(cfg), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert 'training run folder is in use by another process (pid %d since' % os.getpid() in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == ['.lock']  # nothing written: no metrics, no config


def test_lock_of_a_killed_train_does_not_block(bag, tmp_path, capsys):
    cfg = tmp_path / 'train.yaml'
    out_dir = tmp_path / 'run'
    make_config(out_dir, [bag], steps=2, eval_interval=2, save_interval=2, eval_decode_samples=0).save(cfg)
    out_dir.mkdir()
    holder = _hold_in_child(f"FileLock({str(out_dir / '.lock')!r}).acquire()", 'FileLock')
    with pytest.raises(LockedError, match=f'pid {holder.pid} since'):
        FileLock(out_dir / '.lock').acquire()
    _kill(holder)  # SIGKILL: no cleanup ran, the lock file (with the dead pid) stays
    assert (out_dir / '.lock').read_text().startswith(f'pid {holder.pid}')
    assert train_cli.main(['--config', str(cfg), '--no-progress']) == 0, capsys.readouterr().err
    assert (out_dir / 'train_config.yaml').is_file()


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / 'afile'
    afile.write_text('precious')
    ckpt = tmp_path / 'no_checkpoint_needed'  # the --out check comes first, so this is never read
    assert export_cli.main(['--checkpoint', str(ckpt), '--out', str(afile), '-q']) == 1
    assert f'--out {afile}: {afile} exists and is not a directory' in capsys.readouterr().err
    assert export_cli.main(['--checkpoint', str(ckpt), '--out', str(afile / 'sub'), '-q']) == 1
    assert 'exists and is not a directory' in capsys.readouterr().err
    assert replay_cli.main(['--bag', str(tmp_path / 'nobag'), '--policy', 'nopolicy', '--out', str(afile)]) == 2
    assert f'--out {afile}: {afile} exists and is not a directory' in capsys.readouterr().err
    cfg = tmp_path / 'train.yaml'
    make_config(afile, [tmp_path / 'nobag']).save(cfg)
    assert train_cli.main(['--config', str(cfg), '--no-progress']) == 2
    assert f'train.out_dir {afile}: {afile} exists and is not a directory' in capsys.readouterr().err
    assert afile.read_text() == 'precious'


def test_temp_folders_of_a_killed_export_are_removed_by_the_next(tmp_path):
    models = tmp_path / 'models'
    models.mkdir()
    code = ('import sys, os, time; sys.path.insert(0, {root!r}); from blockvla_ros.io.atomic import atomic_directory\n'
            'with atomic_directory({out!r}) as tmp:\n'
            '    (tmp / "policy.yaml").write_text("half")\n'
            '    print(tmp, flush=True); time.sleep(600)\n')

    def writer() -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen([sys.executable, '-c', code.format(root=str(ROOT), out=str(models / 'pick'))],
                                stdout=subprocess.PIPE, text=True)
        return proc, Path(proc.stdout.readline().strip())

    killed, stale = writer()
    _kill(killed)
    assert stale.is_dir() and stale.name.startswith('.pick.') and stale.name.endswith('.tmp')
    live, busy = writer()
    try:
        assert not stale.exists()  # the next write into models/pick removed the dead writer's folder
        assert try_flock(busy) is None  # the live writer holds its own
        killed, stale = writer()
        _kill(killed)
        assert stale.is_dir()
        ckpt = write_checkpoint(tmp_path / 'ckpt')
        assert export_cli.main(['--checkpoint', str(ckpt), '--out', str(models / 'pick'), '--threads', '1',
                                '--parity-samples', '1', '--no-calibrate', '-q']) == 0
        assert not stale.exists()  # blockvla-export removed the killed one's leftover
        assert busy.is_dir()  # and left the live writer's alone
        assert sorted(p.name for p in models.iterdir()) == sorted(['pick', busy.name])
    finally:
        _kill(live)
    with atomic_directory(models / 'pick') as tmp:  # the next write sweeps the (now dead) writer's folder
        (tmp / 'x').write_text('x')
    assert sorted(p.name for p in models.iterdir()) == ['pick']
