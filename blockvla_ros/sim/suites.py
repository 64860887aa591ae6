"""Meta-World task suites as this package uses them: task names, the language for each task, and the
observation/action layout the recordings, the policy and the sim bridge share (one home for these facts).

Meta-World has no language; each task gets one instruction written from the task's meaning plus a few
paraphrases. An episode's instruction is drawn from them (seeded), in recordings and in evaluation alike.
"""
from __future__ import annotations

import re

# MT10 (Meta-World's multi-task benchmark of ten tasks), in Meta-World's order.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    'reach-v3': ('reach the red goal', 'move the gripper to the red goal', 'put the hand on the red target'),
    'push-v3': ('push the puck to the goal', 'slide the puck to the green target', 'push the red puck to the goal'),
    'pick-place-v3': ('pick up the puck and place it at the goal', 'grasp the puck and move it to the target',
                      'pick the red puck and put it on the goal'),
    'door-open-v3': ('open the door', 'pull the door open', 'swing the door open'),
    'drawer-open-v3': ('open the drawer', 'pull the drawer out', 'pull the drawer open'),
    'drawer-close-v3': ('close the drawer', 'push the drawer shut', 'push the drawer closed'),
    'button-press-topdown-v3': ('press the button from the top', 'push the button down',
                                'press the button down from above'),
    'peg-insert-side-v3': ('insert the peg into the hole', 'pick up the peg and put it in the hole',
                           'grasp the peg and insert it sideways'),
    'window-open-v3': ('open the window', 'slide the window open', 'push the window open'),
    'window-close-v3': ('close the window', 'slide the window closed', 'push the window shut'),
}
SUITES: dict[str, tuple[str, ...]] = {'mt10': tuple(INSTRUCTIONS)}

STATE_NAMES = ['hand_x', 'hand_y', 'hand_z', 'gripper']          # hand position (m), finger opening 0..1
ACTION_NAMES = ['hand_dx', 'hand_dy', 'hand_dz', 'gripper_effort']  # Meta-World's action, each in [-1, 1]
ACTION_LOW, ACTION_HIGH = -1.0, 1.0
CONTROL_RATE_HZ = 80.0      # one Meta-World step: 5 MuJoCo steps of 2.5 ms = 12.5 ms
MAX_STEPS = 500             # Meta-World's episode limit (max_path_length)
LAYOUTS_PER_SEED = 50       # MT1(name, seed) pre-samples this many object/goal layouts
IMAGE_SIZE = 64
CAMERA = 'corner'           # renders upside down: the wrapper turns it 180 degrees


def resolve_suite(suite: str | None = None, tasks=None) -> list[str]:
    """The task names of `suite` (default mt10), or the given subset of them (names with or without '-v3')."""
    suite = suite or 'mt10'
    if suite not in SUITES:
        raise ValueError(f'unknown suite {suite!r}; known suites: {sorted(SUITES)}')
    names = list(SUITES[suite])
    if tasks is None:
        return names
    if isinstance(tasks, str):
        tasks = [tasks]
    chosen = []
    for t in tasks:
        name = t if t.endswith('-v3') else f'{t}-v3'
        if name not in names:
            raise ValueError(f'unknown task {t!r} in suite {suite!r}; known tasks: {names}')
        chosen.append(name)
    if not chosen:
        raise ValueError('empty task list')
    return chosen


def vocabulary(suite: str = 'mt10') -> list[str]:
    """Every lower-case word of the suite's instructions, sorted (for a word-level tokenizer backbone)."""
    words = set()
    for name in resolve_suite(suite):
        for text in INSTRUCTIONS[name]:
            words.update(re.findall(r'\w+|[^\w\s]+', text.lower()))
    return sorted(words)
