"""benchmarks/convergence.py from one command, at toy size: every mode trains and is evaluated, OUT holds
steps_to_target per mode and the target, a rerun resumes from the cache, another setting is refused."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_convergence_benchmark_runs_resumes_and_refuses_other_settings(tmp_path):
    cmd = [sys.executable, str(REPO / 'benchmarks' / 'convergence.py'), '--json', str(tmp_path / 'c.json'),
           '--work', str(tmp_path / 'work'), '--steps', '4', '--eval-every', '2', '--episodes', '1',
           '--train-episodes', '2', '--tasks', 'touch_red', '--target', '0.5']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((tmp_path / 'c.json').read_text())
    assert result['target'] == 0.5 and set(result['steps_to_target']) == {'blockdiff', 'fulldiff', 'ar'}
    assert set(result['steps_to_levels']) == {'0.25', '0.50', '0.75'} and 'speedup_vs_fulldiff_at_least' in result
    for mode, curve in result['curves'].items():
        assert [p['step'] for p in curve] == [2, 4], mode
        assert all(0.0 <= p['success_rate'] <= 1.0 for p in curve)
    assert (tmp_path / 'c.png').stat().st_size > 1000
    assert (tmp_path / 'work' / 'backbone' / 'tokenizer.json').is_file()
    assert (tmp_path / 'work' / 'vision.safetensors').is_file()
    # same settings: nothing is trained or evaluated again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'success' not in again.stdout.split('closed-loop success by training step')[0]
    assert again.stdout.count('already trained 4 steps') == 3 and 'training 4 steps' not in again.stdout
    assert json.loads((tmp_path / 'c.json').read_text())['curves'] == result['curves']
    # --evaluate-only: an interrupted run's off-grid save (step 3) is not compared; --max-step caps the comparison
    for mode in result['curves']:
        shutil.copytree(tmp_path / 'work' / mode / 'checkpoints' / 'step_00000002',
                        tmp_path / 'work' / mode / 'checkpoints' / 'step_00000003')
    partial = subprocess.run(cmd + ['--evaluate-only', '--max-step', '3', '--threads', '1'], capture_output=True,
                             text=True, timeout=900, env=env, cwd=tmp_path)
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert 'success' not in partial.stdout.split('closed-loop success by training step')[0]  # all cached
    capped = json.loads((tmp_path / 'c.json').read_text())
    assert capped['partial'] and capped['last_step'] == 3
    assert {mode: [p['step'] for p in curve] for mode, curve in capped['curves'].items()} == {
        mode: [2] for mode in result['curves']}
    missing = subprocess.run(cmd + ['--evaluate-only', '--eval-steps', '1', '2'], capture_output=True, text=True,
                             timeout=900, env=env, cwd=tmp_path)
    assert missing.returncode != 0 and 'no checkpoint for blockdiff 1' in missing.stderr
    other = subprocess.run(cmd[:-4] + ['--tasks', 'touch_blue', '--target', '0.5'], capture_output=True, text=True,
                           timeout=900, env=env, cwd=tmp_path)
    assert other.returncode != 0 and 'tasks differ' in other.stderr
