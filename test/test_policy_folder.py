"""Loading a policy folder: manifest verification, name resolution inside the policy dirs, bad inputs to predict."""
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from blockvla_ros.runtime.policy_folder import (PolicyFolderError, load_policy_folder, resolve_policy,
                                                write_manifest)
from blockvla_ros.runtime.runner import PolicyRunner

from tiny_policy import export_tiny


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp('pf'), name='pick')


@pytest.fixture
def copy(exported, tmp_path):
    dst = tmp_path / 'models' / 'pick'
    shutil.copytree(exported, dst)
    return dst


@pytest.fixture(scope='module')
def runner(exported):
    return PolicyRunner.load(exported, threads=1)


def test_changed_file_is_refused_naming_it(copy):
    with open(copy / 'backbone.onnx', 'r+b') as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PolicyFolderError, match=r'backbone\.onnx: sha256 mismatch'):
        PolicyRunner.load(copy)


def test_changed_policy_yaml_or_stats_is_refused(copy):
    (copy / 'stats.json').write_text((copy / 'stats.json').read_text().replace('[', '[ ', 1))
    with pytest.raises(PolicyFolderError, match='stats.json: sha256 mismatch'):
        load_policy_folder(copy)


def test_missing_graph_is_refused_naming_it(copy):
    (copy / 'backbone.onnx').unlink()
    with pytest.raises(PolicyFolderError, match=r'backbone\.onnx: listed in manifest.json but missing'):
        load_policy_folder(copy)


def test_missing_manifest_and_unlisted_graph_are_refused(copy):
    (copy / 'manifest.json').unlink()
    with pytest.raises(PolicyFolderError, match='manifest.json is missing'):
        load_policy_folder(copy)
    write_manifest(copy)
    manifest = json.loads((copy / 'manifest.json').read_text())
    del manifest['files']['vision.onnx']  # a graph policy.yaml names but the manifest does not cover
    (copy / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(PolicyFolderError, match=r"files not listed in manifest.json: \['vision\.onnx'\]"):
        load_policy_folder(copy)  # closed world: the unlisted file itself is refused
    (copy / 'vision.onnx').unlink()
    with pytest.raises(PolicyFolderError, match=r'vision\.onnx: graph .* not covered by manifest.json'):
        load_policy_folder(copy)


def test_policy_yaml_cannot_name_files_outside_the_folder(copy):
    doc = yaml.safe_load((copy / 'policy.yaml').read_text())
    doc['graphs']['vision']['file'] = '../../etc/passwd'
    (copy / 'policy.yaml').write_text(yaml.safe_dump(doc))
    write_manifest(copy)
    with pytest.raises(PolicyFolderError, match='outside the policy folder'):
        load_policy_folder(copy)


def test_unsupported_format_version(copy):
    doc = yaml.safe_load((copy / 'policy.yaml').read_text())
    doc['format_version'] = 99
    (copy / 'policy.yaml').write_text(yaml.safe_dump(doc))
    write_manifest(copy)
    with pytest.raises(PolicyFolderError, match='format_version 99'):
        load_policy_folder(copy)


def test_resolve_policy_stays_inside_the_policy_dirs(copy, tmp_path):
    models = copy.parent
    other = tmp_path / 'other'
    other.mkdir()
    assert resolve_policy('pick', [other, models]) == copy.resolve()
    assert resolve_policy(str(copy), [models]) == copy.resolve()
    for bad in ('../other', str(tmp_path), '/etc', 'pick/../../other'):
        with pytest.raises(PolicyFolderError, match='outside the policy directories'):
            resolve_policy(bad, [models])
    with pytest.raises(PolicyFolderError, match='not found'):
        resolve_policy('nope', [models, other])
    with pytest.raises(PolicyFolderError, match='empty'):
        resolve_policy(' ', [models])
    outside = tmp_path / 'outside_policy'
    shutil.copytree(copy, outside)
    os.symlink(outside, models / 'sneaky')  # a link inside the dir that points outside it
    with pytest.raises(PolicyFolderError, match='outside the policy directories'):
        resolve_policy('sneaky', [models])


def test_bad_images_and_instructions_are_clear_errors(runner):
    s = runner.config.image_size
    with pytest.raises(ValueError, match=r'shape \[H, W, 3\]'):
        runner.predict(np.zeros((s, s), np.uint8), 'push the block')
    with pytest.raises(ValueError, match=r'\(32, 32, 4\)'):
        runner.predict(np.zeros((s, s, 4), np.uint8), 'push the block')
    with pytest.raises(ValueError, match='at most 40'):
        runner.predict(np.zeros((s, s, 3), np.uint8), 'push the red block ' * 10)
    with pytest.raises(ValueError, match='empty'):
        runner.predict(np.zeros((s, s, 3), np.uint8), '   ')
    with pytest.raises(ValueError, match=r'known_actions must have shape \[k, 3\]'):
        runner.predict(np.zeros((s, s, 3), np.uint8), 'push', known_actions=np.zeros((2, 5)))


def test_other_image_sizes_are_resized(runner):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    pred = runner.predict(big, 'push the block')
    assert pred.actions.shape == (runner.config.chunk_len, runner.config.action_dim)
    assert pred.actions.dtype == np.float32
    assert np.all(pred.actions >= runner.action_low) and np.all(pred.actions <= runner.action_high)
    small = runner.predict(big[::4, ::4].copy(), 'push the block')
    assert small.actions.shape == pred.actions.shape


def test_runner_api_and_known_actions(runner):
    assert runner.action_names == ['a0', 'a1', 'a2'] and runner.name == 'pick'
    d = runner.describe()
    assert d['engine'] == 'onnxruntime' and d['provider'] == 'CPUExecutionProvider' and d['device'] == 'cpu'
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    runner.warmup(1)
    first = runner.predict(image, 'push the block')
    assert set(first.timings) >= {'prefill_ms', 'decode_ms', 'total_ms'} and first.nfe > 0
    assert first.timings['total_ms'] >= first.timings['prefill_ms'] > 0
    known = first.actions[:2]
    cont = runner.predict(image, 'push the block', known_actions=known)
    k = 2 * runner.config.action_dim
    assert np.array_equal(cont.tokens[:k], runner.action_tokenizer.encode(known))
    assert np.allclose(cont.actions[:2], known, atol=1e-5)  # bin centres decode back to themselves


def test_overrides_are_validated(exported):
    with pytest.raises(ValueError, match='unknown decoding overrides'):
        PolicyRunner.load(exported, overrides={'n_bins': 2})
    with pytest.raises(ValueError, match=r'block_size 2: this policy was trained with block sizes \[3\]'):
        PolicyRunner.load(exported, overrides={'block_size': 2})
    with pytest.raises(ValueError, match='steps_per_block'):
        PolicyRunner.load(exported, overrides={'steps_per_block': 99})
    r = PolicyRunner.load(exported, decoder='ar', overrides={'schedule': 'fixed'}, threads=1)
    pred = r.predict(np.zeros((32, 32, 3), np.uint8), 'push')
    assert r.describe()['decoder'] == 'ar' and pred.nfe == r.config.n_action_tokens
