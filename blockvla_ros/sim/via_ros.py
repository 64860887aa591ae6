"""--via-ros: the same closed-loop evaluation with the sim bridge node and the real policy node as processes over
loopback DDS (the node on sim time at the suite's 80 Hz, its own ONNX Runtime session, real-time chunking and
all). Starts processes only; imports no ROS package."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blockvla_ros.evaluation.live import LiveReplayError, _node_cmd, _Process
from blockvla_ros.sim.suites import CONTROL_RATE_HZ, MAX_STEPS


def evaluate_via_ros(policy: Path, tasks: list[str], episodes: int, seed: int, max_steps: int | None = None,
                     real_time_factor: float = 1.0, threads: int = 1, progress: bool = True,
                     startup_timeout_s: float = 180.0, domain_id: int | None = None,
                     node_params: dict | None = None) -> dict:
    """Run `episodes` of each task through bridge + node; returns the same dict as evaluate_suite (plus holds)."""
    from blockvla_ros.sim.evaluate import summarize

    policy = Path(policy).resolve()
    if not (policy / 'policy.yaml').is_file():
        raise FileNotFoundError(f'{policy} is not a policy folder (no policy.yaml)')
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', PYTHONUNBUFFERED='1')
    if domain_id is not None:
        env['ROS_DOMAIN_ID'] = str(domain_id)
    work = Path(tempfile.mkdtemp(prefix='blockvla_sim_ros_'))
    out, frames_path = work / 'result.json', work / 'frames.npz'
    node_cmd = _node_cmd(policy.name, [str(policy.parent)], 'onnxruntime', CONTROL_RATE_HZ, '', None,
                         {}, {'threads': int(threads), **(node_params or {})})
    bridge_cmd = [sys.executable, '-m', 'blockvla_ros.ros.sim_bridge_node', '--tasks', *tasks,
                  '--episodes', str(episodes), '--seed', str(seed), '--max-steps', str(max_steps or MAX_STEPS),
                  '--real-time-factor', str(real_time_factor), '--wait-timeout', str(startup_timeout_s),
                  '--out', str(out), '--frames', str(frames_path)]
    procs = []
    start = time.monotonic()
    try:
        node = _Process('policy_node', node_cmd, env, work)
        procs.append(node)
        bridge = _Process('sim_bridge', bridge_cmd, env, work)
        procs.append(bridge)
        _follow(bridge, node, len(tasks) * episodes, progress)
        if bridge.proc.returncode != 0 or not out.is_file():
            raise bridge.fail(f'exited with code {bridge.proc.returncode}')
        raw = json.loads(out.read_text())
        frames = {}
        if frames_path.is_file():
            with np.load(frames_path) as z:
                frames = {t: list(z[t]) for t in z.files}
    except LiveReplayError as err:
        raise LiveReplayError(f'{err}\n(full logs in {work})') from None
    finally:
        for p in reversed(procs):
            p.stop(timeout_s=10.0)
    per_task = {t: summarize(raw['per_task'][t]) for t in tasks}
    for t in tasks:
        per_task[t]['holds'] = sum(d.get('holds', 0) for d in raw['per_task'][t])
    shutil.rmtree(work, ignore_errors=True)
    return {'success_rate': float(np.mean([r['success_rate'] for r in per_task.values()])), 'per_task': per_task,
            'frames': frames, 'episodes_per_task': episodes, 'seed': seed, 'execute_steps': None,
            'real_time_factor': real_time_factor, 'actions_rejected': raw.get('actions_rejected', 0),
            'wall_s': round(time.monotonic() - start, 1)}


def _follow(bridge, node, total: int, progress: bool) -> None:
    """Wait for the bridge to finish, with a progress bar fed by the episode lines it prints."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc='closed-loop eval via ROS 2', unit='ep', disable=not progress)
    seen = 0
    while bridge.proc.poll() is None:
        node.check_running()
        if 'configure failed' in node.log():
            raise node.fail('could not configure its policy')
        done = bridge.log().count('"episode":')
        if done > seen:
            bar.update(done - seen)
            seen = done
        time.sleep(0.2)
    bar.update(bridge.log().count('"episode":') - seen)
    bar.close()
