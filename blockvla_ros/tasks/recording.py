"""Record scripted-expert demonstrations of the tabletop tasks as rosbag2 recordings (one bag per episode)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from tqdm import tqdm

from blockvla_ros.io.bag_writer import RecordingWriter, TopicNames
from blockvla_ros.tasks.expert import LABELS, ScriptedExpert, expert_rollout
from blockvla_ros.tasks.spec import ACTION_NAMES, STATE_NAMES, resolve_tasks
from blockvla_ros.tasks.tabletop import TabletopEnv, episode_seed

logger = logging.getLogger(__name__)

RECORDING_START_NS = 1_700_000_000 * 1_000_000_000   # every bag starts here: deterministic stamps
INSTRUCTION_PERIOD_NS = 1_000_000_000                # the instruction is re-published every second


def bag_name(task: str, seed: int, index: int) -> str:
    """Deterministic bag directory name of one recorded episode."""
    return f'{task}_seed{seed}_ep{index:04d}'


def record_demonstrations(out_dir, tasks=None, episodes_per_task: int = 10, seed: int = 0, rate_hz: float = 10,
                          storage: str = 'mcap', image_format: str = 'raw', action_msg: str = 'JointTrajectory',
                          image_size: int = 64, expert_noise: float = 0.0, labels: str = 'executed',
                          topics: TopicNames | None = None, progress: bool = True) -> list[Path]:
    """Run the scripted expert on each task and write one bag per episode under `out_dir`; returns their paths.

    Per tick k (stamp t0 + k / rate_hz): image, state and the expert's action, all with the same stamp; the
    instruction at the first tick and then once per second. The terminal observation is not written (no action
    follows it). The action recorded is the executed one or, with labels='intended', the expert's noise-free action
    at the reached state (DART; tasks.expert.LABELS). Episodes come from the 'train' seed stream. An episode the
    expert fails (only possible with a large `expert_noise`) is dropped with a warning. Refuses (FileExistsError)
    if any bag already exists.
    """
    names = resolve_tasks(tasks)
    if labels not in LABELS:
        raise ValueError(f'labels must be one of {LABELS}, got {labels!r}')
    if not isinstance(episodes_per_task, int) or episodes_per_task < 1:
        raise ValueError(f'episodes_per_task must be a positive int, got {episodes_per_task!r}')
    if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f'rate_hz must be a positive number, got {rate_hz!r}')
    dt_ns = round(1e9 / rate_hz)
    out_dir = Path(out_dir)
    plan = [(name, i, out_dir / bag_name(name, seed, i)) for name in names for i in range(episodes_per_task)]
    existing = [str(p) for _, _, p in plan if p.exists() or p.is_symlink()]
    if existing:
        raise FileExistsError(f'{len(existing)} recording(s) already exist in {out_dir}, e.g. {existing[0]}; '
                              f'choose another --out directory or seed')
    written = []
    for name, index, path in tqdm(plan, desc='recording demonstrations', unit='bag', disable=not progress):
        ep_seed = episode_seed(seed, name, index, 'train')
        env = TabletopEnv(name, ep_seed, image_size=image_size)
        writer = RecordingWriter(path, storage=storage, image_format=image_format, action_msg=action_msg,
                                 topics=topics).open()
        try:
            last_instruction = None
            rollout = expert_rollout(env, ScriptedExpert(expert_noise, seed=ep_seed), labels)
            for k, (obs, action) in enumerate(rollout):
                t = RECORDING_START_NS + k * dt_ns
                if last_instruction is None or t - last_instruction >= INSTRUCTION_PERIOD_NS:
                    writer.write_instruction(t, obs.instruction)
                    last_instruction = t
                writer.write_image(t, obs.image)
                writer.write_state(t, obs.state, STATE_NAMES)
                writer.write_action(t, action, ACTION_NAMES)
            for key, value in (('task', name), ('seed', seed), ('episode', index), ('episode_seed', ep_seed),
                               ('rate_hz', rate_hz), ('steps', env.steps), ('success', env.success),
                               ('noise', expert_noise), ('labels', labels)):
                writer.set_metadata(f'blockvla.{key}', str(value))
        except BaseException:
            writer.abort()
            raise
        if not env.success:
            writer.abort()
            logger.warning('expert failed %s episode %d (%s); not recorded', name, index, env.failure)
            continue
        written.append(writer.close())
    logger.info('recorded %d episodes of %d tasks in %s', len(written), len(names), out_dir)
    return written
