"""Closed-loop evaluation of a chunking policy on the tabletop tasks, and the random-policy baseline."""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from blockvla_ros.tasks.spec import ACTION_DIM, ACTION_HIGH, ACTION_LOW, ACTION_NAMES, resolve_tasks
from blockvla_ros.tasks.tabletop import TabletopEnv, episode_seed

logger = logging.getLogger(__name__)

# predict_chunk(image [H, W, 3] uint8 RGB, instruction, state float32[2]) -> actions [H, 3]
PredictChunk = Callable[[np.ndarray, str, np.ndarray], np.ndarray]


def evaluate_closed_loop(predict_chunk: PredictChunk, tasks=None, episodes_per_task: int = 10, seed: int = 0,
                         execute_steps: int | None = None, image_size: int = 64, max_steps: int | None = None,
                         progress: bool = True) -> dict:
    """Run `episodes_per_task` seeded episodes per task (the 'eval' seed stream, disjoint from recordings).

    After each prediction the first `execute_steps` actions of the chunk (all of them when None) are executed
    before the policy is asked again. Returns {'success_rate', 'successes', 'episodes', 'policy_calls',
    'per_task': {task: {'success_rate', 'successes', 'episodes', 'mean_steps', 'failures'}}, and the settings}.
    """
    names = resolve_tasks(tasks)
    if not isinstance(episodes_per_task, (int, np.integer)) or episodes_per_task < 1:
        raise ValueError(f'episodes_per_task must be a positive int, got {episodes_per_task!r}')
    if execute_steps is not None and (not isinstance(execute_steps, (int, np.integer)) or execute_steps < 1):
        raise ValueError(f'execute_steps must be None or a positive int, got {execute_steps!r}')
    per_task = {}
    calls = 0
    bar = tqdm(total=len(names) * episodes_per_task, desc='closed-loop eval', unit='ep', disable=not progress)
    for name in names:
        successes, steps, failures = 0, [], []
        for ep in range(episodes_per_task):
            env = TabletopEnv(name, episode_seed(seed, name, ep, 'eval'), image_size=image_size, max_steps=max_steps)
            obs = env.reset()
            done = success = False
            while not done:
                chunk = _check_chunk(predict_chunk(obs.image, obs.instruction, obs.state), name)
                calls += 1
                for action in chunk[:execute_steps]:
                    obs, done, success = env.step(action)
                    if done:
                        break
            successes += int(success)
            steps.append(env.steps)
            if not success:
                failures.append(env.failure)
            bar.update(1)
        per_task[name] = {
            'success_rate': successes / episodes_per_task,
            'successes': successes,
            'episodes': episodes_per_task,
            'mean_steps': float(np.mean(steps)),
            'failures': failures,
        }
        logger.info('task %s: %d/%d successful', name, successes, episodes_per_task)
    bar.close()
    total = sum(r['successes'] for r in per_task.values())
    episodes = len(names) * episodes_per_task
    return {
        'success_rate': total / episodes,
        'successes': total,
        'episodes': episodes,
        'episodes_per_task': episodes_per_task,
        'policy_calls': calls,
        'seed': seed,
        'execute_steps': execute_steps,
        'per_task': per_task,
    }


def random_policy_success(tasks=None, episodes_per_task: int = 10, seed: int = 0, image_size: int = 64,
                          progress: bool = False) -> dict:
    """evaluate_closed_loop of a policy drawing uniform actions within the action limits (fixed seed), on
    the same episodes a real policy sees for the same `seed`: the floor a learned policy must clear."""
    rng = np.random.default_rng(seed)

    def predict(image, instruction, state):
        return rng.uniform(ACTION_LOW, ACTION_HIGH, size=(1, ACTION_DIM)).astype(np.float32)

    return evaluate_closed_loop(predict, tasks=tasks, episodes_per_task=episodes_per_task, seed=seed,
                                image_size=image_size, progress=progress)


def _check_chunk(chunk, task: str) -> np.ndarray:
    arr = np.asarray(chunk, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != ACTION_DIM:
        raise ValueError(f'predict_chunk returned shape {arr.shape} on task {task!r}; expected [H, {ACTION_DIM}] '
                         f'(H >= 1, columns {ACTION_NAMES})')
    if not np.all(np.isfinite(arr)):
        raise ValueError(f'predict_chunk returned a non-finite action on task {task!r}')
    return arr
