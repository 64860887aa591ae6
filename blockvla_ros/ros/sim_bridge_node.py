"""`sim_bridge`: Meta-World as a robot on ROS 2, for the real policy node to drive over DDS.

The bridge owns time: it steps the simulator on the 80 Hz grid and publishes /clock (the policy node runs with
use_sim_time), paced at ``--real-time-factor`` sim seconds per wall second, so the node's inference latency costs
sim time as it would on a robot. Each step k (sim time t_k):

    /clock = t_k;  camera/image_raw (sensor_msgs/Image rgb8, stamp t_k);  joint_states (hand_x/y/z, gripper)
    ... wait until the wall deadline of t_k ...
    apply the newest `action` (sensor_msgs/JointState named hand_dx/dy/dz, gripper_effort) stamped <= t_k

A hold from the node (velocity = zeros) or no action yet means: the hand stays (dx = dy = dz = 0), the gripper
keeps its last effort. `instruction` (std_msgs/String, transient-local) carries the episode's instruction; between
episodes the bridge publishes an empty instruction (the node clears its plan and holds) for ``--gap-s`` sim
seconds, so no chunk planned in one episode runs in the next. Results (success and steps per episode) go to
``--out`` as JSON, the frames of each task's first episode to ``--frames`` (npz) for the montage.

    python -m blockvla_ros.ros.sim_bridge_node --tasks push-v3 --episodes 3 --seed 1 --out result.json
"""
from __future__ import annotations

import argparse
import array
import json
import os
import sys
import threading
import time

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String

from blockvla_ros.io.images import rgb8_to_image_fields
from blockvla_ros.ros.messages import to_time_msg

START_NS = 1_700_000_000 * 1_000_000_000  # sim time of the first step (a recording-like epoch)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class SimBridge(Node):
    """Publishes what the robot senses, keeps the newest action the policy node sent."""

    def __init__(self, action_names: list[str], state_names: list[str]):
        super().__init__('blockvla_sim_bridge')
        self.action_names, self.state_names = list(action_names), list(state_names)
        self._clock_pub = self.create_publisher(Clock, '/clock', 10)
        self._image_pub = self.create_publisher(Image, 'camera/image_raw', 10)
        self._state_pub = self.create_publisher(JointState, 'joint_states', 10)
        self._instruction_pub = self.create_publisher(String, 'instruction', LATCHED)
        self.create_subscription(JointState, 'action', self._on_action, 10)
        self._lock = threading.Lock()
        self._action: tuple[int, np.ndarray, bool] | None = None   # (stamp ns, values, hold)
        self.rejected = 0
        self.last_error = ''

    def _on_action(self, msg: JointState) -> None:
        """Keep the newest well-formed action (by name); anything else is counted and its reason kept."""
        try:
            names = list(msg.name)
            idx = [names.index(n) for n in self.action_names]
            values = np.asarray(msg.position, dtype=np.float64)[idx]
            if not np.all(np.isfinite(values)):
                raise ValueError('non-finite action')
            hold = len(msg.velocity) > 0 and not np.any(np.asarray(msg.velocity))
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        except (ValueError, IndexError) as e:
            with self._lock:
                self.rejected += 1
                self.last_error = f'action {list(msg.name)} refused: {e}'
            return
        with self._lock:
            if self._action is None or stamp >= self._action[0]:
                self._action = (stamp, values, hold)

    def take_action(self, now_ns: int) -> tuple[np.ndarray, bool] | None:
        """The newest action stamped <= now (None when there is none)."""
        with self._lock:
            if self._action is None or self._action[0] > now_ns:
                return None
            return self._action[1].copy(), self._action[2]

    def forget_actions(self) -> None:
        with self._lock:
            self._action = None

    def publish_clock(self, t_ns: int) -> None:
        msg = Clock()
        msg.clock = to_time_msg(t_ns)
        self._clock_pub.publish(msg)

    def publish_observation(self, t_ns: int, rgb: np.ndarray | None, state: np.ndarray) -> None:
        if rgb is not None:
            fields = rgb8_to_image_fields(rgb)
            msg = Image(height=fields['height'], width=fields['width'], encoding=fields['encoding'],
                        is_bigendian=fields['is_bigendian'], step=fields['step'])
            msg.header.stamp, msg.header.frame_id = to_time_msg(t_ns), 'camera'
            msg.data = array.array('B', fields['data'].tobytes())
            self._image_pub.publish(msg)
        js = JointState(name=self.state_names, position=[float(v) for v in state])
        js.header.stamp = to_time_msg(t_ns)
        self._state_pub.publish(js)

    def publish_instruction(self, text: str) -> None:
        self._instruction_pub.publish(String(data=text))

    def policy_node_ready(self) -> bool:
        return self.count_subscribers('camera/image_raw') > 0 and self.count_publishers('action') > 0


class Pacer:
    """Wall-clock deadlines for sim time: t_sim advances `factor` times as fast as the wall clock."""

    def __init__(self, factor: float):
        if not factor > 0:
            raise ValueError(f'real-time factor must be > 0, got {factor}')
        self.factor = factor
        self._wall0 = self._sim0 = None

    def restart(self, sim_ns: int) -> None:
        self._wall0, self._sim0 = time.monotonic(), sim_ns

    def wait_until(self, sim_ns: int) -> None:
        due = self._wall0 + (sim_ns - self._sim0) * 1e-9 / self.factor
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def run_episode(bridge: SimBridge, env, episode: int, t_ns: int, step_ns: int, pacer: Pacer,
                gap_ns: int, keep_frames: bool) -> tuple[dict, int, list]:
    """Run one episode from sim time t_ns; returns (result, next sim time, frames)."""
    # gap: no task, the node holds and drops its plan; the clock keeps running
    bridge.publish_instruction('')
    end_gap = t_ns + gap_ns
    obs = env.reset(episode)
    pacer.restart(t_ns)
    while t_ns < end_gap:
        bridge.publish_clock(t_ns)
        bridge.publish_observation(t_ns, obs.image, obs.state)
        t_ns += step_ns
        pacer.wait_until(t_ns)
    bridge.forget_actions()
    bridge.publish_instruction(obs.instruction)
    frames = [obs.image] if keep_frames else []
    gripper, holds, done = -1.0, 0, False
    while not done:
        bridge.publish_clock(t_ns)
        bridge.publish_observation(t_ns, obs.image, obs.state)
        pacer.wait_until(t_ns + step_ns)
        got = bridge.take_action(t_ns)
        if got is None or got[1]:
            action = np.array([0.0, 0.0, 0.0, gripper])
            holds += 1
        else:
            action = got[0]
            gripper = float(action[3])
        obs, done, _ = env.step(action)
        if keep_frames:
            frames.append(obs.image)
        t_ns += step_ns
    return {'episode': episode, 'success': env.success, 'steps': env.steps, 'holds': holds}, t_ns, frames


def run(bridge: SimBridge, tasks: list[str], episodes: int, seed: int, max_steps: int, factor: float,
        gap_s: float, wait_timeout_s: float, frames_path: str | None) -> dict:
    from blockvla_ros.sim.env import MetaWorldEnv
    from blockvla_ros.sim.suites import CONTROL_RATE_HZ

    step_ns = round(1e9 / CONTROL_RATE_HZ)
    deadline = time.monotonic() + wait_timeout_s
    while not bridge.policy_node_ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f'no policy node subscribed to camera/image_raw and publishing action within '
                               f'{wait_timeout_s:g} s')
        bridge.publish_clock(START_NS)
        time.sleep(0.05)
    pacer, t_ns = Pacer(factor), START_NS
    results, frames = {}, {}
    for task in tasks:
        env = MetaWorldEnv(task, seed=seed, max_steps=max_steps)
        results[task] = []
        for ep in range(episodes):
            r, t_ns, f = run_episode(bridge, env, ep, t_ns, step_ns, pacer, round(gap_s * 1e9), ep == 0)
            results[task].append(r)
            if f:
                frames[task] = f
            print(json.dumps({'task': task, **r}), flush=True)
        env.close()
    bridge.publish_instruction('')
    if frames_path:
        from blockvla_ros.sim.evaluate import MONTAGE_FRAMES, _pick
        np.savez_compressed(frames_path, **{t: np.stack(_pick(f, MONTAGE_FRAMES)) for t, f in frames.items()})
    return {'per_task': results, 'actions_rejected': bridge.rejected, 'last_error': bridge.last_error}


def main(argv=None) -> int:
    from blockvla_ros.sim.suites import ACTION_NAMES, MAX_STEPS, STATE_NAMES, resolve_suite

    argv = sys.argv[1:] if argv is None else list(argv)
    ros_args = argv[argv.index('--ros-args'):] if '--ros-args' in argv else []
    p = argparse.ArgumentParser(prog='sim_bridge', description=__doc__.split('\n\n')[0])
    p.add_argument('--tasks', nargs='+', required=True, help='Meta-World tasks (e.g. push-v3)')
    p.add_argument('--episodes', type=int, default=1, help='episodes per task (layouts 0..N-1)')
    p.add_argument('--seed', type=int, default=1, help='layout seed: MT1(task, seed) (default 1)')
    p.add_argument('--max-steps', type=int, default=MAX_STEPS)
    p.add_argument('--real-time-factor', type=float, default=1.0, help='sim seconds per wall second')
    p.add_argument('--gap-s', type=float, default=0.25, help='sim seconds with no instruction between episodes')
    p.add_argument('--wait-timeout', type=float, default=120.0, help='seconds to wait for the policy node')
    p.add_argument('--out', required=True, help='write the per-episode results here (JSON)')
    p.add_argument('--frames', default=None, help='write the first episode frames of each task here (npz)')
    args = p.parse_args(argv[:len(argv) - len(ros_args)])
    tasks = resolve_suite('mt10', args.tasks)
    rclpy.init(args=['blockvla_sim_bridge', *ros_args])
    bridge = SimBridge(ACTION_NAMES, STATE_NAMES)
    executor = SingleThreadedExecutor()
    executor.add_node(bridge)
    spinner = threading.Thread(target=_spin, args=(executor,), daemon=True)
    spinner.start()
    try:
        result = run(bridge, tasks, args.episodes, args.seed, args.max_steps, args.real_time_factor, args.gap_s,
                     args.wait_timeout, args.frames)
        tmp = f'{args.out}.tmp'
        with open(tmp, 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        executor.shutdown()
        bridge.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


def _spin(executor) -> None:
    try:
        executor.spin()
    except (ExternalShutdownException, KeyboardInterrupt):
        pass


if __name__ == '__main__':
    sys.exit(main())
