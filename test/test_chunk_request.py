"""request_chunk + ActionQueue: the policy node's inference cycle on a simulated clock, with real chunks from the
shipped Meta-World policy (ONNX Runtime), with and without real-time chunking.

What must hold: the known prefix is exactly the old plan's actions for the observation's tick onwards up to the
chunk's arrival (executed ones and queued ones), the decoder keeps it, the new chunk takes over at the first tick
nobody executed yet, and every executed action is the action its chunk planned for that tick: no tick runs twice,
none is skipped, nothing is shifted.
"""
from pathlib import Path

import numpy as np
import pytest

from blockvla_ros.runtime.action_queue import ActionQueue
from blockvla_ros.runtime.chunk_request import request_chunk
from blockvla_ros.runtime.runner import PolicyRunner

POLICY = Path(__file__).resolve().parents[1] / 'models' / 'metaworld_mt10'
DT = 1 / 80  # the policy's 80 Hz
INSTRUCTION = 'close the drawer'


@pytest.fixture(scope='module')
def runner():
    return PolicyRunner.load(POLICY, threads=1)


def run_cycle(runner, max_known, delay_ticks, image_age_ticks, ticks=40):
    """The node's loop: each tick pops one action, then asks for a chunk when at most half a chunk is queued; the
    chunk computed from an image ``image_age_ticks`` old arrives ``delay_ticks`` later (before that tick's pop).
    Returns (executed {tick: TimedAction}, requests [(tick asked, ChunkRequest, obs tick, queued slots then)])."""
    rng = np.random.default_rng(0)
    cfg = runner.config
    q = ActionQueue(DT, cfg.action_dim)
    executed, requests, pending = {}, [], None
    for k in range(ticks):
        now = k * DT
        if pending is not None and pending[0] == k:
            res = q.push_chunk(pending[1].actions, pending[2] * DT, now)
            assert res.accepted, res.reason
            pending = None
        action = q.pop(now)
        if action is not None:
            executed[k] = action
        if pending is None and q.depth() <= cfg.chunk_len // 2:
            obs_tick = max(k - image_age_ticks, 0)
            queued = {int(round(a.time / DT)): a.action for a in q.remaining()}
            image = rng.integers(0, 256, (64, 64, 3), np.uint8)
            state = rng.uniform(-0.5, 0.5, cfg.state_dim).astype(np.float32)
            req = request_chunk(runner, q, image, INSTRUCTION, state, obs_tick * DT, now, delay_ticks * DT, max_known)
            requests.append((k, req, obs_tick, queued))
            pending = (k + delay_ticks, req, obs_tick) if delay_ticks else None
            if not delay_ticks:
                q.push_chunk(req.actions, obs_tick * DT, now)
    return executed, requests


def check_executed_as_planned(executed, requests):
    """Every tick from the first action on ran once, and ran what its chunk planned for it."""
    ticks = sorted(executed)
    assert ticks == list(range(ticks[0], ticks[-1] + 1)), 'a tick held or ran twice'
    by_id = {i + 1: (req, obs_tick) for i, (_, req, obs_tick, _) in enumerate(requests)}
    for tick, a in executed.items():
        req, obs_tick = by_id[a.chunk_id]
        assert a.index == tick - obs_tick, f'tick {tick} ran action {a.index} of a chunk planned from tick {obs_tick}'
        assert np.array_equal(a.action, req.actions[a.index])


@pytest.mark.parametrize('delay_ticks, image_age_ticks', [(0, 0), (2, 1), (3, 2)])
def test_real_time_chunking_prefix_is_the_old_plan_up_to_arrival(runner, delay_ticks, image_age_ticks):
    executed, requests = run_cycle(runner, runner.config.chunk_len - 1, delay_ticks, image_age_ticks)
    check_executed_as_planned(executed, requests)
    assert len(requests) >= 6
    assert requests[0][1].known == 0  # nothing planned yet
    for asked, req, obs_tick, queued in requests[1:]:
        assert req.start_time == pytest.approx(obs_tick * DT)
        # the old plan from the observation's tick to the arrival tick: executed since the image was taken (up to
        # the tick that asked), then still queued; it ends where nothing was planned (a held tick, the plan's end)
        planned = []
        for tick in range(obs_tick, asked + delay_ticks + 1):
            action = (executed[tick].action if tick in executed else None) if tick <= asked else queued.get(tick)
            if action is None:
                break
            planned.append((tick, action))
        assert req.known == len(planned)
        for i, (tick, action) in enumerate(planned):
            assert np.array_equal(req.actions[i], action), f'known action {i} is not the plan for tick {tick}'
            if tick in executed:
                assert np.array_equal(executed[tick].action, action)  # and it is what ran at that tick
    steady = [req.known for _, req, _, _ in requests[2:]]
    assert min(steady) >= 1 and max(steady) <= image_age_ticks + delay_ticks + 1


@pytest.mark.parametrize('delay_ticks, image_age_ticks', [(0, 0), (2, 1)])
def test_without_real_time_chunking_the_chunk_is_the_policys_own(runner, delay_ticks, image_age_ticks):
    executed, requests = run_cycle(runner, 0, delay_ticks, image_age_ticks)
    check_executed_as_planned(executed, requests)
    for asked, req, obs_tick, _ in requests:
        assert req.known == 0
        assert np.array_equal(req.actions, np.asarray(req.prediction.actions, np.float32))
    for i, (asked, req, obs_tick, _) in enumerate(requests[1:-1], start=2):
        first = min(t for t, a in executed.items() if a.chunk_id == i)
        assert first == asked + delay_ticks + (0 if delay_ticks else 1)  # the first tick after the old plan ran
