"""The tabletop benchmark environment: touch coloured objects in the order the instruction gives.

Each episode (fixed by its seed) places one red, green, blue and yellow object (circle or square) at random
positions and the end effector at a random start. Action = (dx, dy, gripper): the effector moves by
(dx, dy) * MAX_STEP (clipped to the table), then, if gripper >= 0.5, presses at its new position. Pressing
on the next target marks it touched (drawn with a white ring); pressing on any other not yet touched object
fails the episode; pressing on empty table or on an already touched object does nothing.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from blockvla_ros.tasks.render import TableRenderer
from blockvla_ros.tasks.spec import (ACTION_DIM, ACTION_NAMES, COLORS, MAX_STEP, MIN_SEPARATION, SHAPES,
                                     TOUCH_RADIUS, TOUCH_THRESHOLD, TableObject, get_task)

_PLACE_LIMIT = 0.8      # object centres stay this far inside the table edge
_START_LIMIT = 0.9      # effector start range


@dataclass(frozen=True)
class Observation:
    image: np.ndarray       # [H, W, 3] uint8 RGB
    instruction: str
    state: np.ndarray       # float32[2]: effector (x, y) in [-1, 1]


class TabletopEnv:
    """One task, one seeded episode layout. `reset()` always restarts the same episode unless given a seed."""

    def __init__(self, task: str, seed: int = 0, image_size: int = 64, max_steps: int | None = None):
        self.spec = get_task(task)
        if max_steps is None:
            max_steps = self.spec.default_max_steps
        if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ValueError(f'max_steps must be a positive int, got {max_steps!r}')
        self.max_steps = int(max_steps)
        self.seed = _check_seed(seed)
        self._renderer = TableRenderer(image_size)
        self.image_size = self._renderer.size
        self.objects: list[TableObject] = []
        self.target_ids: list[int] = []     # object indices to touch, in order
        self.touched: list[int] = []        # object indices touched so far, in order
        self.instruction = ''
        self.ee = np.zeros(2, dtype=np.float64)
        self.steps = 0
        self.done = False
        self.success = False
        self.failure: str | None = None     # why the episode failed, when it did
        self._pressing = False
        self._started = False

    # --- episode ---------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Observation:
        if seed is not None:
            self.seed = _check_seed(seed)
        rng = np.random.default_rng(self.seed)
        self.objects = _place_objects(rng)
        by_colour = {o.color: i for i, o in enumerate(self.objects)}
        self.target_ids = [by_colour[c] for c in self.spec.targets]
        self.ee = rng.uniform(-_START_LIMIT, _START_LIMIT, size=2)
        paraphrases = self.spec.instructions({o.color: o.shape for o in self.objects})
        self.instruction = paraphrases[int(rng.integers(len(paraphrases)))]
        self.touched = []
        self.steps = 0
        self.done = False
        self.success = False
        self.failure = None
        self._pressing = False
        self._started = True
        self._renderer.set_objects(self.objects)
        return self.observation()

    def step(self, action) -> tuple[Observation, bool, bool]:
        """Apply one action; returns (observation, done, success)."""
        if not self._started:
            raise RuntimeError('call reset() before step()')
        if self.done:
            raise RuntimeError(f'episode of task {self.spec.name!r} (seed {self.seed}) is over; call reset()')
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f'action must have shape ({ACTION_DIM},) = {ACTION_NAMES}, got shape {a.shape}')
        if not np.all(np.isfinite(a)):
            raise ValueError(f'action contains a non-finite value: {a.tolist()}')
        self.ee = np.clip(self.ee + np.clip(a[:2], -1.0, 1.0) * MAX_STEP, -1.0, 1.0)
        self._pressing = bool(a[2] >= TOUCH_THRESHOLD)
        self.steps += 1
        if self._pressing:
            self._press()
        if not self.done and self.steps >= self.max_steps:
            self.done = True
            self.failure = f'timeout after {self.steps} steps'
        return self.observation(), self.done, self.success

    def _press(self) -> None:
        i = self.object_in_reach()
        if i is None or i in self.touched:
            return
        if i == self.target_ids[len(self.touched)]:
            self.touched.append(i)
            if len(self.touched) == len(self.target_ids):
                self.done = True
                self.success = True
        else:
            self.done = True
            self.failure = f'pressed the {self.objects[i].color} object while {self.next_target.color} was next'

    # --- views -----------------------------------------------------------------------------------------
    def observation(self) -> Observation:
        image = self._renderer.render(self.touched, self.ee, self._pressing)
        return Observation(image=image, instruction=self.instruction, state=self.ee.astype(np.float32))

    def object_in_reach(self) -> int | None:
        """Index of the object within TOUCH_RADIUS of the effector (at most one, by layout), else None."""
        centres = np.array([o.xy for o in self.objects])           # [N, 2]
        dist = np.linalg.norm(centres - self.ee[None, :], axis=1)  # [N]
        i = int(np.argmin(dist))
        return i if dist[i] < TOUCH_RADIUS else None

    @property
    def next_target(self) -> TableObject | None:
        """The object to touch next (privileged information for the scripted expert)."""
        if len(self.touched) >= len(self.target_ids):
            return None
        return self.objects[self.target_ids[len(self.touched)]]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}')
    return int(seed)


def _place_objects(rng: np.random.Generator) -> list[TableObject]:
    """One object per colour, random shape, centres at least MIN_SEPARATION apart (rejection sampling)."""
    for _ in range(1000):
        xy = rng.uniform(-_PLACE_LIMIT, _PLACE_LIMIT, size=(len(COLORS), 2))     # [N, 2]
        dist = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=-1)         # [N, N]
        dist[np.diag_indices(len(COLORS))] = np.inf
        if dist.min() >= MIN_SEPARATION:
            break
    else:  # pragma: no cover - the table has plenty of room for four objects
        raise RuntimeError('could not place the objects')
    shapes = rng.integers(len(SHAPES), size=len(COLORS))
    return [TableObject(c, SHAPES[int(shapes[k])], (float(xy[k, 0]), float(xy[k, 1]))) for k, c in enumerate(COLORS)]


_SPLITS = {'train': 0, 'eval': 1}


def episode_seed(seed: int, task: str, index: int, split: str) -> int:
    """Stable seed of episode `index` of `task`. 'train' (recorded demonstrations) and 'eval' (closed-loop
    evaluation) draw from independent streams, so evaluating with the recording's seed is not test-on-train."""
    if split not in _SPLITS:
        raise ValueError(f'split must be one of {sorted(_SPLITS)}, got {split!r}')
    entropy = [_check_seed(seed), zlib.crc32(task.encode()), int(index), _SPLITS[split]]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
