"""Calibration at export (issue 16): blockvla-export decodes the run's held-out windows, stores the fewest passes
that keep the full schedule's tokens in policy.yaml (`calibration`), and the runner decodes with that setting."""
import contextlib
import io
import shutil

import numpy as np
import pytest
import torch
import yaml

from blockvla_ros.export import cli as export_cli
from blockvla_ros.export.calibration import main as calibration_cli
from blockvla_ros.export.calibration import reference_setting
from blockvla_ros.model.action_tokenizer import NormStats
from blockvla_ros.model.policy import BlockVLAPolicy
from blockvla_ros.runtime.decoding import Decoder
from blockvla_ros.runtime.policy_folder import PolicyFolderError, load_policy_folder, write_manifest
from blockvla_ros.runtime.runner import PolicyRunner
from blockvla_ros.training.assemble import read_and_split
from blockvla_ros.training.validation import held_out_windows

from test_training import make_config, record

LEVEL = 0.4  # a random policy agrees with its full schedule on 24-66 % of the tokens: some settings pass, some not


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A random policy trained with block sizes 3, 6 and 12, saved as blockvla-train saves a checkpoint (weights,
    stats, the run's train_config.yaml whose validation split holds 2 of the 6 recorded episodes)."""
    root = tmp_path_factory.mktemp('calibration')
    record(root / 'bag', episodes=3)
    tc = make_config(root / 'run', [root / 'bag'], model={'train_block_sizes': [3, 6, 12]},
                     data={'val_fraction': 0.34}, steps=1)
    torch.manual_seed(0)
    ckpt = root / 'ckpt'
    BlockVLAPolicy(tc.model_config()).save(ckpt)
    train, _val, _cfg, _report = read_and_split(tc, progress=False)
    NormStats.from_data(np.concatenate([e.actions for e in train]),
                        np.concatenate([e.states for e in train])).save(ckpt / 'stats.json')
    tc.save(ckpt / 'train_config.yaml')
    return ckpt


def _export(ckpt, out, *extra) -> int:
    return export_cli.main(['--checkpoint', str(ckpt), '--out', str(out), '--threads', '1', '--parity-samples', '1',
                            '-q', *extra])


@pytest.fixture(scope='module')
def calibrated(checkpoint):
    """blockvla-export with calibration on 6 held-out windows -> (policy folder, what it printed)."""
    out = checkpoint.parent / 'models' / 'cal'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _export(checkpoint, out, '--calibration-level', str(LEVEL), '--calibration-windows', '6') == 0
    return out, printed.getvalue()


def test_the_calibrated_setting_is_the_runners_default(checkpoint, calibrated):
    out, printed = calibrated
    assert 'default decoding (calibrated on 6 windows from the validation split' in printed
    spec = load_policy_folder(out)
    cal = spec.calibration
    chosen, ref = cal['chosen'], cal['reference']
    assert cal['level'] == LEVEL and cal['windows'] == 6 and len(cal['candidates']) > 20
    assert (ref['block_size'], ref['steps_per_block'], ref['schedule']) == (3, 3, 'fixed')

    runner = PolicyRunner.load(out, engine='onnxruntime', threads=1)
    setting = {k: chosen[k] for k in ('block_size', 'steps_per_block', 'schedule')}
    assert {k: getattr(runner.config, k) for k in setting} == setting and runner.config.decoder == 'blockdiff'
    assert chosen['nfe'] < ref['nfe']  # fewer passes than the full schedule, and the fewest that reach the level
    assert all(r['agreement'] < LEVEL for r in cal['candidates'] if r['nfe'] < chosen['nfe'])

    # measured again, independently: the runner's own decoder against the full schedule on the held-out windows
    windows, _ = held_out_windows(checkpoint / 'train_config.yaml', spec.config, runner.preprocessor.text,
                                  runner.action_tokenizer, max_windows=6)
    full = Decoder(spec.config.replace(**reference_setting(spec.config.block_sizes).overrides()))
    ours = [runner.decoder(runner.engine, w) for w in windows]
    theirs = [full(runner.engine, w) for w in windows]
    agreement = float(np.mean([np.mean(a.tokens == b.tokens) for a, b in zip(ours, theirs)]))
    assert agreement >= LEVEL and agreement == pytest.approx(chosen['agreement'])
    assert np.mean([r.nfe for r in ours]) == pytest.approx(chosen['nfe'])
    assert np.mean([r.nfe for r in theirs]) == pytest.approx(ref['nfe'])


def test_no_calibrate_keeps_the_training_decoding_and_a_missing_run_config_is_named(checkpoint, tmp_path, capsys):
    out = tmp_path / 'models' / 'plain'
    assert _export(checkpoint, out, '--no-calibrate') == 0
    spec = load_policy_folder(out)
    assert spec.calibration is None and 'calibration' not in spec.raw
    assert (spec.config.block_size, spec.config.steps_per_block, spec.config.schedule) == (3, 3, 'threshold')
    # an exported folder calibrated afterwards, on other recordings: same weights, the chosen default, verified
    weights = {f: spec.manifest[f] for f in ('backbone.onnx', 'vision.onnx', 'tables.safetensors')}
    assert calibration_cli(['--policy', str(out), '--train-config', str(checkpoint / 'train_config.yaml'), '--bags',
                            str(checkpoint.parent / 'bag'), '--level', str(LEVEL), '--windows', '4',
                            '--threads', '1']) == 0
    assert 'default decoding of' in capsys.readouterr().out
    again = load_policy_folder(out)
    assert {f: again.manifest[f] for f in weights} == weights
    assert again.calibration['windows'] == 4 and 'episodes of' in again.calibration['source']
    assert again.config.block_size == again.calibration['chosen']['block_size']
    bare = tmp_path / 'bare'
    shutil.copytree(checkpoint, bare)
    (bare / 'train_config.yaml').unlink()
    assert _export(bare, tmp_path / 'models' / 'x') == 1
    err = capsys.readouterr().err
    assert 'train_config.yaml is missing' in err and '--no-calibrate' in err
    assert not (tmp_path / 'models' / 'x').exists()


@pytest.mark.parametrize('edit, message', [
    (lambda d: d['config'].update(schedule={'fixed': 'threshold', 'threshold': 'fixed'}[d['config']['schedule']]),
     "not config's default decoding"),
    (lambda d: d['calibration']['chosen'].update(agreement=0.1), 'below the level'),
    (lambda d: d['calibration']['chosen'].update(schedule='threshold', threshold=None),
     'a threshold is given exactly when'),
    (lambda d: d['calibration']['reference'].update(block_size=4), 'not one of the trained block sizes'),
    (lambda d: d['calibration'].update(level=float('nan')), 'not a finite number'),
    (lambda d: d['calibration'].update(extra=1), 'unknown keys'),
    (lambda d: d['calibration'].update(candidates={'a': 1}), 'expected a list'),
])
def test_a_tampered_calibration_section_is_refused(calibrated, tmp_path, edit, message):
    bad = tmp_path / 'cal'
    shutil.copytree(calibrated[0], bad)
    doc = yaml.safe_load((bad / 'policy.yaml').read_text())
    edit(doc)
    (bad / 'policy.yaml').write_text(yaml.safe_dump(doc, sort_keys=False))
    write_manifest(bad)  # the hashes match: only the schema can refuse it
    with pytest.raises(PolicyFolderError, match=message):
        load_policy_folder(bad)
