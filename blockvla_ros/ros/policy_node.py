"""blockvla_policy: the lifecycle node that runs a BlockVLA policy at a fixed control rate.

    camera (Image | CompressedImage), instruction (String), joint_states (if the policy has a state)
        -> callbacks convert + validate -> InputStore (latest of each)
    control thread, every 1/control_rate_hz s (not on the executor):
        pop ActionQueue -> publish action (JointState) + action_chunk (JointTrajectory), or a hold
        queue below threshold -> hand a snapshot to the inference worker
    inference worker thread: PolicyRunner.predict(known_actions = RTC prefix) -> clamp -> ActionQueue.push_chunk
configure = load + verify + warm up; activate = start the control thread; deactivate = stop and publish a hold.
Stale camera, no instruction or no plan -> hold (repeat the last action with zero velocity) and say why in
/diagnostics. Setting ``policy`` validates in the set-callback and swaps in the background between chunks.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from ..io.images import message_to_rgb8
from ..runtime.action_queue import ActionQueue, DelayEstimator
from . import params as P
from .control_loop import ControlLoop
from .diagnostics import collect
from .inference_worker import InferenceWorker
from .inputs import InputStore, Observation
from .messages import diagnostic_array, joint_command, stamp_seconds, trajectory
from .policy_manager import PolicyManager
from .policy_params import PolicyParameters
from .stats import RollingWindow, TickMonitor

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


class PolicyNode(PolicyParameters, LifecycleNode):
    """The ``blockvla_policy`` lifecycle node (parameters: see params.py)."""

    def __init__(self, node_name: str = 'blockvla_policy', **kwargs):
        super().__init__(node_name, **kwargs)
        P.declare(self)
        self.lifecycle_state = 'unconfigured'
        self.params: Optional[P.NodeParams] = None
        self.policies: Optional[PolicyManager] = None
        self.queue: Optional[ActionQueue] = None
        self.inputs: Optional[InputStore] = None
        self.ticks: Optional[TickMonitor] = None
        self._worker: Optional[InferenceWorker] = None
        self._loop: Optional[ControlLoop] = None
        self._subs, self._action_pub, self._chunk_pub = [], None, None
        self.delay = DelayEstimator(window=10)
        self.inference_s, self.e2e_s = RollingWindow(2000), RollingWindow(2000)
        self.inference_errors, self.last_inference_error, self.last_error = 0, '', ''
        self.clipped_values, self.known_last, self.nfe_last, self.qos_incompatible = 0, 0, None, 0
        self.hold_reason: Optional[str] = 'unconfigured'
        self._hold_position: Optional[np.ndarray] = None
        self._action_names: list = []
        self._last_chunk_id, self._chunks_at_hold = 0, 0
        self._retry_at, self._retry_backoff = 0.0, 0.2
        self._revert_policy: Optional[str] = None
        self._running_policy_param: Optional[str] = None
        self._live_from(P.read(self))
        self._revert_guard = self.create_guard_condition(self._apply_revert)
        self._set_cb = self.add_on_set_parameters_callback(self._on_set_parameters)
        self._post_cb = self.add_post_set_parameters_callback(self._after_set_parameters)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        period = self.get_parameter('diagnostics_period_s').value
        self._diag_timer = self.create_timer(period, self.publish_diagnostics)

    # --- helpers ----------------------------------------------------------------------------------------------
    def now_seconds(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _live_from(self, p: P.NodeParams) -> None:
        self.max_image_age_s = float(p['max_image_age_s'])
        self._chunk_threshold = float(p['chunk_threshold'])
        self._rtc = bool(p['real_time_chunking'])

    def _fail(self, what: str, error: Exception) -> None:
        self.last_error = f'{what}: {type(error).__name__}: {error}'
        self.get_logger().error(self.last_error)

    # --- lifecycle --------------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            p = self.params = P.read(self)
            self._live_from(p)
            self.last_error = ''
            self.policies = PolicyManager(
                p.policy_dirs_resolved, p['engine'], decoder=p['decoding.decoder'], overrides=p.decoding_overrides,
                require_gpu=p['require_gpu'], threads=p['threads'], warmup_runs=p['warmup_runs'],
                on_swap_done=self._on_swap_done)
            self.get_logger().info(f"configuring: policy {p['policy']!r} from {p.policy_dirs_resolved} "
                                   f"on {p['engine']}")
            runner = self.policies.load(p['policy'])
            cfg = runner.config
            self._running_policy_param = p['policy']
            self._action_names = list(runner.action_names)
            self.dt = 1.0 / p['control_rate_hz']
            self.queue = ActionQueue(self.dt, cfg.action_dim)
            self.inputs = InputStore(p['max_instruction_chars'], cfg.state_dim, cfg.state_names)
            self.ticks = TickMonitor(self.dt, window=5000)
            self._worker = InferenceWorker(self._on_inference_error)
            self._create_io(p, cfg.state_dim)
        except Exception as e:  # load/verify failures: stay unconfigured and say why
            self._fail('configure failed', e)
            self._teardown()
            return FAILURE
        self.lifecycle_state, self.hold_reason = 'inactive', 'inactive'
        self.get_logger().info(f'configured: {runner.name} (H={cfg.chunk_len}, D={cfg.action_dim}) at '
                               f"{p['control_rate_hz']:g} Hz; camera {p['camera_topic']}")
        return SUCCESS

    def _create_io(self, p: P.NodeParams, state_dim: int) -> None:
        def events(topic):
            return SubscriptionEventCallbacks(incompatible_qos=lambda event: self._on_incompatible_qos(topic, event))

        image_type = CompressedImage if p.compressed else Image
        self._camera_topic = p['camera_topic']
        self._max_pixels = int(p['max_image_pixels'])
        self._subs = [
            self.create_subscription(image_type, p['camera_topic'], self._on_image,
                                     P.image_qos(p['image_qos'], p['image_qos_depth']),
                                     event_callbacks=events(p['camera_topic'])),
            self.create_subscription(String, p['instruction_topic'], self._on_instruction,
                                     P.instruction_qos(p['instruction_qos']),
                                     event_callbacks=events(p['instruction_topic'])),
        ]
        if state_dim:
            self._subs.append(self.create_subscription(JointState, p['joint_states_topic'], self._on_joint_state,
                                                       P.image_qos('sensor_data', 1)))
        self._action_pub = self.create_lifecycle_publisher(JointState, p['action_topic'], P.output_qos())
        self._chunk_pub = self.create_lifecycle_publisher(JointTrajectory, p['action_chunk_topic'], P.output_qos())

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # activates the lifecycle publishers
        self.queue.reset()
        self.ticks = TickMonitor(self.dt, window=5000)
        self._last_chunk_id, self._retry_at, self._chunks_at_hold = 0, 0.0, self.queue.stats.chunks_pushed
        self._loop = ControlLoop(self.get_clock(), self.dt, self._tick, self._on_tick_error,
                                 priority=self.params['control_thread_priority'])
        self._loop.start()
        self.lifecycle_state, self.hold_reason = 'active', 'starting'
        self.get_logger().info(f'active: ticking at {1.0 / self.dt:g} Hz')
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        self.queue.clear()
        self._publish_hold(self.get_clock().now().nanoseconds, 'deactivated')
        self.lifecycle_state = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.lifecycle_state = 'finalized'
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return SUCCESS

    def _teardown(self) -> None:
        """Stop threads and drop everything configure created (safe to call twice)."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        if self._worker is not None:
            self._worker.stop(timeout=10.0)
            self._worker = None
        if self.policies is not None:
            self.policies.close()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        for pub in (self._action_pub, self._chunk_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._action_pub = self._chunk_pub = None
        self.policies = self.queue = self.inputs = None
        self._hold_position = None
        self.lifecycle_state, self.hold_reason = 'unconfigured', 'unconfigured'

    def shutdown(self) -> None:
        """Stop the threads (main() calls this before destroy_node)."""
        self._teardown()

    # --- subscriptions (executor thread: convert, validate, store; never raise) ---------------------------------
    def _on_image(self, msg) -> None:
        inputs = self.inputs
        if inputs is None:
            return
        received = self.now_seconds()
        try:
            rgb = message_to_rgb8(msg, max_pixels=self._max_pixels)
        except Exception as e:  # ImageConversionError, or anything a malformed message triggers
            inputs.reject_image(f'{self._camera_topic}: {e}')
            self.get_logger().warning(f'image refused on {self._camera_topic}: {e}', throttle_duration_sec=5.0)
            return
        inputs.set_image(rgb, stamp_seconds(msg.header.stamp), received)

    def _on_instruction(self, msg: String) -> None:
        if self.inputs is None:
            return
        try:
            reason = self.inputs.set_instruction(msg.data)
        except Exception as e:
            reason = f'{type(e).__name__}: {e}'
        if reason:
            self.get_logger().warning(f'instruction: {reason}')
        else:
            self._retry_at, self._retry_backoff = 0.0, 0.2  # new input: retry a failing inference at once
            self.get_logger().info(f'instruction: {self.inputs.instruction[:120]!r}')

    def _on_joint_state(self, msg: JointState) -> None:
        if self.inputs is None:
            return
        try:
            reason = self.inputs.set_joint_state(msg.name, msg.position)
        except Exception as e:
            reason = f'{type(e).__name__}: {e}'
        if reason:
            self.get_logger().warning(f'joint state refused: {reason}', throttle_duration_sec=5.0)

    def _on_incompatible_qos(self, topic: str, event) -> None:
        self.qos_incompatible += 1
        self.last_error = (f'incompatible QoS on {topic} (policy id {event.last_policy_kind}): a publisher '
                           'offers what this subscription cannot match; see the *_qos parameters')
        self.get_logger().error(self.last_error, throttle_duration_sec=5.0)

    # --- control tick (control thread) --------------------------------------------------------------------------
    def _tick(self, now_ns: int) -> None:
        now = now_ns * 1e-9
        self.ticks.tick(now)
        reason = self.inputs.hold_reason(now, self.max_image_age_s)
        if reason:
            self.queue.clear()
            self._chunks_at_hold = self.queue.stats.chunks_pushed
            self._publish_hold(now_ns, reason)
            return
        action = self.queue.pop(now)
        if action is None:
            self._request(now)
            self._publish_hold(now_ns, self._dry_reason(now))
            return
        if action.chunk_id != self._last_chunk_id:
            self._last_chunk_id = action.chunk_id
            self.e2e_s.add(now - action.obs_stamp)  # image stamp -> first action computed from it
        rows = [action.action] + [a.action for a in self.queue.remaining()]
        self._action_pub.publish(joint_command(self._action_names, action.action, now_ns))
        self._chunk_pub.publish(trajectory(self._action_names, np.stack(rows), now_ns, self.dt))  # [n, D]
        if self.hold_reason is not None:
            self.get_logger().info(f'executing {self.policies.current.name} (was holding: {self.hold_reason})')
        self._hold_position, self.hold_reason = action.action, None
        self._request(now)

    def _dry_reason(self, now: float) -> str:
        if self.last_inference_error and self._retry_at > 0:
            return f'no plan: inference failed: {self.last_inference_error}'
        if self.queue.stats.chunks_pushed == self._chunks_at_hold:
            return 'waiting for the first chunk' + (' after the hold' if self._chunks_at_hold else '')
        age = self.inputs.image_age(now) or 0.0
        span = self.policies.current.config.chunk_len * self.dt
        if age > span / 2:  # chunks start at the image stamp: an old image leaves little of its chunk
            return (f'queue ran dry: the newest image is {age * 1e3:.0f} ms old, most of its '
                    f'{span * 1e3:.0f} ms chunk is over before it is computed (slow camera or refused images)')
        latency = (self.inference_s.last or 0.0) * 1e3
        return (f'queue ran dry: no planned action for this tick (last inference {latency:.0f} ms, '
                f'newest image {age * 1e3:.0f} ms old)')

    def _publish_hold(self, now_ns: int, reason: str) -> None:
        kind = reason.split(':', 1)[0]
        if self.hold_reason is None or kind != self.hold_reason.split(':', 1)[0]:  # log changes, not every tick
            self.get_logger().info(f'holding: {reason}')
        self.hold_reason = reason
        position = self._hold_position
        if position is None or self._action_pub is None:
            return  # nothing was commanded yet: there is no position to hold
        self._action_pub.publish(joint_command(self._action_names, position, now_ns, hold=True))
        self._chunk_pub.publish(trajectory(self._action_names, position[None], now_ns, self.dt, hold=True))

    def _request(self, now: float) -> None:
        """Start an inference when the queue is low, none is running and the retry back-off has passed."""
        runner = self.policies.current
        horizon = runner.config.chunk_len
        threshold = max(math.ceil(self._chunk_threshold * horizon), min(horizon, self.delay.ticks(self.dt) + 1))
        if self.queue.depth() > threshold or now < self._retry_at or self._worker.busy:
            return
        obs = self.inputs.snapshot()
        if obs is None or now - obs.stamp >= horizon * self.dt:
            return  # its whole chunk is already over: wait for a newer image
        self._worker.submit(lambda: self._infer(obs))

    def _on_tick_error(self, error: Exception) -> None:
        if not self.context.ok():  # Ctrl-C shut the context down under a running tick: nothing to report
            return
        self._fail('control tick', error)

    # --- inference (worker thread) ------------------------------------------------------------------------------
    def _infer(self, obs: Observation) -> None:
        runner = self.policies.take_pending()  # a loaded replacement takes over between chunks
        asked = self.now_seconds()
        max_known = runner.config.chunk_len - 1 if self._rtc else 0
        plan = self.queue.plan_request(obs.stamp, asked, self.delay.expected(), max_known)
        start = time.perf_counter()
        pred = runner.predict(obs.image, obs.instruction, state=obs.state,
                              known_actions=plan.known if len(plan.known) else None)
        self.inference_s.add(time.perf_counter() - start)
        k = len(plan.known)
        actions = np.array(pred.actions, dtype=np.float32)  # [H, D]
        clipped = actions.copy()
        clipped[:k] = plan.known  # exactly what was planned (and clamped by the policy that planned it)
        clipped[k:] = np.clip(actions[k:], runner.action_low, runner.action_high)
        self.clipped_values += int(np.count_nonzero(clipped[k:] != actions[k:]))
        arrived = self.now_seconds()
        self.delay.add(arrived - asked)
        result = self.queue.push_chunk(clipped, obs.stamp, arrived)
        self.known_last, self.nfe_last = k, getattr(pred, 'nfe', None)
        self._retry_at, self._retry_backoff = 0.0, 0.2
        if not result.accepted:
            self.get_logger().warning(f'chunk dropped: {result.reason}', throttle_duration_sec=5.0)

    def _on_inference_error(self, error: Exception) -> None:
        self.inference_errors += 1
        self.last_inference_error = f'{type(error).__name__}: {error}'
        self._retry_at = self.now_seconds() + self._retry_backoff  # back off instead of failing every tick
        self._retry_backoff = min(self._retry_backoff * 2, 2.0)
        self.get_logger().error(f'inference failed: {self.last_inference_error}', throttle_duration_sec=5.0)

    # --- diagnostics (executor thread) --------------------------------------------------------------------------
    def publish_diagnostics(self) -> None:
        try:
            level, message, values = collect(self)
        except Exception as e:  # never let a reporting bug stop the node
            level, message, values = 'error', f'diagnostics failed: {type(e).__name__}: {e}', {}
        hardware_id = self.get_parameter('hardware_id').value or self.get_fully_qualified_name()
        self._diag_pub.publish(diagnostic_array(self.get_clock().now().nanoseconds,
                                                f'{self.get_name()}: policy', hardware_id, level, message, values))


class _RosLogHandler(logging.Handler):
    """Forwards the library's Python logging (loading, swaps, engine builds) to the node's ROS logger."""

    def __init__(self, logger):
        super().__init__(logging.INFO)
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        text = f'[{record.name}] {record.getMessage()}'
        if record.levelno >= logging.ERROR:
            self._logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(text)
        else:
            self._logger.info(text)


def main(args=None) -> None:
    """``ros2 run blockvla_ros policy_node [--ros-args ...]``; Ctrl-C shuts down cleanly."""
    rclpy.init(args=args)
    node = PolicyNode()
    handler = _RosLogHandler(node.get_logger())
    package_log = logging.getLogger('blockvla_ros')
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    # One executor thread. rclpy's MultiThreadedExecutor re-polls its wait set in a tight Python loop while a ready
    # callback waits for a busy callback group, holding the GIL: measured here, it starved the control thread (up
    # to 500 ms late ticks, 100+ missed in 20 s at 50 Hz) and doubled inference p99. The price: a parameter
    # callback that hashes a swapped-in policy's files (~1 s per GB) pauses image intake meanwhile; the control
    # thread and inference keep running.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if node.get_parameter('autostart').value and node.trigger_configure() == SUCCESS:
            node.trigger_activate()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        package_log.removeHandler(handler)
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
