"""Issue 13 items 1, 3, 4, 7 (loader side): every hostile or clumsy policy folder is a PolicyFolderError with a reason.

Wrong types anywhere in policy.yaml / stats.json / manifest.json, absurd numbers, symlinks out of the folder, files the
manifest does not list and `config.backbone_path` are each refused by load_policy_folder, naming the problem; a seeded
mutation fuzz over the whole document shows that nothing else (TypeError, KeyError, AttributeError...) escapes.
"""
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

from blockvla_ros.runtime.policy_folder import PolicyFolderError, load_policy_folder, write_manifest
from blockvla_ros.runtime.runner import PolicyRunner

from tiny_policy import export_tiny

DEMO = Path(__file__).resolve().parents[1] / 'models' / 'demo'


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp('schema'), name='pick')


@pytest.fixture
def copy(exported, tmp_path):
    dst = tmp_path / 'models' / 'pick'
    shutil.copytree(exported, dst)
    return dst


def edit_yaml(folder: Path, change) -> None:
    doc = yaml.safe_load((folder / 'policy.yaml').read_text())
    change(doc)
    (folder / 'policy.yaml').write_text(yaml.safe_dump(doc))
    write_manifest(folder)


def edit_stats(folder: Path, change) -> None:
    doc = json.loads((folder / 'stats.json').read_text())
    change(doc)
    (folder / 'stats.json').write_text(json.dumps(doc))
    write_manifest(folder)


def _set(path: str, value):
    """A change that sets doc[a][b]... = value ('a.b.0.c' style path)."""
    def change(doc):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split('.')]
        for p in parents:
            doc = doc[p]
        doc[last] = value
    return change


POLICY_CASES = [  # (change, the reason the error must give)
    (_set('surprise', 1), r"unknown keys \['surprise'\]"),
    (_set('actions', {}), r'actions: missing names, low, high'),
    (_set('actions', None), r'actions: expected a mapping, got null'),
    (_set('actions', [1, 2]), r'actions: expected a mapping, got list'),
    (_set('graphs', []), r'graphs: expected a mapping, got list'),
    (_set('graphs', {}), r'graphs: missing vision, backbone'),
    (_set('tokenizer_files', 5), r'tokenizer_files: expected a list, got int'),
    (_set('tokenizer_files', None), r'tokenizer_files: expected a list, got null'),
    (_set('tokenizer_files', ['tokenizer.json']), r"text_tokenizer is 'byte'"),
    (_set('config', None), r'config: expected a mapping, got null'),
    (_set('config.vision', []), r'vision must be a mapping'),
    (_set('config.action_dim', '3'), r'action_dim must be a positive integer'),
    (_set('config.action_dim', True), r'action_dim must be a positive integer'),
    (_set('config.chunk_len', 10 ** 9), r'chunk_len must be a positive integer <= 4096'),
    (_set('config.threshold', 'high'), r'threshold must be a finite number'),
    (_set('config.image_mean', [0.5, None, 0.5]), r'image_mean must be 3 finite numbers'),
    (_set('config.backbone.vocab_size', -1), r'backbone.vocab_size must be an integer'),
    (_set('config.extra_field', 1), r'unknown keys'),
    (_set('config.backbone_path', '/somewhere/else'), r'backbone_path .* never loads a backbone from elsewhere'),
    (_set('config.vision', {'type': 'hf', 'num_tokens': 4, 'path': '/elsewhere'}), r'vision.path .* never loads'),
    (_set('config.vision', {'type': 'hf', 'num_tokens': 4, 'config': [1]}), r'vision.config must be a mapping'),
    (_set('kv_shape', [2, 2]), r'kv_shape: expected 3 entries'),
    (_set('kv_shape', [2, 2, 1.5]), r'kv_shape\[2\]: expected an integer'),
    (_set('actions.low', [-1e308, 0, 0]), r'actions.low\[0\]: .* not a finite number within'),
    (_set('actions.high', [1e308, 1, 1]), r'actions.high\[0\]: .* not a finite number within'),
    (_set('actions.high', [float('inf'), 1, 1]), r'actions.high\[0\]: inf is not a finite number'),
    (_set('actions.low', [5, 5, 5]), r'high < low'),
    (_set('actions.names', ['a', 'a', 'b']), r'duplicate entries'),
    (_set('actions.names', None), r'actions.names: expected a list, got null'),
    (_set('graphs.vision.inputs', {}), r'graphs.vision.inputs: expected a list, got dict'),
    (_set('graphs.vision.inputs.0.shape', [1, 3, 10 ** 6, 10 ** 6]), r'elements \(limit'),
    (_set('graphs.vision.inputs.0.shape', [1, -3, 32, 32]), r'shape\[1\]: -3 is outside'),
    (_set('graphs.vision.inputs.0.dtype', 'object'), r"dtype: 'object' is not one of"),
    (_set('graphs.vision.file', None), r'graphs.vision.file: expected a string, got null'),
    (_set('graphs.vision.data', 'x.onnx.data'), r'graphs.vision.data: expected a list, got str'),
    (_set('graphs.vision.file', '../../etc/passwd'), r'points outside the policy folder'),
    (_set('graphs.vision.step_width', 3), r"graphs.vision: unknown keys \['step_width'\]"),
    (_set('graphs.evil', {}), r"graphs: unknown keys \['evil'\]"),
    (_set('graphs.vision.inputs.0.shape', [1, 3, 'n', 32]), r'the vision graph has static shapes only'),
    (_set('graphs.backbone.inputs.0.shape', [1, 'k', 64]), r"'k' is neither an integer nor a sum of a\*n, past, m"),
    (_set('graphs.backbone.inputs.0.shape', [1, 'n + n', 64]), r"'n \+ n' is neither an integer"),
    (_set('graphs.backbone.inputs.0.shape', [1, 'n + 2**70', 64]), r'neither an integer nor a sum of a\*n, past'),
    (_set('graphs.backbone.data', ['a.data', 'b.data']), r'graphs.backbone.data: 2 entries \(limit 1\)'),
    (_set('tables', 'other.safetensors'), r"tables: 'other.safetensors' is not one of"),
    (_set('tables', None), r'tables: expected a string, got null'),
    (_set('precision', 'int3'), r"precision: 'int3' is not one of"),
    (_set('weights', 'other.safetensors'), r"weights: 'other.safetensors' is not one of"),
    (_set('prefix.length', 999), r'prefix .* disagrees with config'),
    (_set('image_size', 64), r'image_size 64 differs'),
    (_set('name', ['x']), r'name: expected a string, got list'),
    (_set('format_version', True), r'format_version True is not supported'),
]


@pytest.mark.parametrize('change,reason', POLICY_CASES, ids=[r for _, r in POLICY_CASES])
def test_wrong_policy_yaml_fields_are_refused_with_a_reason(copy, change, reason):
    edit_yaml(copy, change)
    with pytest.raises(PolicyFolderError, match=reason):
        load_policy_folder(copy)


STATS_CASES = [
    (_set('surprise', 1), r"unknown keys \['surprise'\]"),
    (_set('action_low', None), r'action_low: expected a list, got null'),
    (_set('action_low', {'a': 1}), r'action_low: expected a list, got dict'),
    (_set('action_low', [-1e308, 0, 0]), r'action_low\[0\]: .* not a finite number'),
    (_set('action_high', [1e308, 1, 1]), r'action_high\[0\]: .* not a finite number'),
    (_set('action_high', [1, 1]), r'action_high: expected 3 entries'),
    (_set('action_high', ['1', 1, 1]), r'action_high\[0\]: expected a number, got str'),
    (_set('state_low', [0.0]), r'state_low: expected 0 entries'),
    (_set('n_samples', -5), r'n_samples: -5 is outside'),
]


@pytest.mark.parametrize('change,reason', STATS_CASES, ids=[r for _, r in STATS_CASES])
def test_wrong_stats_json_fields_are_refused_with_a_reason(copy, change, reason):
    edit_stats(copy, change)
    with pytest.raises(PolicyFolderError, match=reason):
        load_policy_folder(copy)


def test_stats_json_that_is_not_an_object_is_refused(copy):
    for text, reason in (('[1, 2]', 'expected a mapping, got list'), ('null', 'expected a mapping, got null'),
                         ('{"action_low": [NaN, 0, 0], "action_high": [1, 1, 1]}', r'nan is not a finite'),
                         ('{', 'not valid JSON')):
        (copy / 'stats.json').write_text(text)
        write_manifest(copy)
        with pytest.raises(PolicyFolderError, match=reason):
            load_policy_folder(copy)


def test_malformed_manifest_is_refused(copy):
    for doc, reason in (({'files': []}, 'files: expected a mapping, got list'),
                        ({'files': {'stats.json': 5}}, 'not a sha256 hex digest'),
                        ({'files': {'/etc/passwd': '0' * 64}}, 'points outside the policy folder'),
                        ({'files': {}, 'algorithm': 'md5'}, "'md5' is not one of"),
                        ({'files': {}, 'extra': 1}, r"unknown keys \['extra'\]"), ([], 'expected a mapping')):
        (copy / 'manifest.json').write_text(json.dumps(doc))
        with pytest.raises(PolicyFolderError, match=reason):
            load_policy_folder(copy)


def test_symlinked_file_or_subfolder_pointing_out_is_refused(copy, tmp_path):
    outside = tmp_path / 'outside'
    outside.mkdir()
    stats = json.loads((copy / 'stats.json').read_text())
    stats['action_high'] = [9.0, 9.0, 9.0]
    (outside / 'stats.json').write_text(json.dumps(stats))
    manifest = json.loads((copy / 'manifest.json').read_text())
    (copy / 'stats.json').unlink()
    os.symlink(outside / 'stats.json', copy / 'stats.json')
    from blockvla_ros.runtime.policy_folder import sha256_file
    manifest['files']['stats.json'] = sha256_file(outside / 'stats.json')  # the manifest even hashes the target
    (copy / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(PolicyFolderError, match=r'stats\.json \(symlink\): a policy folder holds regular files only'):
        load_policy_folder(copy)
    with pytest.raises(PolicyFolderError, match='symlinks or special files'):
        write_manifest(copy)  # the exporter's manifest writer refuses them too
    (copy / 'stats.json').unlink()
    shutil.copyfile(outside / 'stats.json', copy / 'stats.json')
    os.symlink(outside, copy / 'sub')  # a subfolder that points out
    with pytest.raises(PolicyFolderError, match=r'sub \(symlink\)'):
        load_policy_folder(copy)


def test_backbone_path_is_never_read_by_the_torch_engine(copy, tmp_path):
    edit_yaml(copy, _set('config.backbone_path', str(tmp_path / 'some_backbone')))
    with pytest.raises(PolicyFolderError, match='backbone_path'):
        PolicyRunner.load(copy, engine='torch')


def test_unlisted_tokenizer_file_is_refused(tmp_path):
    """A dropped-in tokenizer.json (or added_tokens.json, config.json...) would be read by the tokenizer: refused."""
    folder = tmp_path / 'models' / 'demo'
    shutil.copytree(DEMO, folder)
    spec = load_policy_folder(folder)
    assert set(spec.tokenizer_paths) == {'tokenizer.json', 'tokenizer_config.json'}
    assert all(p.parent == folder.resolve() for p in spec.tokenizer_paths.values())
    with pytest.raises(PolicyFolderError, match='not listed'):
        spec.listed('added_tokens.json')
    for name in ('added_tokens.json', 'special_tokens_map.json', 'chat_template.jinja', 'config.json'):
        (folder / name).write_text('{}')
        with pytest.raises(PolicyFolderError, match=rf"files not listed in manifest.json: \['{name}'\]"):
            load_policy_folder(folder)
        (folder / name).unlink()
    sub = folder / 'extra'
    sub.mkdir()
    (sub / 'tokenizer.json').write_text('{}')
    with pytest.raises(PolicyFolderError, match=r"extra/tokenizer\.json"):
        load_policy_folder(folder)


MUTANTS = [None, [], {}, 5, -1, 0, 1e308, -1e308, float('inf'), float('nan'), 'x', True, [1, 'a', None],
           {'a': {'b': []}}, 2 ** 70]


def _nodes(doc, path=()):
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, path + (i,))


def test_seeded_mutation_fuzz_raises_only_policy_folder_errors(copy):
    """Replace random nodes of policy.yaml / stats.json by hostile values: each load either succeeds or raises
    PolicyFolderError (never TypeError, KeyError, AttributeError, OverflowError...)."""
    import copy as copy_module
    pristine = yaml.safe_load((copy / 'policy.yaml').read_text())
    pristine.pop('export', None)  # provenance only: mutations there are (rightly) ignored
    stats = json.loads((copy / 'stats.json').read_text())
    rng = random.Random(13)
    refused = 0
    for trial in range(120):
        target, doc = ('stats', copy_module.deepcopy(stats)) if trial % 4 == 0 else \
            ('policy', copy_module.deepcopy(pristine))
        paths = [p for p in _nodes(doc) if p]
        for _ in range(rng.choice((1, 1, 2))):
            path = rng.choice(paths)
            node = doc
            try:
                for p in path[:-1]:
                    node = node[p]
                node[path[-1]] = copy_module.deepcopy(rng.choice(MUTANTS))
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation replaced a parent
        if target == 'stats':
            (copy / 'stats.json').write_text(json.dumps(doc))
            (copy / 'policy.yaml').write_text(yaml.safe_dump(pristine))
        else:
            (copy / 'stats.json').write_text(json.dumps(stats))
            (copy / 'policy.yaml').write_text(yaml.safe_dump(doc))
        write_manifest(copy)
        try:
            load_policy_folder(copy)
        except PolicyFolderError:
            refused += 1
    assert refused > 100  # nearly every mutation breaks the schema, and each one was a PolicyFolderError


def test_yaml_alias_bomb_and_oversized_files_are_refused(copy):
    pristine = (copy / 'policy.yaml').read_text()
    doc = yaml.safe_load(pristine)
    doc.pop('export', None)
    bomb = '  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n' + ''.join(
        f'  a{i}: &a{i} [{", ".join([f"*a{i - 1}"] * 10)}]\n' for i in range(1, 8))  # 10**8 values expanded
    (copy / 'policy.yaml').write_text(yaml.safe_dump(doc) + 'export:\n' + bomb)
    write_manifest(copy)
    with pytest.raises(PolicyFolderError, match=r'more than 1048576 values \(YAML aliases expanded\)'):
        load_policy_folder(copy)
    (copy / 'policy.yaml').write_text(pristine)
    (copy / 'stats.json').write_text(' ' * (16 << 20) + '{}')
    write_manifest(copy)
    with pytest.raises(PolicyFolderError, match=r'stats\.json: 16777218 bytes; a description file is at most'):
        load_policy_folder(copy)
