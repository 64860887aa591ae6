"""Real-time chunking on or off, closed loop on Meta-World without ROS: the node's own inference cycle
(ActionQueue + request_chunk, the node's request threshold) on the simulator's 80 Hz ticks, with an inference delay
of a fixed number of ticks, so the policy's answer to a known prefix is measured apart from DDS and CPU load.

    python benchmarks/rtc_closed_loop.py --policy models/metaworld_mt10 --tasks drawer-close-v3 door-open-v3 \
        --episodes 3 --delays 0 2 --json out/rtc_closed_loop.json

Each tick: the arriving chunk is pushed, the queue is popped (a hold keeps the hand still and the gripper's
effort; the first tick holds, as the node's), a chunk is requested when at most ``chunk_threshold`` of a chunk is
queued, from the image taken at that tick; it arrives ``delay`` ticks later (0: before the next tick). The same
layouts (seed 1) for both settings, back to back.
Needs the sim extra (`make setup-sim`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blockvla_ros.runtime.action_queue import ActionQueue  # noqa: E402
from blockvla_ros.runtime.chunk_request import request_chunk  # noqa: E402


def run_episode(runner, env, episode: int, rtc: bool, delay: int, threshold: float) -> dict:
    cfg = runner.config
    dt = 1.0 / 80
    q = ActionQueue(dt, cfg.action_dim)
    obs = env.reset(episode)
    pending, known, gripper, done, k = None, [], -1.0, False, 0
    while not done:
        now = k * dt
        if pending is not None and pending[0] == k:
            q.push_chunk(pending[1], pending[2], now)
            pending = None
        timed = q.pop(now)
        if pending is None and q.depth() <= max(math.ceil(threshold * cfg.chunk_len), delay + 1):
            req = request_chunk(runner, q, obs.image, obs.instruction, obs.state, now, now, delay * dt,
                                cfg.chunk_len - 1 if rtc else 0)
            known.append(req.known)
            pending = (k + max(delay, 1), req.actions, now)  # delay 0: there before the next tick
        action = np.array([0.0, 0.0, 0.0, gripper]) if timed is None else timed.action
        gripper = float(action[3])
        obs, done, _ = env.step(action)
        k += 1
    return {'episode': episode, 'success': bool(env.success), 'steps': env.steps,
            'mean_known': float(np.mean(known)) if known else 0.0}


def main(argv=None) -> int:
    from blockvla_ros.runtime.runner import PolicyRunner
    from blockvla_ros.sim.env import MetaWorldEnv

    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--policy', default=str(REPO / 'models' / 'metaworld_mt10'))
    p.add_argument('--tasks', nargs='+',
                   default=['drawer-close-v3', 'door-open-v3', 'window-close-v3', 'drawer-open-v3'])
    p.add_argument('--episodes', type=int, default=3, help='episodes (layouts 0..N-1 of seed 1) per task')
    p.add_argument('--delays', type=int, nargs='+', default=[0, 2], help='inference delays in ticks')
    p.add_argument('--chunk-threshold', type=float, default=0.5, help='the node parameter (default 0.5)')
    p.add_argument('--json', default=None, help='also write the results here')
    args = p.parse_args(argv)
    runner = PolicyRunner.load(args.policy, threads=1)
    rows, start = [], time.monotonic()
    for task in args.tasks:
        env = MetaWorldEnv(task, seed=1)
        for delay in args.delays:
            for rtc in (False, True):  # interleaved: the same layouts back to back
                eps = [run_episode(runner, env, e, rtc, delay, args.chunk_threshold) for e in range(args.episodes)]
                row = {'task': task, 'delay_ticks': delay, 'real_time_chunking': rtc,
                       'successes': sum(e['success'] for e in eps), 'episodes': len(eps),
                       'mean_steps': float(np.mean([e['steps'] for e in eps])),
                       'mean_known': float(np.mean([e['mean_known'] for e in eps]))}
                rows.append(row)
                print(json.dumps(row), flush=True)
        env.close()
    print('\ndelay  rtc    solved')
    for delay in args.delays:
        for rtc in (False, True):
            sel = [r for r in rows if r['delay_ticks'] == delay and r['real_time_chunking'] == rtc]
            print(f'{delay:5d}  {"on " if rtc else "off"}    {sum(r["successes"] for r in sel)}/'
                  f'{sum(r["episodes"] for r in sel)}  (mean steps {np.mean([r["mean_steps"] for r in sel]):.0f})')
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({'rows': rows, 'wall_s': round(time.monotonic() - start, 1),
                                               'policy': args.policy}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
