"""evaluation.report / plots on replay results built from arrays: pooled figures, strict JSON, markdown
side by side, PNG files; an episode without actions still reports latency and says why errors are missing."""
import json

import numpy as np
import pytest

from blockvla_ros.evaluation import metrics
from blockvla_ros.evaluation.plots import write_plots
from blockvla_ros.evaluation.replay import BagEpisodes, EpisodeReplay, ReplaySettings, VariantReplay
from blockvla_ros.evaluation.report import NO_ERROR, build_report, summarize, write_report
from blockvla_ros.io.bag_reader import Episode

NAMES = ['ee_dx', 'ee_dy', 'gripper']
H, D = 4, 3


def _episode_replay(bag, recorded, chunks, starts, latency, nfe):
    T = len(recorded) if recorded is not None else 10
    errors = executed = None
    if recorded is not None:
        w = metrics.recorded_windows(recorded, starts, H)
        errors, executed = metrics.ErrorStats(H, D), metrics.ErrorStats(H, D)
        errors.add(chunks, w)
        executed.add(chunks, w)
    seams = metrics.SeamStats(D)
    seams.add(metrics.seam_jumps(chunks, starts))
    lat = np.asarray(latency, float)
    return EpisodeReplay(bag, 0, 'touch red', np.arange(T) * 100_000_000, recorded, np.asarray(starts), chunks,
                         np.asarray(nfe), np.asarray(nfe) + 1, {'total': lat, 'prefill': lat / 2, 'decode': lat / 2,
                                                                'wall': lat}, metrics.executed_trajectory(
                                                                    chunks, starts, T, H), errors, executed, seams)


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    rec_a = rng.normal(size=(8, D))
    chunks_a = rec_a.reshape(2, H, D) + 0.5  # every pair off by exactly 0.5
    ep_a = _episode_replay('/bags/a', rec_a, chunks_a, [0, 4], [10.0, 30.0], [5, 7])
    chunks_b = rng.normal(size=(3, H, D))
    ep_b = _episode_replay('/bags/b', None, chunks_b, [0, 4, 8], [20.0, 20.0, 40.0], [5, 5, 5])
    variant = VariantReplay('demo', {'policy': 'demo'}, NAMES, H, [ep_a, ep_b], wall_s=0.5, recorded_s=1.8)
    eps = [Episode('/bags/a', 'touch red', np.zeros((8, 4, 4, 3), np.uint8), rec_a, None, np.arange(8)),
           Episode('/bags/b', 'touch red', np.zeros((10, 4, 4, 3), np.uint8), None, None, np.arange(10))]
    bags = [BagEpisodes('/bags/a', eps[:1], {'/camera/image_raw': 'sensor_msgs/msg/Image'}),
            BagEpisodes('/bags/b', eps[1:], {'/camera/image_raw': 'sensor_msgs/msg/Image'},
                        "the bag has no action topic '/joint_command'")]
    return variant, bags, (rec_a, chunks_a, chunks_b)


def test_summary_pools_errors_and_reports_latency_for_every_episode(results):
    variant, _, (rec_a, chunks_a, chunks_b) = results
    s = summarize(variant.episodes, NAMES, H, 10.0)
    assert (s['episodes'], s['ticks'], s['chunks']) == (2, 18, 5)
    assert s['errors']['pairs'] == 8
    for n in NAMES:
        assert s['errors']['per_dim'][n]['mae'] == pytest.approx(0.5)
        assert s['errors']['per_dim'][n]['mse'] == pytest.approx(0.25)
    assert s['errors']['gripper']['dims'] == ['gripper']
    assert 'errors from 1 of 2 episodes' in s['error_note']
    assert s['latency_ms']['total']['p50'] == pytest.approx(np.percentile([10, 30, 20, 20, 40], 50))
    assert s['latency_ms']['total']['max'] == 40.0
    assert s['nfe'] == {'mean': pytest.approx(27 / 5), 'min': 5, 'max': 7, 'total': 27}
    # seams: episode a: |chunk1[0] - chunk0[3]|, episode b: two seams
    jumps = np.concatenate([np.abs(chunks_a[1, 0] - chunks_a[0, 3])[None],
                            np.abs(chunks_b[1:, 0] - chunks_b[:-1, 3])])
    assert s['seam_jump']['seams'] == 3
    assert s['seam_jump']['per_dim']['ee_dy']['mean'] == pytest.approx(jumps[:, 1].mean())
    only_b = summarize(variant.episodes[1:], NAMES, H, 10.0)
    assert only_b['errors'] is None and only_b['error_note'] == NO_ERROR
    assert only_b['latency_ms']['total']['mean'] == pytest.approx(80 / 3)


def test_report_files(results, tmp_path):
    variant, bags, _ = results
    other = VariantReplay('other', {'policy': 'other'}, NAMES, H, variant.episodes, wall_s=1.0, recorded_s=1.8)
    settings = ReplaySettings(10.0, None, 0)
    report = build_report([variant, other], bags, settings, read_s=0.1)
    report['plots'] = write_plots([variant, other], [v['overall'] for v in report['variants']], 10.0, tmp_path)
    json_path, md_path = write_report(report, tmp_path)
    loaded = json.loads(json_path.read_text())  # strict JSON (NaN would fail allow_nan=False on write)
    assert [v['label'] for v in loaded['variants']] == ['demo', 'other']
    per_bag = loaded['variants'][0]['per_bag']
    assert per_bag['/bags/b']['errors'] is None and per_bag['/bags/b']['error_note'] == NO_ERROR
    assert per_bag['/bags/b']['latency_ms']['total']['max'] == 40.0
    assert per_bag['/bags/a']['errors']['arm']['mae'] == pytest.approx(0.5)
    assert loaded['variants'][0]['speed']['realtime_factor'] == pytest.approx(3.6)
    assert loaded['speed']['realtime_factor'] == pytest.approx(3.6 / 1.6)
    assert loaded['bags'][1]['no_actions_reason'].startswith('the bag has no action topic')
    md = md_path.read_text()
    assert '| figure | demo | other |' in md and NO_ERROR in md and 'error_vs_horizon.png' in md
    for name in report['plots']:
        assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert {'error_vs_horizon.png', 'latency.png'} <= set(report['plots'])
    assert sum(p.startswith('trajectory_') for p in report['plots']) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temp files left


def test_no_errors_anywhere_skips_the_horizon_plot(results, tmp_path):
    variant, bags, _ = results
    variant.episodes = variant.episodes[1:]
    report = build_report([variant], bags[1:], ReplaySettings(10.0, None, 0), read_s=0.0)
    plots = write_plots([variant], [v['overall'] for v in report['variants']], 10.0, tmp_path)
    assert 'error_vs_horizon.png' not in plots and 'latency.png' in plots
    assert report['variants'][0]['overall']['error_note'] == NO_ERROR
