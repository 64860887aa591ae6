"""evaluation.metrics against hand computations (pure numpy)."""
import numpy as np
import pytest

from blockvla_ros.evaluation import metrics


def _example():
    # T = 5 ticks, D = 2 dims, H = 3 steps, chunks at ticks 0 and 2.
    recorded = np.array([[0., 0.], [1., 10.], [2., 20.], [3., 30.], [4., 40.]])
    chunks = np.array([[[0., 1.], [1., 12.], [5., 20.]],
                       [[2.5, 20.], [3., 27.], [4., 40.]]])
    return recorded, chunks, np.array([0, 2])


def test_recorded_windows_pad_with_nan_past_the_end():
    recorded, _, starts = _example()
    w = metrics.recorded_windows(recorded, np.array([3]), 3)
    assert w.shape == (1, 3, 2)
    np.testing.assert_array_equal(w[0, :2], recorded[3:5])
    assert np.isnan(w[0, 2]).all()


def test_error_stats_by_hand():
    recorded, chunks, starts = _example()
    stats = metrics.ErrorStats(3, 2)
    stats.add(chunks, metrics.recorded_windows(recorded, starts, 3))
    # every (chunk, step) pair: chunk 0 steps 0..2 vs ticks 0..2, chunk 1 steps 0..2 vs ticks 2..4
    # errors dim0: 0, 0, 3 | 0.5, 0, 0   dim1: 1, 2, 0 | 0, -3, 0
    assert stats.count == 6
    np.testing.assert_allclose(stats.mae, [3.5 / 6, 6 / 6])
    np.testing.assert_allclose(stats.mse, [(9 + 0.25) / 6, (1 + 4 + 9) / 6])
    np.testing.assert_allclose(stats.mae_by_step, [[0.25, 0.5], [0., 2.5], [1.5, 0.]])
    np.testing.assert_array_equal(stats.step_count, [2, 2, 2])


def test_error_stats_truncate_at_episode_end_and_merge_pools_pairs():
    recorded, chunks, _ = _example()
    a = metrics.ErrorStats(3, 2)
    a.add(chunks[1:], metrics.recorded_windows(recorded, np.array([3]), 3))  # steps 0,1 vs ticks 3,4; step 2 none
    assert a.count == 2
    np.testing.assert_allclose(a.mae, [(0.5 + 1) / 2, (10 + 13) / 2])
    np.testing.assert_array_equal(a.step_count, [1, 1, 0])
    assert np.isnan(a.mae_by_step[2]).all()
    b = metrics.ErrorStats(3, 2)
    b.add(chunks[:1], metrics.recorded_windows(recorded, np.array([0]), 3))  # 3 pairs
    both = a.merge(b)
    assert both.count == 5
    np.testing.assert_allclose(both.mae, [(1.5 + 3) / 5, (23 + 3) / 5])  # pooled, not a mean of means
    with pytest.raises(ValueError, match='cannot merge'):
        a.merge(metrics.ErrorStats(4, 2))


def test_executed_trajectory_takes_latest_chunk_and_execute_steps():
    _, chunks, starts = _example()
    ex = metrics.executed_trajectory(chunks, starts, 5, execute_steps=3)
    np.testing.assert_array_equal(ex[:, 0], [0., 1., 2.5, 3., 4.])
    ex2 = metrics.executed_trajectory(chunks, starts, 6, execute_steps=1)
    np.testing.assert_array_equal(ex2[:, 1][[0, 2]], [1., 20.])
    assert np.isnan(ex2[[1, 3, 4, 5]]).all()
    with pytest.raises(ValueError, match='increase strictly'):
        metrics.executed_trajectory(chunks, np.array([2, 2]), 5, 3)


def test_seam_jumps_with_and_without_offset():
    _, chunks, starts = _example()
    # chunk 1 starts at tick 2; chunk 0 planned [5, 20] for tick 2 -> |2.5 - 5|, |20 - 20|
    np.testing.assert_allclose(metrics.seam_jumps(chunks, starts), [[2.5, 0.]])
    # with one known step the seam is at tick 3, past chunk 0's plan (H = 3): its last step counts
    np.testing.assert_allclose(metrics.seam_jumps(chunks, starts, offset=1), [[abs(3 - 5), abs(27 - 20)]])
    np.testing.assert_allclose(metrics.seam_jumps(chunks, np.array([0, 1]), offset=1), [[abs(3 - 5), abs(27 - 20)]])
    np.testing.assert_allclose(metrics.seam_jumps(chunks, np.array([0, 1]), offset=0), [[abs(2.5 - 1), abs(20 - 12)]])
    assert metrics.seam_jumps(chunks[:1], starts[:1]).shape == (0, 2)
    with pytest.raises(ValueError, match='seam offset'):
        metrics.seam_jumps(chunks, starts, offset=3)
    seams = metrics.SeamStats(2)
    seams.add(metrics.seam_jumps(chunks, starts))
    seams.add(np.array([[0.5, 4.0]]))
    np.testing.assert_allclose(seams.mean, [1.5, 2.0])
    np.testing.assert_allclose(seams.max, [2.5, 4.0])


def test_summaries_split_gripper_and_give_percentiles():
    stats = metrics.ErrorStats(1, 3)
    stats.add(np.array([[[1., 2., 0.]]]), np.array([[[0., 0., 1.]]]))
    s = metrics.error_summary(stats, ['ee_dx', 'ee_dy', 'gripper'])
    assert s['arm'] == {'dims': ['ee_dx', 'ee_dy'], 'mae': 1.5, 'mse': 2.5}
    assert s['gripper'] == {'dims': ['gripper'], 'mae': 1.0, 'mse': 1.0}
    assert metrics.error_summary(stats, ['a', 'b', 'c'])['gripper'] is None
    p = metrics.percentiles(np.arange(1, 101))
    assert p['p50'] == pytest.approx(50.5) and p['p99'] == pytest.approx(99.01) and p['max'] == 100
    assert metrics.percentiles([]) is None
    assert metrics.count_summary([3, 5, 4]) == {'mean': 4.0, 'min': 3, 'max': 5, 'total': 12}
    empty = metrics.error_summary(metrics.ErrorStats(2, 1), ['x'])
    assert empty['pairs'] == 0 and empty['per_dim']['x']['mae'] is None
