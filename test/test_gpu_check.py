"""benchmarks/gpu_check.sh and its parts on a machine without a GPU: what can be checked short of CUDA.

gpu_latency.py runs its whole flow on the CPU (`--device cpu`, toy shape) and gpu_check_summary.py turns the JSON
into the README table; gpu_check.sh parses, and without a GPU it stops at once saying why. (`bash
benchmarks/gpu_check.sh --dry-run-cpu` runs every step on the CPU; too slow for the suite.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_latency_and_summary_on_the_cpu(tmp_path):
    out = tmp_path / 'gpu_latency_tiny.json'
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'gpu_latency.py'), '--device', 'cpu', '--shape', 'tiny',
           '--runs', '1', '--warmup', '1', '--agreement-observations', '1', '--threads', '1', '--json', str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data['results']) == {'fp32', 'bf16'} and data['engines']['bf16']['dtype'] == 'bfloat16'
    blockdiff = {r['decoder']: r for r in data['results']['fp32']}
    assert blockdiff['blockdiff']['nfe'] == 4 * 3 and blockdiff['ar']['nfe'] == 12  # tiny: L 12, B 3, 3 steps, folded
    assert 0 < data['bf16_vs_fp32']['token_agreement'] <= 1 and data['bf16_vs_fp32']['tokens'] == 3 * 12
    assert data['memory']['after_warmup_and_runs'] == {}  # GPU memory is reported on cuda only
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_check_summary.py'), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (tmp_path / 'summary.md').read_text()
    assert '| fp32 | ' in summary and '| bf16 | ' in summary and 'token agreement' in summary
    assert 'requires_cuda.xml missing' in summary and 'decode_latency_small_cuda.json: missing' in summary


def test_gpu_check_script_parses_and_stops_without_a_gpu(tmp_path):
    script = ROOT / 'benchmarks' / 'gpu_check.sh'
    assert subprocess.run(['bash', '-n', str(script)]).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU: gpu_check.sh would run for minutes')
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(['bash', str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'sees no CUDA GPU' in proc.stdout and 'stopped' in proc.stdout
    env_json = json.loads((tmp_path / 'env.json').read_text())
    assert env_json['gpus'] == [] and 'torch' in env_json
