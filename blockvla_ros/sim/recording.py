"""Record Meta-World's scripted experts as rosbag2 recordings, one bag per successful episode.

The topics and types are what a robot would record (see io/bag_writer.py): the 64x64 camera Image, the
instruction, joint_states = hand x/y/z + gripper opening, and the commanded action (hand dx/dy/dz + gripper
effort) as a JointTrajectory, all stamped on the 80 Hz grid of the simulation. `blockvla-train` reads them with
`data.rate_hz: 80` and nothing else changed.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from blockvla_ros.io.bag_writer import RecordingWriter
from blockvla_ros.io.episode_recording import bag_name, record_episode
from blockvla_ros.sim.suites import ACTION_NAMES, CONTROL_RATE_HZ, STATE_NAMES, resolve_suite

logger = logging.getLogger(__name__)

STEP_NS = round(1e9 / CONTROL_RATE_HZ)                # 12.5 ms


def record_suite(out_dir, suite: str = 'mt10', tasks=None, episodes_per_task: int = 50, seed: int = 0,
                 storage: str = 'mcap', image_size: int = 64, progress: bool = True) -> dict:
    """Run the expert on episodes 0..N-1 (layouts of `MT1(task, seed)`) of each task and write the successful
    ones under `out_dir`. Returns {'per_task': {task: {'recorded', 'attempted', 'steps'}}, 'recorded', 'attempted',
    'paths'}. Refuses (FileExistsError) when any bag of the plan already exists."""
    from blockvla_ros.sim.env import MetaWorldEnv

    names = resolve_suite(suite, tasks)
    if isinstance(episodes_per_task, bool) or not isinstance(episodes_per_task, int) or episodes_per_task < 1:
        raise ValueError(f'episodes_per_task must be a positive int, got {episodes_per_task!r}')
    out_dir = Path(out_dir)
    existing = [out_dir / bag_name(t, seed, i) for t in names for i in range(episodes_per_task)]
    existing = [p for p in existing if p.exists() or p.is_symlink()]
    if existing:
        raise FileExistsError(f'{len(existing)} recording(s) already exist in {out_dir}, e.g. {existing[0]}; '
                              'choose another --out directory or seed')
    per_task, paths = {}, []
    bar = tqdm(total=len(names) * episodes_per_task, desc='recording expert episodes', unit='ep',
               disable=not progress)
    for name in names:
        env = MetaWorldEnv(name, seed=seed, image_size=image_size)
        recorded, steps = 0, []
        for episode in range(episodes_per_task):
            path = _record_episode(env, episode, out_dir / bag_name(name, seed, episode), storage)
            if path is not None:
                paths.append(path)
                recorded += 1
                steps.append(env.steps)
            bar.update(1)
            bar.set_postfix_str(f'{name}: {recorded}/{episode + 1} successful')
        env.close()
        per_task[name] = {'recorded': recorded, 'attempted': episodes_per_task,
                          'mean_steps': round(sum(steps) / len(steps), 1) if steps else None}
        logger.info('%s: recorded %d of %d expert episodes', name, recorded, episodes_per_task)
    bar.close()
    return {'per_task': per_task, 'recorded': len(paths), 'attempted': len(names) * episodes_per_task,
            'paths': [str(p) for p in paths], 'seed': seed, 'suite': suite}


def _record_episode(env, episode: int, path: Path, storage: str) -> Path | None:
    """One expert episode; the bag appears at `path` only if the expert succeeded."""
    def ticks():
        obs, done = env.reset(episode), False
        while not done:
            action = env.expert_action()
            yield obs.instruction, obs.image, obs.state, action
            obs, done, _ = env.step(action)

    def metadata():   # read after the episode's last tick
        return {'task': env.task, 'seed': env.seed, 'episode': episode, 'rate_hz': CONTROL_RATE_HZ,
                'steps': env.steps, 'success': env.success}

    recorded = record_episode(RecordingWriter(path, storage=storage), ticks(), STEP_NS, STATE_NAMES, ACTION_NAMES,
                              metadata, lambda: env.success)
    if recorded is None:
        logger.info('expert failed %s episode %d after %d steps; not recorded', env.task, episode, env.steps)
    return recorded
