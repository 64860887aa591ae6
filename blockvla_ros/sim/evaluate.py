"""Closed-loop evaluation on Meta-World: per-task success of a chunking policy on held-out layouts, the scripted
expert's success on the same layouts beside it, a JSON + markdown report and a montage of one rollout per task.

    evaluate_policy_folder('models/metaworld_mt10', 'reports/mt10', episodes=50, seed=1)             # PolicyRunner
    evaluate_policy_folder(..., via_ros=True)        # the sim bridge node + the real policy node over loopback DDS

Seed 1 layouts do not overlap seed 0's (what `blockvla-sim record` uses by default), so this is not test-on-train.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from blockvla_ros.sim.suites import ACTION_NAMES, MAX_STEPS, resolve_suite

logger = logging.getLogger(__name__)

# predict_chunk(image [S, S, 3] uint8 RGB, instruction, state float32[4]) -> actions [H, 4]
PredictChunk = Callable[[np.ndarray, str, np.ndarray], np.ndarray]
MONTAGE_FRAMES = 8  # frames of the first episode of each task kept for the montage


def run_episode(env, episode: int, predict_chunk: PredictChunk, execute_steps: int | None,
                keep_frames: bool = False) -> dict:
    """One closed-loop episode: predict a chunk, execute its first `execute_steps` actions, repeat. The camera
    is rendered only when the policy looks (and every step when `keep_frames`)."""
    obs = env.reset(episode)
    frames = [obs.image] if keep_frames else []
    done, calls = False, 0
    while not done:
        chunk = _check_chunk(predict_chunk(obs.image, obs.instruction, obs.state), env.task)
        calls += 1
        n = len(chunk) if execute_steps is None else min(execute_steps, len(chunk))
        for k, action in enumerate(chunk[:n]):
            render = keep_frames or k == n - 1   # the last action's observation is the next prediction's input
            obs, done, _ = env.step(action, render=render)
            if keep_frames:
                frames.append(obs.image)
            if done:
                break
    return {'episode': episode, 'success': env.success, 'steps': env.steps, 'policy_calls': calls,
            'frames': _pick(frames, MONTAGE_FRAMES) if keep_frames else []}


def evaluate_suite(predict_chunk: PredictChunk, suite: str = 'mt10', tasks=None, episodes: int = 50, seed: int = 1,
                   execute_steps: int | None = 4, max_steps: int | None = None, progress: bool = True,
                   frames: bool = True) -> dict:
    """Episodes 0..N-1 of each task (layouts of MT1(task, seed)). Returns {'success_rate' (mean over tasks),
    'per_task': {task: {'success_rate', 'successes', 'episodes', 'mean_steps', 'episodes_detail'}}, 'frames':
    {task: [images of episode 0]} (empty with `frames=False`: episode 0 then renders only when the policy looks,
    same outcomes), settings}."""
    from blockvla_ros.sim.env import MetaWorldEnv

    names = resolve_suite(suite, tasks)
    _check_positive('episodes', episodes)
    if execute_steps is not None:
        _check_positive('execute_steps', execute_steps)
    per_task, montage = {}, {}
    bar = tqdm(total=len(names) * episodes, desc='closed-loop eval', unit='ep', disable=not progress)
    start = time.monotonic()
    for name in names:
        env = MetaWorldEnv(name, seed=seed, max_steps=max_steps or MAX_STEPS)
        details = []
        for ep in range(episodes):
            r = run_episode(env, ep, predict_chunk, execute_steps, keep_frames=frames and ep == 0)
            if frames and ep == 0:
                montage[name] = r.pop('frames')
            else:
                r.pop('frames')
            details.append(r)
            bar.update(1)
            bar.set_postfix_str(f'{name}: {sum(d["success"] for d in details)}/{len(details)}')
        env.close()
        per_task[name] = summarize(details)
        logger.info('%s: %d/%d successful', name, per_task[name]['successes'], episodes)
    bar.close()
    return {'success_rate': float(np.mean([r['success_rate'] for r in per_task.values()])),
            'per_task': per_task, 'frames': montage, 'episodes_per_task': episodes, 'seed': seed,
            'execute_steps': execute_steps, 'wall_s': round(time.monotonic() - start, 1)}


def expert_success(suite: str = 'mt10', tasks=None, episodes: int = 50, seed: int = 1,
                   max_steps: int | None = None, progress: bool = True) -> dict:
    """The scripted expert on the same episodes (no camera): {task: success_rate}."""
    from blockvla_ros.sim.env import MetaWorldEnv

    out = {}
    names = resolve_suite(suite, tasks)
    for name in tqdm(names, desc='expert on the same layouts', unit='task', disable=not progress):
        env = MetaWorldEnv(name, seed=seed, max_steps=max_steps or MAX_STEPS)
        wins = 0
        for ep in range(episodes):
            env.reset(ep, render=False)
            done = False
            while not done:
                _, done, _ = env.step(env.expert_action(), render=False)
            wins += env.success
        env.close()
        out[name] = wins / episodes
    return out


def summarize(details: list[dict]) -> dict:
    wins = sum(bool(d['success']) for d in details)
    return {'success_rate': wins / len(details), 'successes': wins, 'episodes': len(details),
            'mean_steps': round(float(np.mean([d['steps'] for d in details])), 1),
            'episodes_detail': [{k: d[k] for k in ('episode', 'success', 'steps')} for d in details]}


def runner_predictor(runner) -> PredictChunk:
    """A PolicyRunner as predict_chunk."""
    def predict(image, instruction, state):
        return runner.predict(image, instruction, state=state).actions
    return predict


def evaluate_policy_folder(policy, out, suite: str = 'mt10', tasks=None, episodes: int = 50, seed: int = 1,
                           execute_steps: int | None = 4, max_steps: int | None = None, via_ros: bool = False,
                           real_time_factor: float = 1.0, expert: bool = True, threads: int = 1,
                           progress: bool = True, jobs: int = 1, node_params: dict | None = None) -> dict:
    """Evaluate a policy folder (fast path through PolicyRunner on ONNX Runtime, or `via_ros`) and write
    report.json, report.md and montage.png into `out`. Returns the report dict. `jobs` > 1 splits the fast
    path's tasks over that many processes (each with its own runner; results are the same). `node_params` are
    extra policy node parameters for `via_ros`."""
    from blockvla_ros.sim.report import write_report

    policy = Path(policy)
    names = resolve_suite(suite, tasks)
    if via_ros:
        from blockvla_ros.sim.via_ros import evaluate_via_ros
        result = evaluate_via_ros(policy, names, episodes=episodes, seed=seed, max_steps=max_steps,
                                  real_time_factor=real_time_factor, threads=threads, progress=progress,
                                  node_params=node_params)
    elif jobs > 1 and len(names) > 1:
        result = _evaluate_in_processes(policy, suite, names, episodes, seed, execute_steps, max_steps, threads,
                                        jobs, progress)
    else:
        result = _evaluate_runner(policy, suite, names, episodes, seed, execute_steps, max_steps, threads, progress)
    result.update(policy=str(policy), suite=suite, path='ros' if via_ros else 'policy_runner')
    if via_ros:
        result['node_params'] = dict(node_params or {})
    if expert:
        result['expert'] = expert_success(suite, names, episodes, seed, max_steps, progress)
        result['expert_success_rate'] = float(np.mean(list(result['expert'].values())))
    write_report(result, Path(out))
    return result


def _evaluate_runner(policy, suite, names, episodes, seed, execute_steps, max_steps, threads, progress) -> dict:
    from blockvla_ros.runtime.runner import PolicyRunner
    runner = PolicyRunner.load(policy, threads=threads)
    _check_policy(runner)
    return evaluate_suite(runner_predictor(runner), suite, names, episodes, seed, execute_steps, max_steps, progress)


def _evaluate_in_processes(policy, suite, names, episodes, seed, execute_steps, max_steps, threads, jobs,
                           progress) -> dict:
    """evaluate_suite over `jobs` spawned processes, tasks dealt round-robin; merged in suite order."""
    import multiprocessing

    _check_positive('jobs', jobs)
    groups = [names[i::jobs] for i in range(min(jobs, len(names)))]
    start = time.monotonic()
    with multiprocessing.get_context('spawn').Pool(len(groups)) as pool:
        parts = pool.starmap(_evaluate_runner, [(policy, suite, g, episodes, seed, execute_steps, max_steps,
                                                 threads, progress and i == 0) for i, g in enumerate(groups)])
    per_task = {t: r for part in parts for t, r in part['per_task'].items()}
    frames = {t: f for part in parts for t, f in part['frames'].items()}
    per_task = {t: per_task[t] for t in names}
    return {'success_rate': float(np.mean([r['success_rate'] for r in per_task.values()])), 'per_task': per_task,
            'frames': {t: frames[t] for t in names if t in frames}, 'episodes_per_task': episodes, 'seed': seed,
            'execute_steps': execute_steps, 'jobs': len(groups), 'wall_s': round(time.monotonic() - start, 1)}


def _check_policy(runner) -> None:
    names = list(runner.spec.action_names) if hasattr(runner, 'spec') else None
    if names is not None and len(names) != len(ACTION_NAMES):
        raise ValueError(f'the policy acts on {names}; Meta-World needs {len(ACTION_NAMES)} actions {ACTION_NAMES}')


def _check_chunk(chunk, task: str) -> np.ndarray:
    arr = np.asarray(chunk, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != len(ACTION_NAMES):
        raise ValueError(f'predict_chunk returned shape {arr.shape} on {task}; expected [H, {len(ACTION_NAMES)}]')
    if not np.all(np.isfinite(arr)):
        raise ValueError(f'predict_chunk returned a non-finite action on {task}')
    return arr


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')


def _pick(frames: list, n: int) -> list:
    if len(frames) <= n:
        return frames
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]
