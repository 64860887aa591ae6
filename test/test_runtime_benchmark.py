"""Smoke run of benchmarks/decode_latency.py (tiny config, 2 runs): the JSON holds every promised field.

Timings are never asserted; only that they were measured and the NFE accounting is consistent.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_latency_smoke(tmp_path):
    out = tmp_path / 'bench.json'
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'decode_latency.py'), '--json', str(out), '--runs', '2',
           '--warmup', '1', '--small-config', 'tiny', '--threads', '1', '--memory-predictions', '120']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ('blockdiff_vs_fulldiff_speedup', 'blockdiff_vs_fulldiff_cached_speedup', 'blockdiff_vs_ar_speedup',
                'fused_commit_speedup', 'folded_prefill_speedup', 'ort_vs_torch_speedup'):
        assert data[key] > 0
    # tiny: L = 12, B = 3, 3 steps per block (commits fused, the prefill folded into the first refine pass: NFE =
    # refine passes), full diffusion 4 * 3 passes
    assert data['nfe_ar'] == 12 and data['nfe_blockdiff'] == 4 * 3 and data['nfe_fulldiff'] == 12
    assert data['nfe_blockdiff_unfused'] == 4 * 3 + 3 and data['nfe_blockdiff_unfolded'] == 1 + 4 * 3
    assert {r['decoder'] for r in data['results']['onnxruntime']} == {'blockdiff', 'blockdiff_unfused', 'ar',
                                                                      'blockdiff_unfolded', 'fulldiff',
                                                                      'fulldiff_nocache'}
    passes = data['per_pass_onnxruntime']
    assert len(passes) == 3 and all(r['cpu_ms'] > 0 for r in passes.values())
    assert data['instruction_kv_reuse']['implemented'] is True
    # peers on the same backbone, same run: onnxruntime-genai AR (pinned in requirements.txt) and HF generate
    assert data['blockdiff_vs_genai_ar_speedup'] > 0 and data['blockdiff_vs_hf_generate_speedup'] > 0
    assert data['peers']['new_tokens'] == {'genai_ar': 12, 'hf_generate': 12, 'genai_ar_kept': 12}
    # the node's default path beside the cold figures: instruction K/V kept (ours), rewind_to the instruction (genai)
    kept = data['instruction_kept']
    assert {r['decoder'] for r in kept['results']} == {'blockdiff', 'ar'}
    assert kept['blockdiff_vs_ar_speedup'] > 0 and kept['cpu_ratios']['blockdiff_vs_ar_speedup'] > 0
    assert kept['blockdiff_vs_genai_ar_speedup'] > 0 and kept['blockdiff_vs_genai_ar_cpu_ratio'] > 0
    assert data['peers']['prompt_tokens'] == 44  # the prefix: 40 text + 4 image
    assert data['memory']['rss_mb_after_100'] > 0 and data['memory']['rss_mb_after_120'] > 0
    assert 'median ms' in proc.stdout and 'RSS' in proc.stdout
