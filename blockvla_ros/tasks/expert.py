"""The scripted expert that produces demonstrations: straight to the next target, press on arrival."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from blockvla_ros.tasks.spec import ACTION_DIM, MAX_STEP
from blockvla_ros.tasks.tabletop import Observation, TabletopEnv


class ScriptedExpert:
    """Reads the privileged env state. Far from the target it moves at full speed (optionally with Gaussian
    noise on the direction, for varied demonstrations); once the target is within one step it moves exactly
    onto it and presses in the same tick. Deterministic for a given `seed`."""

    def __init__(self, noise: float = 0.0, seed: int = 0):
        if not np.isfinite(noise) or noise < 0:
            raise ValueError(f'noise must be a finite value >= 0, got {noise!r}')
        self.noise = float(noise)
        self._rng = np.random.default_rng(seed)

    def act(self, env: TabletopEnv) -> np.ndarray:
        """Action float32[3] = (dx, dy, gripper) for the env's current state."""
        action = np.zeros(ACTION_DIM, dtype=np.float32)
        target = env.next_target
        if target is None:
            return action   # all targets touched: hold still
        delta = np.asarray(target.xy) - env.ee
        dist = float(np.linalg.norm(delta))
        if dist <= MAX_STEP:
            action[:2] = delta / MAX_STEP
            action[2] = 1.0
            return action
        move = delta / dist
        if self.noise > 0 and dist > 2 * MAX_STEP:  # keep the final approach clean
            move = move + self._rng.normal(0.0, self.noise, size=2)
        action[:2] = np.clip(move, -1.0, 1.0)
        return action


def expert_rollout(env: TabletopEnv, expert: ScriptedExpert | None = None) -> Iterator[tuple[Observation, np.ndarray]]:
    """Reset `env` and run the expert to the end; yields (observation, action taken from it) per tick.
    The terminal observation is not yielded (no action follows it); read `env.success` afterwards."""
    expert = expert or ScriptedExpert()
    obs = env.reset()
    done = False
    while not done:
        action = expert.act(env)
        yield obs, action
        obs, done, _ = env.step(action)
