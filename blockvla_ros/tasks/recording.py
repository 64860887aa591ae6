"""Record scripted-expert demonstrations of the tabletop tasks as rosbag2 recordings (one bag per episode)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from tqdm import tqdm

from blockvla_ros.io.bag_writer import RecordingWriter, TopicNames
from blockvla_ros.io.episode_recording import bag_name, record_episode
from blockvla_ros.tasks.expert import LABELS, ScriptedExpert, expert_rollout
from blockvla_ros.tasks.spec import ACTION_NAMES, STATE_NAMES, resolve_tasks
from blockvla_ros.tasks.tabletop import TabletopEnv, episode_seed

logger = logging.getLogger(__name__)


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
                                 topics=topics)
        rollout = expert_rollout(env, ScriptedExpert(expert_noise, seed=ep_seed), labels)
        ticks = ((obs.instruction, obs.image, obs.state, action) for obs, action in rollout)

        def metadata(env=env, name=name, index=index, ep_seed=ep_seed):   # read after the episode's last tick
            return {'task': name, 'seed': seed, 'episode': index, 'episode_seed': ep_seed, 'rate_hz': rate_hz,
                    'steps': env.steps, 'success': env.success, 'noise': expert_noise, 'labels': labels}
        recorded = record_episode(writer, ticks, dt_ns, STATE_NAMES, ACTION_NAMES, metadata,
                                  lambda env=env: env.success)
        if recorded is None:
            logger.warning('expert failed %s episode %d (%s); not recorded', name, index, env.failure)
            continue
        written.append(recorded)
    logger.info('recorded %d episodes of %d tasks in %s', len(written), len(names), out_dir)
    return written
