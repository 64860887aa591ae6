"""The scripted expert that produces demonstrations: straight to the next target, press on arrival."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from blockvla_ros.tasks.spec import ACTION_DIM, MAX_STEP
from blockvla_ros.tasks.tabletop import Observation, TabletopEnv

# What a recording stores as the action of a tick when the expert's heading is noisy:
#   executed  the noisy action the environment executed (labels carry the noise: a policy can only learn a spread-out
#             distribution over the direction bins, ~0.25 peak probability at noise 0.1 with 32 bins);
#   intended  the expert's noise-free action at the state the noisy rollout reached (DART, Laskey et al. 2017: the
#             noise varies the visited states, the labels stay what the expert would do there). Beware with
#             block-diffusion training: a chunk's intended moves are nearly constant (a direction token equals the
#             previous tick's 71-73 % of the time at noise 0.1, 26 % for executed labels), so a masked token is
#             predicted by copying a visible neighbour. The demo recipe on intended labels (with train_block_sizes
#             [3, 6, 12], 4,500 steps) did exactly that: 0.74 masked accuracy from step 500 on, while decoded
#             direction tokens stayed at chance (10 / 5 % right; the most common token alone is 11 %), first moves
#             75 deg off the expert's (the shipped demo: 14 deg), 0-1 % closed loop with every decoder, AR included.
#             Executed labels (the default) trained the shipped demo policy.
LABELS = ('executed', 'intended')


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
        """Action float32[3] = (dx, dy, gripper) for the env's current state, with the heading noise."""
        return self.act_pair(env)[1]

    def act_pair(self, env: TabletopEnv) -> tuple[np.ndarray, np.ndarray]:
        """(intended, executed) float32[3] each: the noise-free action and the one with the heading noise."""
        action = np.zeros(ACTION_DIM, dtype=np.float32)
        target = env.next_target
        if target is None:
            return action, action.copy()   # all targets touched: hold still
        delta = np.asarray(target.xy) - env.ee
        dist = float(np.linalg.norm(delta))
        if dist <= MAX_STEP:
            action[:2] = delta / MAX_STEP
            action[2] = 1.0
            return action, action.copy()
        move = delta / dist
        intended = action.copy()
        intended[:2] = np.clip(move, -1.0, 1.0)
        if self.noise > 0 and dist > 2 * MAX_STEP:  # keep the final approach clean
            move = move + self._rng.normal(0.0, self.noise, size=2)
        action[:2] = np.clip(move, -1.0, 1.0)
        return intended, action


def expert_rollout(env: TabletopEnv, expert: ScriptedExpert | None = None,
                   labels: str = 'executed') -> Iterator[tuple[Observation, np.ndarray]]:
    """Reset `env` and run the expert to the end; yields (observation, action label) per tick, the label being the
    executed action or the expert's intended one (`labels`, see LABELS). The env always executes the noisy action.
    The terminal observation is not yielded (no action follows it); read `env.success` afterwards."""
    if labels not in LABELS:
        raise ValueError(f'labels must be one of {LABELS}, got {labels!r}')
    expert = expert or ScriptedExpert()
    obs = env.reset()
    done = False
    while not done:
        intended, executed = expert.act_pair(env)
        yield obs, (intended if labels == 'intended' else executed)
        obs, done, _ = env.step(executed)
