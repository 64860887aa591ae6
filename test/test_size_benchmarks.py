"""benchmarks/real_size.py and benchmarks/train_memory.py at toy size: every promised field is measured.

Figures are never asserted (the machine is shared); only that they were measured and are consistent.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import shapes  # noqa: E402

pytestmark = pytest.mark.slow


def test_random_backbone_is_written_in_shards_that_from_pretrained_reads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(shapes, 'SHARD_BYTES', 100_000)  # several shards even for the toy shape
    folder = shapes.write_random_backbone('tiny', tmp_path / 'bb')
    index = json.loads((folder / 'model.safetensors.index.json').read_text())
    assert len(set(index['weight_map'].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == shapes.param_count('tiny')
    with torch.no_grad():
        assert float(model.model.norm.weight.min()) == 1.0
        assert 0.01 < float(model.model.embed_tokens.weight.std()) < 0.03
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, stored once
    assert shapes.param_count('qwen2.5-0.5b') == 494_032_768  # the published size of Qwen2.5-0.5B
    assert shapes.backbone_graph_bytes('qwen2.5-0.5b-40l') > 2 ** 31 > shapes.backbone_graph_bytes('qwen3-0.6b')


def test_real_size_reports_every_promised_field(tmp_path):
    """Every precision the exporter writes, on policy folder format 2 (the toy shape); int8 / int4 at two
    quantization block sizes (one row each)."""
    from blockvla_ros.export.precision import PRECISIONS

    out = tmp_path / 'rs.json'
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'real_size.py'), '--shape', 'tiny', '--json', str(out),
           '--precisions', *PRECISIONS, '--runs', '2', '--observations', '2', '--threads', '1',
           '--quant-block-sizes', '32', '64']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ('export_s', 'export_cpu_s', 'export_peak_rss_gb', 'weight_gb', 'folder_over_weights',
                'runner_rss_over_weights', 'load_s'):
        assert data[key] > 0, key
    assert set(data['precisions']) == {'fp32', 'fp16', 'int8-b32', 'int8-b64', 'int4-b32', 'int4-b64'}
    for name, row in data['precisions'].items():
        assert 'export_error' not in row and 'run_error' not in row, (name, row)
        assert f'--precision {row["precision"]}' in row['export_command'] and name.startswith(row['precision'])
        block = row['quant_block_size']
        assert (block is None) == (row['precision'] in ('fp32', 'fp16'))
        assert block is None or (name.endswith(f'-b{block}') and f'--quant-block-size {block}' in row['export_command'])
        for key in ('ms_per_chunk_1t', 'ms_per_chunk_2t', 'cpu_ms_per_chunk_1t', 'folder_over_weights',
                    'runner_rss_over_weights', 'process_rss_gb', 'runner_added_rss_over_weights', 'runner_rss_anon_gb',
                    'runner_rss_file_gb'):
            assert row[key] > 0, (name, key)
        assert 0.0 <= row['token_agreement'] <= 1.0
        assert {'vision.onnx', 'backbone.onnx', 'tables.safetensors', 'policy.yaml'} <= set(row['files'])
        assert row['folder_gb'] * 1e9 == pytest.approx(sum(row['files'].values()))
        assert 0 < row['backbone_graph_gb'] < row['folder_gb']
    assert data['precisions']['fp32']['token_agreement'] == 1.0  # ONNX Runtime fp32 decodes what torch decodes
    sizes = {name: row['backbone_graph_gb'] for name, row in data['precisions'].items()}
    assert sizes['int4-b32'] < sizes['int8-b32'] < sizes['fp16'] < sizes['fp32']  # stored at the precision asked for
    assert sizes['int4-b64'] < sizes['int4-b32'] and sizes['int8-b64'] < sizes['int8-b32']  # fewer scales
    assert 'tokens =' in proc.stdout


def test_train_memory_measures_a_setting(tmp_path):
    out = tmp_path / 'tm.json'
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'train_memory.py'), '--shape', 'tiny', '--json', str(out),
           '--settings', 'lora-bf16-gc', '--steps', '2', '--batch-size', '4', '--episodes', '1', '--threads', '1']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())['settings']['lora-bf16-gc']
    assert row['returncode'] == 0 and row['steps'] == 2 and row['peak_rss_gb'] > 0.1 and row['within_limit']
    assert row['overrides']['train.frozen_dtype'] == 'bf16'


def test_runner_memory_reports_every_stage():
    """benchmarks/runner_memory.py on the shipped demo policy: a row per load stage and chunk, two variants."""
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'runner_memory.py'), str(ROOT / 'models' / 'demo'),
           '--variants', 'default', 'no-arena', '--chunks', '1']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'failed' not in proc.stdout
    for variant in ('default', 'no-arena'):
        block = proc.stdout.split(f'variant {variant},')[1].split('peak (VmHWM)')[0]
        stages = [line[:18].strip() for line in block.strip().splitlines()[2:]]  # the stage column
        assert stages == ['bare', 'folder', 'tables', 'session vision', 'session backbone', 'engine', 'runner',
                          'warm-up chunk', 'chunk 1'], stages


def test_policy_checkpoint_on_a_random_backbone_is_the_same_every_time(tmp_path):
    """The parts the backbone folder lacks are seeded, so real_size's agreement compares one policy per shape."""
    backbone = shapes.write_random_backbone('tiny', tmp_path / 'bb')
    one, two = (shapes.make_policy_checkpoint(backbone, tmp_path / name) for name in ('one', 'two'))
    assert (one / 'model.safetensors').read_bytes() == (two / 'model.safetensors').read_bytes()
    other = shapes.make_policy_checkpoint(backbone, tmp_path / 'other', seed=1)
    assert (other / 'model.safetensors').read_bytes() != (one / 'model.safetensors').read_bytes()
