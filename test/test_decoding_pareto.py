"""benchmarks/decoding_pareto.py on the shipped demo policy and (--suite mt10, real MuJoCo) the shipped Meta-World
policy with a tiny budget: every promised field, the settings plan, the NFE accounting and the noise rule. Success
rates and timings are never asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import decoding_pareto  # noqa: E402

from tiny import tiny_config  # noqa: E402


def test_plan_covers_every_decoder_once():
    config = tiny_config(chunk_len=4, block_size=3, train_block_sizes=[3, 6], steps_per_block=2,
                         schedule='threshold', threshold=0.9)
    plan = decoding_pareto.plan_variants(config, max_steps=2, thresholds=(0.7, 0.9))
    names = [v.name for v in plan]
    assert plan[0].default and names[0] == 'blockdiff B=3, <=2 passes, tau 0.9'
    assert names[1:] == ['ar', 'blockdiff B=3, 1 passes', 'blockdiff B=3, 2 passes', 'blockdiff B=3, 3 passes',
                         'blockdiff B=3, <=3 passes, tau 0.7', 'blockdiff B=3, <=3 passes, tau 0.9',
                         'blockdiff B=6, 1 passes', 'blockdiff B=6, 2 passes', 'blockdiff B=6, 6 passes',
                         'blockdiff B=6, <=6 passes, tau 0.7', 'blockdiff B=6, <=6 passes, tau 0.9',
                         'fulldiff 12 passes']
    # the default is not repeated when a planned setting does the same thing
    plain = tiny_config(chunk_len=4, block_size=3, steps_per_block=1, schedule='threshold')
    plan = decoding_pareto.plan_variants(plain, max_steps=3, thresholds=())
    assert [v.name for v in plan] == ['blockdiff B=3, 1 passes', 'ar', 'blockdiff B=3, 2 passes',
                                      'blockdiff B=3, 3 passes', 'fulldiff 12 passes']


def test_within_noise_uses_both_standard_errors():
    best = {'success_rate': 0.5, 'stderr': decoding_pareto.stderr(0.5, 100)}
    assert decoding_pareto.within_noise(best, {'success_rate': 0.4, 'stderr': decoding_pareto.stderr(0.4, 100)})
    assert not decoding_pareto.within_noise(best, {'success_rate': 0.3,
                                                   'stderr': decoding_pareto.stderr(0.3, 100)})


@pytest.mark.slow
def test_pareto_on_the_demo_policy(tmp_path):
    out = tmp_path / 'pareto.json'
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'decoding_pareto.py'), '--policy', str(ROOT / 'models' / 'demo'),
           '--json', str(out), '--episodes', '1', '--tasks', 'touch_red', 'touch_blue', '--timing-rounds', '1',
           '--only', 'ar', '1 passes', 'fulldiff']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r['name']: r for r in data['settings']}
    assert 'ar' in rows and data['settings'][0]['default']
    L = data['n_action_tokens']
    assert rows['ar']['nfe_mean'] == L and rows['ar']['episodes'] == 2
    for r in data['settings']:
        assert 0 <= r['success_rate'] <= 1 and r['ms_p50'] > 0 and r['cpu_ms_p50'] > 0 and r['chunks'] > 0
        assert set(r['per_task']) == {'touch_red', 'touch_blue'}
    assert sum(r['best'] for r in data['settings']) == 1
    assert data['summary']['default_nfe_vs_ar'] == pytest.approx(data['settings'][0]['nfe_mean'] / L)
    table = out.with_suffix('.md').read_text()
    assert '(default)**' in table and '| ar |' in table
    assert out.with_suffix('.png').stat().st_size > 10_000


def test_pareto_on_metaworld_runs_end_to_end(tmp_path):
    """--suite mt10 on the shipped Meta-World policy, real MuJoCo: two tasks, one 12-step episode each."""
    os.environ.setdefault('MUJOCO_GL', 'egl')    # before mujoco is first imported, as the sim package does
    pytest.importorskip('metaworld', reason="Meta-World needs the sim extra: pip install '.[sim]' (make setup-sim)")
    out = tmp_path / 'pareto.json'
    assert decoding_pareto.main(['--policy', str(ROOT / 'models' / 'metaworld_mt10'), '--suite', 'mt10', '--json',
                                 str(out), '--tasks', 'reach', 'drawer-close', '--episodes', '1', '--episode-steps',
                                 '12', '--timing-rounds', '1', '--only', 'ar', '1 passes']) == 0
    data = json.loads(out.read_text())
    assert data['suite'] == 'mt10' and data['seed'] == 1 and data['episode_steps'] == 12
    rows = {r['name']: r for r in data['settings']}
    assert data['settings'][0]['default']
    assert set(rows) == {data['settings'][0]['name'], 'ar', 'blockdiff B=4, 1 passes'}
    assert rows['ar']['nfe_mean'] == data['n_action_tokens']
    for r in data['settings']:
        assert r['episodes'] == 2 and set(r['per_task']) == {'reach-v3', 'drawer-close-v3'}
        assert 2 <= r['chunks'] <= 6 and r['ms_p50'] > 0    # <= 12 steps per episode, 4 executed per chunk
    assert 'Closed loop on Meta-World mt10' in out.with_suffix('.md').read_text()
    assert out.with_suffix('.png').stat().st_size > 10_000
