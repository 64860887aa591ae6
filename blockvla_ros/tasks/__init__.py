"""The built-in tabletop benchmark: touch coloured objects in the order a language instruction gives.

    env = TabletopEnv('touch_red_then_blue', seed=0); obs = env.reset(); obs, done, success = env.step(action)
    evaluate_closed_loop(predict_chunk)          # success rates of a chunking policy
    recording.record_demonstrations(out_dir)     # scripted-expert rosbag2 recordings (needs rosbags)
"""
from blockvla_ros.tasks.evaluate import evaluate_closed_loop, random_policy_success
from blockvla_ros.tasks.expert import ScriptedExpert, expert_rollout
from blockvla_ros.tasks.spec import (ACTION_DIM, ACTION_HIGH, ACTION_LOW, ACTION_NAMES, STATE_DIM, STATE_HIGH,
                                     STATE_LOW, STATE_NAMES, TASKS, TaskSpec, get_task)
from blockvla_ros.tasks.tabletop import Observation, TabletopEnv, episode_seed

__all__ = [
    'ACTION_DIM', 'ACTION_HIGH', 'ACTION_LOW', 'ACTION_NAMES', 'STATE_DIM', 'STATE_HIGH', 'STATE_LOW', 'STATE_NAMES',
    'TASKS', 'Observation', 'ScriptedExpert', 'TabletopEnv', 'TaskSpec', 'episode_seed', 'evaluate_closed_loop',
    'expert_rollout', 'get_task', 'random_policy_success',
]
