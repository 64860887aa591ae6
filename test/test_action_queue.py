"""ActionQueue (ROS-free): timing, overdue drops, real-time chunking prefix, seams, thread safety."""
import threading
import time

import numpy as np
import pytest

from blockvla_ros.runtime.action_queue import ActionQueue, DelayEstimator

DT = 0.02  # 50 Hz


def chunk(h=6, d=2, base=0.0):
    """[h, d] actions whose value encodes (base + step, dim) so the test can see which one it got."""
    return (base + np.arange(h)[:, None] + 0.1 * np.arange(d)[None, :]).astype(np.float32)


def test_push_then_pop_in_order_and_hold_when_empty():
    q = ActionQueue(DT, 2)
    res = q.push_chunk(chunk(), obs_stamp=10.0, now=10.0)
    assert res.accepted and res.dropped == 0 and res.queued == 6 and res.seam_jump is None
    got = []
    for k in range(6):
        a = q.pop(10.0 + k * DT)
        got.append(a)
        assert len(q.remaining()) == 5 - k
    assert [a.index for a in got] == list(range(6))
    assert np.allclose([a.time for a in got], 10.0 + DT * np.arange(6))
    assert np.allclose(got[3].action, [3.0, 3.1])
    assert q.pop(10.0 + 6 * DT) is None
    assert q.stats.empty_pops == 1 and q.stats.popped == 6
    assert q.last_executed.index == 5


def test_measured_delay_drops_overdue_actions():
    q = ActionQueue(DT, 2)
    # image taken at t=1.0, chunk ready 0.07 s later: actions for 1.00, 1.02, 1.04 are past, 1.06 is current
    res = q.push_chunk(chunk(), obs_stamp=1.0, now=1.07)
    assert res.accepted and res.dropped == 3 and res.queued == 3
    head = q.pop(1.061)  # the tick of slot 1.06, a millisecond late
    assert head.index == 3 and head.time == pytest.approx(1.06)
    assert q.stats.dropped_overdue == 3


def test_new_chunk_replaces_plan_from_head_and_reports_seam():
    q = ActionQueue(DT, 2)
    q.push_chunk(chunk(base=0.0), obs_stamp=0.0, now=0.0)
    q.pop(0.0)
    q.pop(DT)  # executed slots 0 and 1; head is slot 2 (value 2.0)
    # second chunk from an image at 0.021 (snaps to slot 1), ready at 0.045
    res = q.push_chunk(chunk(base=100.0), obs_stamp=0.021, now=0.045)
    assert res.accepted and res.dropped == 1  # its action 0 (slot 1) was already executed
    assert res.seam_jump == pytest.approx(100.0 + 1 - 2.0)  # new slot-2 value 101 vs old 2
    nxt = q.pop(2 * DT)
    assert nxt.chunk_id == 2 and nxt.index == 1 and nxt.time == pytest.approx(2 * DT)
    assert q.stats.replaced == 4 and q.stats.seam_max == pytest.approx(99.0)


def test_plan_request_returns_executed_and_queued_prefix_for_rtc():
    q = ActionQueue(DT, 2)
    first = chunk(h=8, base=0.0)
    q.push_chunk(first, obs_stamp=0.0, now=0.0)
    q.pop(0.0)
    q.pop(DT)
    q.pop(2 * DT)  # slots 0..2 executed, 3.. queued
    # image at slot 1 (0.0195 snaps there), asked at 0.041, expected delay 0.04 -> planned up to 0.081
    plan = q.plan_request(obs_stamp=0.0195, now=0.041, expected_delay_s=0.04, max_known=10)
    assert plan.start_time == pytest.approx(DT)
    assert np.array_equal(plan.known, first[1:5])  # slots 1, 2 (executed), 3, 4 (queued); slot 5 > 0.081
    # a chunk that honours the prefix continues the plan without a seam
    new = chunk(h=8, base=50.0)
    new[:len(plan.known)] = plan.known
    res = q.push_chunk(new, obs_stamp=0.0195, now=0.07)
    assert res.accepted and res.seam_jump == 0.0
    assert np.array_equal(q.pop(3 * DT).action, first[3])
    # the cap and an unknown start give shorter / empty prefixes
    assert len(q.plan_request(0.0195, 0.041, 1.0, max_known=2).known) == 2
    assert len(q.plan_request(-5.0, 0.041, 0.04, max_known=10).known) == 0


def test_plan_request_before_any_chunk_is_empty():
    q = ActionQueue(DT, 3)
    plan = q.plan_request(obs_stamp=4.2, now=4.25, expected_delay_s=0.1, max_known=5)
    assert plan.start_time == 4.2 and plan.known.shape == (0, 3)


def test_late_ticks_drop_stale_heads_and_stay_on_time():
    q = ActionQueue(DT, 2)
    q.push_chunk(chunk(h=10), obs_stamp=0.0, now=0.0)
    q.pop(0.0)
    a = q.pop(5 * DT + 0.003)  # the control thread stalled for 4 periods: slots 1..4 are past
    assert a.index == 5
    assert q.stats.dropped_late == 4
    # and the next ticks run their own slots (not the plan one period behind its time, for the rest of the run)
    assert [q.pop(k * DT).index for k in (6, 7)] == [6, 7]


def test_first_chunk_after_a_held_tick_starts_at_the_next_tick():
    """The node's first tick finds no plan, holds and asks; the chunk (image of that tick) arrives before the
    next tick. That tick must run the action planned for it: the held tick's slot is over."""
    q = ActionQueue(DT, 2)
    assert q.pop(0.0) is None  # tick 0 holds (and sets the grid)
    res = q.push_chunk(chunk(h=8), obs_stamp=0.0, now=0.004)
    assert res.accepted and res.dropped == 1  # action 0 was for the held tick
    got = [q.pop(k * DT) for k in range(1, 8)]
    assert [a.index for a in got] == list(range(1, 8))
    assert np.allclose([a.time for a in got], DT * np.arange(1, 8))  # every tick runs its own slot
    # the same after a dry spell in the middle of a run: holds consume their slots too
    assert q.pop(8 * DT) is None and q.pop(9 * DT) is None
    q.push_chunk(chunk(h=8, base=50.0), obs_stamp=9 * DT, now=9 * DT)
    assert q.pop(10 * DT).index == 1


def test_tick_jitter_below_half_a_period_keeps_the_slots():
    q = ActionQueue(DT, 2)
    q.pop(0.0)
    q.push_chunk(chunk(h=8), obs_stamp=0.0, now=0.001)
    jitter = [0.009, 0.0, 0.004, 0.0095, 0.001, 0.002]  # late ticks, up to just under half a period
    got = [q.pop(k * DT + j) for k, j in zip(range(1, 7), jitter)]
    assert [a.index for a in got] == list(range(1, 7))
    assert q.stats.dropped_late == 0 and q.stats.empty_pops == 1


def test_fully_overdue_chunk_is_rejected_and_old_plan_stays():
    q = ActionQueue(DT, 2)
    q.push_chunk(chunk(h=6), obs_stamp=1.0, now=1.0)
    res = q.push_chunk(chunk(h=4, base=9.0), obs_stamp=0.5, now=1.01)
    assert not res.accepted and 'after its last action was due' in res.reason
    assert q.depth() == 6 and q.stats.chunks_rejected == 1
    assert q.pop(1.0).chunk_id == 1


def test_dry_queue_seam_is_against_hold_position_and_slots_never_rerun():
    q = ActionQueue(DT, 2)
    q.push_chunk(chunk(h=3), obs_stamp=0.0, now=0.0)
    for k in range(3):
        q.pop(k * DT)
    assert q.pop(3 * DT) is None  # ran dry: the node holds action 2
    # a chunk from an old image (slot 0) arrives at 0.061: slots 0..2 were executed, 3's tick held; 4 is next
    res = q.push_chunk(chunk(h=6, base=1.0), obs_stamp=0.0, now=0.061)
    assert res.dropped == 4 and res.seam_jump == pytest.approx(abs((1.0 + 4) - 2.0))
    assert q.pop(4 * DT).time == pytest.approx(4 * DT)


def test_clear_keeps_grid_reset_and_backward_clock_forget():
    q = ActionQueue(DT, 2)
    q.push_chunk(chunk(), obs_stamp=0.003, now=0.003)
    assert q.clear() == 6 and q.depth() == 0
    res = q.push_chunk(chunk(), obs_stamp=0.05, now=0.05)
    assert q.remaining()[0].time == pytest.approx(0.043)  # snapped to the grid set at 0.003
    q.pop(0.06)
    q.pop(0.5)
    assert res.accepted
    q.push_chunk(chunk(), obs_stamp=0.5, now=0.5)
    assert q.pop(0.1) is None  # the clock went back 0.4 s: everything was forgotten; this tick sets the new grid
    q.push_chunk(chunk(), obs_stamp=0.101, now=0.101)
    head = q.remaining()[0]  # the image snaps to the tick at 0.1, whose slot is over: action 1, at 0.12
    assert head.index == 1 and head.time == pytest.approx(0.12)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((4, 3), np.float32), r'must be \[H, 2\]'),
    (np.zeros((0, 2), np.float32), r'must be \[H, 2\]'),
    (np.array([[0.0, np.nan]]), 'NaN or inf'),
])
def test_bad_chunks_raise(bad, match):
    q = ActionQueue(DT, 2)
    with pytest.raises(ValueError, match=match):
        q.push_chunk(bad, 0.0, 0.0)
    assert q.depth() == 0


@pytest.mark.parametrize('kwargs, match', [
    (dict(dt=0.0, action_dim=2), 'dt must be'),
    (dict(dt=float('nan'), action_dim=2), 'dt must be'),
    (dict(dt=0.1, action_dim=0), 'action_dim'),
])
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActionQueue(**kwargs)


def test_concurrent_producer_and_consumer_never_rerun_a_slot():
    q = ActionQueue(0.001, 2)
    stop = threading.Event()
    errors = []
    t0 = time.monotonic()

    def producer():
        k = 0
        try:
            while not stop.is_set():
                now = time.monotonic() - t0
                q.push_chunk(chunk(h=8, base=float(k)), obs_stamp=now - 0.002, now=now)
                k += 1
                time.sleep(0.0005)
        except Exception as e:  # surfaced below
            errors.append(e)

    thread = threading.Thread(target=producer)
    thread.start()
    popped = []
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        a = q.pop(time.monotonic() - t0)
        if a is not None:
            popped.append(a.time)
        time.sleep(0.0007)
    stop.set()
    thread.join()
    assert not errors
    assert len(popped) > 50
    assert np.all(np.diff(popped) > 0), 'a planned slot was executed twice or out of order'


def test_delay_estimator_is_max_of_window():
    est = DelayEstimator(window=3, initial_s=0.05)
    assert est.expected() == 0.05
    for v in (0.01, 0.09, 0.02, 0.03):
        est.add(v)
    assert est.expected() == 0.09
    est.add(0.01)  # 0.09 leaves the window
    assert est.expected() == pytest.approx(0.03)
    assert est.ticks(0.02) == 2
    est.add(float('nan'))
    assert est.expected() == pytest.approx(0.03)
