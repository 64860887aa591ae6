"""The tabletop task's vocabulary: action/state layout, objects, and the task registry with its paraphrases.

Coordinates: the table is the square [-1, 1] x [-1, 1]; x points right, y points up (image row 0 is y = +1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACTION_NAMES = ['ee_dx', 'ee_dy', 'gripper']
# What each action dimension means to whoever executes it (model.action_kinds of a policy trained on this task):
# the effector moves by (ee_dx, ee_dy) * MAX_STEP per tick (increments), gripper is the press level (a target).
ACTION_KINDS = ['delta', 'delta', 'absolute']
STATE_NAMES = ['ee_x', 'ee_y']
ACTION_DIM = len(ACTION_NAMES)
STATE_DIM = len(STATE_NAMES)
# dx, dy are fractions of MAX_STEP (clipped to [-1, 1]); gripper is a press command, 1 = press.
ACTION_LOW = np.array([-1.0, -1.0, 0.0], dtype=np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)
STATE_LOW = np.array([-1.0, -1.0], dtype=np.float32)
STATE_HIGH = np.array([1.0, 1.0], dtype=np.float32)

MAX_STEP = 0.1          # table units per tick at |dx| = 1 (5 % of the table width)
TOUCH_THRESHOLD = 0.5   # gripper >= this means "press"
TOUCH_RADIUS = 0.15     # the effector touches an object whose centre is closer than this
OBJECT_RADIUS = 0.11    # drawn half-size of an object
MIN_SEPARATION = 0.45   # between object centres (> 2 * TOUCH_RADIUS: at most one object is ever in reach)
STEPS_PER_TARGET = 40   # default episode budget per target (the expert needs at most ~30)

COLORS = ('red', 'green', 'blue', 'yellow')
SHAPES = ('circle', 'square')
# RGB, uint8
COLOR_RGB = {
    'red': (220, 40, 40),
    'green': (40, 180, 60),
    'blue': (40, 80, 230),
    'yellow': (235, 210, 40),
}

# Paraphrases by number of targets; {cK} / {sK} are the K-th target's colour and shape.
TEMPLATES = {
    1: (
        'touch the {c0} block',
        'press the {c0} object',
        'tap the {c0} {s0}',
        'move to the {c0} {s0} and press it',
    ),
    2: (
        'touch {c0}, then {c1}',
        'touch the {c0} object and then the {c1} one',
        'first press the {c0} block, then the {c1} block',
        'tap the {c0} {s0} followed by the {c1} {s1}',
    ),
    3: (
        'touch {c0}, then {c1}, then {c2}',
        'touch the {c0} object, then the {c1} one and then the {c2} one',
        'press the {c0} block, the {c1} block and the {c2} block in that order',
        'tap the {c0} {s0}, next the {c1} {s1}, finally the {c2} {s2}',
    ),
}


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: touch `targets` in order; pressing on any other object fails the episode."""

    name: str
    targets: tuple[str, ...]

    def __post_init__(self):
        if not self.targets or len(self.targets) not in TEMPLATES:
            raise ValueError(f'task {self.name!r}: needs 1 to {max(TEMPLATES)} targets, got {self.targets}')
        unknown = [c for c in self.targets if c not in COLORS]
        if unknown:
            raise ValueError(f'task {self.name!r}: unknown colours {unknown}; known: {list(COLORS)}')
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f'task {self.name!r}: a colour appears twice in {self.targets}')

    def instructions(self, shapes: dict[str, str]) -> list[str]:
        """Every paraphrase of this task, given the shape of each coloured object in the episode."""
        fields = {}
        for k, colour in enumerate(self.targets):
            fields[f'c{k}'] = colour
            fields[f's{k}'] = shapes[colour]
        return [t.format(**fields) for t in TEMPLATES[len(self.targets)]]

    @property
    def default_max_steps(self) -> int:
        return STEPS_PER_TARGET * len(self.targets)


def _registry() -> dict[str, TaskSpec]:
    specs = [TaskSpec(f'touch_{c}', (c,)) for c in COLORS]
    # Both orders of each pair, so the instruction (not the layout) decides which object comes first.
    for a, b in (('red', 'blue'), ('blue', 'red'), ('green', 'yellow'), ('yellow', 'green')):
        specs.append(TaskSpec(f'touch_{a}_then_{b}', (a, b)))
    specs.append(TaskSpec('touch_red_green_blue', ('red', 'green', 'blue')))
    return {s.name: s for s in specs}


TASKS: dict[str, TaskSpec] = _registry()


def get_task(name: str) -> TaskSpec:
    """The registered task called `name`; a clear ValueError naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f'unknown task {name!r}; known tasks: {sorted(TASKS)}') from None


def resolve_tasks(tasks: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Validate a task selection (None = all registered tasks, in registry order)."""
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [get_task(t).name for t in tasks]
    if not names:
        raise ValueError('empty task list')
    return names


@dataclass(frozen=True)
class TableObject:
    """One coloured object on the table; `xy` is its centre in table units."""

    color: str
    shape: str
    xy: tuple[float, float]
