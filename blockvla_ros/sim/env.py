"""A Meta-World task as this package uses it: seeded layouts, a fast 64x64 camera, hand + gripper state.

    env = MetaWorldEnv('push-v3', seed=0)      # MT1('push-v3', seed=0): 50 fixed object/goal layouts
    obs = env.reset(episode=3)                 # layout 3 (episodes past 50 cycle through the layouts)
    obs, done, success = env.step(action)      # action float[4] in [-1, 1]: hand dx, dy, dz, gripper effort
    env.expert_action()                        # Meta-World's scripted policy for the current state

Rendering is fixed here, the same for recording, training and evaluation: the model's shadow map is 1 pixel and
off-screen multisampling off (set before the renderer exists), the scene's shadow / reflection / skybox flags off,
the `corner` camera turned 180 degrees (it renders upside down). That is 70-140 fps at 64x64 on a CPU instead of
3-11 fps with Meta-World's defaults. Needs the `sim` extra (`pip install .[sim]`) and an off-screen GL:
MUJOCO_GL=egl (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri, the default here) or MUJOCO_GL=osmesa (libosmesa6).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np

from blockvla_ros.sim.suites import (ACTION_NAMES, CAMERA, IMAGE_SIZE, INSTRUCTIONS, LAYOUTS_PER_SEED, MAX_STEPS,
                                     resolve_suite)

INSTALL_HINT = ("pip install '.[sim]' (or `make setup-sim`) and an off-screen GL: apt-get install libegl1 "
                'libegl-mesa0 libgl1-mesa-dri (MUJOCO_GL=egl) or libosmesa6 (MUJOCO_GL=osmesa)')


def import_metaworld():
    """(metaworld, mujoco, metaworld.policies) or an ImportError naming the extra to install."""
    os.environ.setdefault('MUJOCO_GL', 'egl')
    try:
        import metaworld
        import metaworld.policies
        import mujoco
    except ImportError as e:
        raise ImportError(f'Meta-World simulation needs the sim extra ({e}); {INSTALL_HINT}') from e
    return metaworld, mujoco, metaworld.policies


@dataclass(frozen=True)
class SimObservation:
    image: np.ndarray | None   # [S, S, 3] uint8 RGB (None when not rendered)
    state: np.ndarray          # float32[4]: hand x, y, z (m), finger opening 0..1 (STATE_NAMES)
    instruction: str


class FastRenderer:
    """mujoco.Renderer with the cheap settings above; `render(data)` -> [S, S, 3] uint8 RGB, upright."""

    def __init__(self, model, size: int = IMAGE_SIZE, camera: str = CAMERA):
        _, mujoco, _ = import_metaworld()
        if not isinstance(size, int) or not 16 <= size <= 1024:
            raise ValueError(f'image size must be an int in [16, 1024], got {size!r}')
        model.vis.quality.shadowsize = 1     # must be set before the GL context exists
        model.vis.quality.offsamples = 0
        self._mujoco = mujoco
        self._renderer = mujoco.Renderer(model, size, size)
        flags = self._renderer.scene.flags
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            flags[flag] = 0
        self._camera = camera
        self._flip = camera.startswith('corner')

    def render(self, data) -> np.ndarray:
        self._renderer.update_scene(data, camera=self._camera)
        rgb = self._renderer.render()                       # [S, S, 3] uint8
        return np.ascontiguousarray(rgb[::-1, ::-1]) if self._flip else rgb

    def close(self) -> None:
        self._renderer.close()


class MetaWorldEnv:
    """One Meta-World task with the 50 layouts of `MT1(task, seed)`; seed 0 and seed 1 layouts do not overlap."""

    def __init__(self, task: str, seed: int = 0, image_size: int = IMAGE_SIZE, max_steps: int = MAX_STEPS,
                 camera: str = CAMERA):
        metaworld, _, policies = import_metaworld()
        self.task = resolve_suite('mt10', [task])[0]
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f'seed must be a non-negative int, got {seed!r}')
        if not isinstance(max_steps, int) or not 1 <= max_steps <= MAX_STEPS:
            raise ValueError(f'max_steps must be an int in [1, {MAX_STEPS}], got {max_steps!r}')
        self.seed, self.max_steps, self.image_size = int(seed), max_steps, image_size
        state = np.random.get_state()               # MT1 reseeds numpy's global RNG: leave it as it was
        try:
            benchmark = metaworld.MT1(self.task, seed=self.seed)
        finally:
            np.random.set_state(state)
        self._layouts = benchmark.train_tasks
        self._env = benchmark.train_classes[self.task]()
        self._renderer = FastRenderer(self._env.model, image_size, camera)
        self._expert = policies.ENV_POLICY_MAP[self.task]()
        self._obs = None
        self.episode = -1
        self.instruction = ''
        self.steps = 0
        self.done = self.success = False

    def reset(self, episode: int = 0, render: bool = True) -> SimObservation:
        """Start episode `episode`: layout `episode % 50` and one of the task's instructions (seeded)."""
        if isinstance(episode, bool) or not isinstance(episode, (int, np.integer)) or episode < 0:
            raise ValueError(f'episode must be a non-negative int, got {episode!r}')
        self.episode = int(episode)
        self._env.set_task(self._layouts[self.episode % LAYOUTS_PER_SEED])
        self._obs, _ = self._env.reset()
        rng = np.random.default_rng([self.seed, zlib.crc32(self.task.encode()), self.episode])
        paraphrases = INSTRUCTIONS[self.task]
        self.instruction = paraphrases[int(rng.integers(len(paraphrases)))]
        self.steps = 0
        self.done = self.success = False
        return self.observation(render)

    def step(self, action, render: bool = True) -> tuple[SimObservation, bool, bool]:
        """Apply one action (clipped to [-1, 1]); returns (observation, done, success). Success ends the episode."""
        if self._obs is None:
            raise RuntimeError('call reset() before step()')
        if self.done:
            raise RuntimeError(f'episode {self.episode} of {self.task} is over; call reset()')
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (len(ACTION_NAMES),):
            raise ValueError(f'action must have {len(ACTION_NAMES)} values {ACTION_NAMES}, got shape {a.shape}')
        if not np.all(np.isfinite(a)):
            raise ValueError(f'action contains a non-finite value: {a.tolist()}')
        self._obs, _reward, _terminated, truncated, info = self._env.step(np.clip(a, -1.0, 1.0).astype(np.float32))
        self.steps += 1
        self.success = bool(info['success'] > 0)
        self.done = self.success or bool(truncated) or self.steps >= self.max_steps
        return self.observation(render), self.done, self.success

    def observation(self, render: bool = True) -> SimObservation:
        image = self._renderer.render(self._env.data) if render else None
        return SimObservation(image, self._obs[:4].astype(np.float32), self.instruction)

    def render(self) -> np.ndarray:
        return self._renderer.render(self._env.data)

    def expert_action(self) -> np.ndarray:
        """Meta-World's scripted policy (privileged: it reads object and goal positions) for the current state."""
        return np.clip(self._expert.get_action(self._obs), -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        self._renderer.close()
        self._env.close()
