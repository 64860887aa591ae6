"""blockvla_policy: the lifecycle node that runs a BlockVLA policy at a fixed control rate.

    camera (Image | CompressedImage), instruction (String), joint_states (if the policy has a state)
        -> callbacks convert + validate -> InputStore (latest of each)
    control thread, every 1/control_rate_hz s (not on the executor):
        pop ActionQueue -> publish action (JointState) + action_chunk (JointTrajectory of the absolute targets
        mapped to joints), or a true hold (0 for delta dimensions, the last target for absolute ones)
        queue below threshold -> hand a snapshot to the inference worker
    inference worker thread: request_chunk (PolicyRunner.predict; with real_time_chunking, off by default, the old
        plan's actions for the ticks up to the chunk's arrival as known actions) -> postprocess_chunk (the robot's
        action limits) -> ActionQueue.push_chunk
configure = load + verify + warm up; activate = start the control thread; deactivate = stop and publish a hold (so
do shutdown, Ctrl-C and SIGTERM while active).
The control rate defaults to the policy's trained rate. Stale camera, no instruction, no joint state or no plan ->
hold and say why in /diagnostics. Setting ``policy`` validates in the set-callback and swaps in the background
between chunks; every other parameter except the live knobs is read-only after start-up.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from typing import Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.duration import Duration
from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from ..io.images import message_to_rgb8
from ..runtime.action_output import ActionLimits, TrajectoryMap, hold_action, postprocess_chunk
from ..runtime.action_queue import ActionQueue, DelayEstimator
from ..runtime.chunk_request import request_chunk
from . import params as P
from .control_loop import ControlLoop
from .diagnostics import Sources, collect
from .inference_worker import InferenceWorker
from .inputs import InputStore, Observation
from .messages import diagnostic_array, joint_command, stamp_seconds, trajectory
from .node_status import NodeStatus
from .policy_manager import PolicyManager
from .policy_params import PolicyParameters
from .stats import RollingWindow, TickMonitor

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
RTC_WARNING = ('real_time_chunking is on: each new chunk is decoded as the continuation of the previous chunk\'s '
               'actions for the ticks that pass while it is computed. A policy trained on demonstrations takes that '
               'stale plan for its own choice and can keep following it instead of the camera (README, "Real-time '
               'chunking": the shipped metaworld_mt10 policy solves fewer episodes with it); keep it on only for a '
               'policy evaluated with it')


def control_rate(param_hz: float, policy_hz: Optional[float], policy: str) -> tuple[float, str]:
    """(rate to tick at, warning or ''): the policy's trained rate unless ``param_hz`` (> 0) says otherwise."""
    if param_hz and param_hz > 0:
        if policy_hz and abs(param_hz - policy_hz) > 1e-9 * policy_hz:
            return float(param_hz), (f'control_rate_hz {param_hz:g} differs from the {policy_hz:g} Hz policy '
                                     f'{policy!r} was trained at: its delta actions move {param_hz / policy_hz:.2g}x '
                                     'as fast as in training (set control_rate_hz 0 to use the policy\'s rate)')
        return float(param_hz), ''
    if not policy_hz:
        raise ValueError(f'policy {policy!r} does not say the rate it was trained at (no config.control_rate_hz in '
                         'its policy.yaml): set control_rate_hz')
    return float(policy_hz), ''


class PolicyNode(PolicyParameters, LifecycleNode):
    """The ``blockvla_policy`` lifecycle node (parameters: see params.py)."""

    def __init__(self, node_name: str = 'blockvla_policy', **kwargs):
        super().__init__(node_name, **kwargs)
        P.declare(self)
        self.status = NodeStatus()
        self.params: Optional[P.NodeParams] = None
        self.policies: Optional[PolicyManager] = None
        self.queue: Optional[ActionQueue] = None
        self.inputs: Optional[InputStore] = None
        self.ticks: Optional[TickMonitor] = None
        self.dt = None
        self._worker: Optional[InferenceWorker] = None
        self._loop: Optional[ControlLoop] = None
        self._subs, self._action_pub, self._chunk_pub = [], None, None
        self.delay = DelayEstimator(window=10)
        self.inference_s, self.e2e_s = RollingWindow(2000), RollingWindow(2000)
        self._action_names: list = []
        self._kinds: list = []
        self._limits: Optional[ActionLimits] = None
        self._trajectory: Optional[TrajectoryMap] = None
        self._last_action: Optional[np.ndarray] = None  # control thread: the last action commanded [D]
        self._last_chunk_id, self._chunks_at_hold = 0, 0
        self._chunk_instruction: Optional[str] = None  # worker thread: the instruction of the last chunk pushed
        self._rtc = False  # live knob real_time_chunking (read once per inference by the worker)
        self._apply_live(P.live_values(self))
        self._revert_guard = self.create_guard_condition(self._apply_revert)
        self._set_cb = self.add_on_set_parameters_callback(self._on_set_parameters)
        self._post_cb = self.add_post_set_parameters_callback(self._after_set_parameters)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        period = self.get_parameter('diagnostics_period_s').value
        self._diag_timer = self.create_timer(period, self.publish_diagnostics)

    # --- helpers ----------------------------------------------------------------------------------------------
    def now_seconds(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    @property
    def lifecycle_state(self) -> str:
        return self.status.get('lifecycle_state')

    def _apply_live(self, live: dict) -> None:
        self.max_image_age_s = float(live['max_image_age_s'])
        self.max_joint_state_age_s = float(live['max_joint_state_age_s'])
        self._chunk_threshold = float(live['chunk_threshold'])
        rtc = bool(live['real_time_chunking'])
        if rtc and not self._rtc:
            self.get_logger().warning(RTC_WARNING)
        self._rtc = rtc

    def _engine_options(self, p) -> Optional[dict]:
        """Options of runtime.engine_factory.create_engine the parameters carry (torch_dtype: engine torch only)."""
        if p['engine'] == 'torch':
            return {'dtype': p['torch_dtype']}
        if p['torch_dtype'] != 'float32':
            self.get_logger().warning(f"torch_dtype {p['torch_dtype']!r} is ignored: it applies to engine 'torch' "
                                      f"only, and engine {p['engine']!r} runs the precision the policy was exported at")
        return None

    def _fail(self, what: str, error: Exception) -> None:
        message = f'{what}: {type(error).__name__}: {error}'
        self.status.set(last_error=message)
        self.get_logger().error(message)

    # --- lifecycle --------------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            p = self.params = P.read(self)
            self._apply_live(P.live_values(self))
            self.status.set(last_error='', rate_warning='')
            self.policies = PolicyManager(
                p.policy_dirs_resolved, p['engine'], decoder=p['decoding.decoder'], overrides=p.decoding_overrides,
                require_gpu=p['require_gpu'], threads=p['threads'], engine_options=self._engine_options(p),
                warmup_runs=p['warmup_runs'], on_swap_done=self._on_swap_done)
            self.get_logger().info(f"configuring: policy {p['policy']!r} from {p.policy_dirs_resolved} "
                                   f"on {p['engine']}")
            runner = self.policies.load(p['policy'])
            self._set_action_space(p, runner)
            cfg = runner.config
            self.queue = ActionQueue(self.dt, cfg.action_dim)
            self.inputs = InputStore(p['max_instruction_chars'], cfg.state_dim, cfg.state_names)
            self.ticks = TickMonitor(self.dt, window=5000)
            self._worker = InferenceWorker(self._on_inference_error)
            self._create_io(p, cfg.state_dim)
        except Exception as e:  # load/verify failures: stay unconfigured and say why
            self._fail('configure failed', e)
            self._teardown()
            return FAILURE
        self.status.set(lifecycle_state='inactive', hold_reason='inactive')
        self.get_logger().info(f'configured: {runner.name} (H={cfg.chunk_len}, D={cfg.action_dim}, kinds '
                               f'{self._kinds}) at {1.0 / self.dt:g} Hz; camera {p["camera_topic"]}')
        return SUCCESS

    def _set_action_space(self, p: P.NodeParams, runner) -> None:
        """Rate, action kinds, limits and the trajectory mapping of the loaded policy (ValueError if they clash)."""
        cfg = runner.config
        rate, warning = control_rate(p['control_rate_hz'], cfg.control_rate_hz, runner.name)
        if warning:
            self.get_logger().warning(warning)
        self.dt = 1.0 / rate
        self._action_names, self._kinds = list(runner.action_names), list(cfg.kinds)
        self._limits = ActionLimits.parse(p['action_limits.lower'], p['action_limits.upper'], self._action_names)
        self._trajectory = TrajectoryMap.build(self._action_names, self._kinds, p['trajectory_joints'])
        if not self._trajectory.enabled:
            self.get_logger().warning(f'{p["action_chunk_topic"]} is not published: {self._trajectory.off_reason}')
        extra = {'action_kinds': ', '.join(f'{n}: {k}' for n, k in zip(self._action_names, self._kinds)),
                 'action_limits': self._limits.describe(self._action_names) if self._limits else 'none',
                 'trajectory_joints': (', '.join(f'{self._action_names[i]}={j}' for i, j in
                                                 zip(self._trajectory.indices, self._trajectory.joint_names))
                                       or f'off: {self._trajectory.off_reason}'),
                 'policy_control_rate_hz': cfg.control_rate_hz}
        self.status.set(rate_warning=warning, extra=extra)

    def _create_io(self, p: P.NodeParams, state_dim: int) -> None:
        def events(topic):
            return SubscriptionEventCallbacks(incompatible_qos=lambda event: self._on_incompatible_qos(topic, event))

        def output_events(topic):  # a consumer (a controller) that requests more than the outputs offer gets nothing
            return PublisherEventCallbacks(incompatible_qos=lambda event: self._on_incompatible_qos(topic, event,
                                                                                                    output=True))

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
        self._action_pub = self.create_lifecycle_publisher(JointState, p['action_topic'], P.output_qos(),
                                                           event_callbacks=output_events(p['action_topic']))
        if self._trajectory.enabled:
            self._chunk_pub = self.create_lifecycle_publisher(JointTrajectory, p['action_chunk_topic'],
                                                              P.output_qos(),
                                                              event_callbacks=output_events(p['action_chunk_topic']))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            result = super().on_activate(state)  # activates the lifecycle publishers
            self.queue.reset()
            self.ticks = TickMonitor(self.dt, window=5000)
            self._last_chunk_id, self._chunks_at_hold = 0, self.queue.stats.chunks_pushed
            self._chunk_instruction = None
            self._last_action = None  # no target to hold until this activation commands one (the robot may have
            #                           been moved while the node was inactive)
            self.status.retry_now()
            self._loop = ControlLoop(self.get_clock(), self.dt, self._tick, self._on_tick_error,
                                     priority=self.params['control_thread_priority'])
            self._loop.start()
        except Exception as e:
            self._fail('activate failed', e)
            return FAILURE
        self.status.set(lifecycle_state='active', hold_reason='starting')
        self.get_logger().info(f'active: ticking at {1.0 / self.dt:g} Hz')
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._stop_ticking('deactivated')
        except Exception as e:
            self._fail('deactivate', e)
        self.status.set(lifecycle_state='inactive')
        return super().on_deactivate(state)

    def _stop_ticking(self, reason: str, wait_s: float = 0.0) -> None:
        """Stop the control thread; if it was running, drop the plan and publish a final hold (on action and
        action_chunk: a trajectory controller stops instead of running out the last plan). ``wait_s``: how long to
        wait for reliable subscribers to acknowledge it (when the node goes away right after)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.stop()
        if self.queue is not None:
            self.queue.clear()
        if not self.context.ok():
            return
        self._publish_hold(self.get_clock().now().nanoseconds, reason)
        for pub in (self._action_pub, self._chunk_pub):
            if pub is not None and wait_s > 0:
                pub.wait_for_all_acked(Duration(seconds=wait_s))

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        self.status.set(lifecycle_state='finalized')
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return SUCCESS

    def _teardown(self) -> None:
        """Stop threads and drop everything configure created (safe to call twice, never raises)."""
        try:
            self._stop_ticking('shutting down', wait_s=0.5)  # shutdown or Ctrl-C straight from active
        except Exception as e:
            self._fail('final hold', e)
        try:
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
        except Exception as e:
            self._fail('teardown', e)
        self._action_pub = self._chunk_pub = None
        self.policies = self.queue = self.inputs = None
        self._last_action = None
        self.status.set(lifecycle_state='unconfigured', hold_reason='unconfigured')

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
        try:
            inputs.set_image(rgb, stamp_seconds(msg.header.stamp), received)
        except Exception as e:
            inputs.reject_image(f'{self._camera_topic}: {type(e).__name__}: {e}')

    def _on_instruction(self, msg: String) -> None:
        inputs = self.inputs
        if inputs is None:
            return
        try:
            reason = inputs.set_instruction(msg.data)
        except Exception as e:
            reason = f'{type(e).__name__}: {e}'
        if reason:
            self.get_logger().warning(f'instruction: {reason}')
        else:
            self.status.retry_now()  # new input: retry a failing inference at once
            self.get_logger().info(f'instruction: {(inputs.instruction or "")[:120]!r}')

    def _on_joint_state(self, msg: JointState) -> None:
        inputs = self.inputs
        if inputs is None:
            return
        try:
            reason = inputs.set_joint_state(msg.name, msg.position, self.now_seconds())
        except Exception as e:
            reason = f'{type(e).__name__}: {e}'
        if reason:
            self.get_logger().warning(f'joint state refused: {reason}', throttle_duration_sec=5.0)

    def _on_incompatible_qos(self, topic: str, event, output: bool = False) -> None:
        self.status.add('qos_incompatible')
        if output:
            message = (f'incompatible QoS on {topic} (policy id {event.last_policy_kind}): a subscriber requests '
                       'more than this output offers (reliable, volatile, keep last 10), so it receives nothing')
        else:
            message = (f'incompatible QoS on {topic} (policy id {event.last_policy_kind}): a publisher '
                       'offers what this subscription cannot match; see the *_qos parameters')
        self.status.set(last_error=message)
        self.get_logger().error(message, throttle_duration_sec=5.0)

    # --- control tick (control thread) --------------------------------------------------------------------------
    def _tick(self, now_ns: int) -> None:
        now = now_ns * 1e-9
        self.ticks.tick(now)
        reason = self.inputs.hold_reason(now, self.max_image_age_s, self.max_joint_state_age_s)
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
        self._action_pub.publish(joint_command(self._action_names, action.action, now_ns))
        if self._chunk_pub is not None:
            rows = np.stack([action.action] + [a.action for a in self.queue.remaining()])  # [n, D]
            cols = list(self._trajectory.indices)
            self._chunk_pub.publish(trajectory(self._trajectory.joint_names, rows[:, cols], now_ns, self.dt))
        previous = self.status.change_hold(None)
        if previous is not None:
            self.get_logger().info(f'executing {self.policies.current_name} (was holding: {previous})')
        self._last_action = action.action
        self._request(now)

    def _dry_reason(self, now: float) -> str:
        runner = self.policies.current
        horizon = runner.config.chunk_len
        span, rate = horizon * self.dt, 1.0 / self.dt
        latency = self.delay.expected()  # on the node clock, as the chunk's span (not the wall-time latency)
        trained = runner.config.control_rate_hz
        lower = f'lower control_rate_hz (the policy was trained at {trained:g} Hz)' if trained else \
            'lower control_rate_hz'
        if latency >= span:
            return (f'chunk shorter than an inference: {horizon} actions last {span * 1e3:.0f} ms at {rate:g} Hz but '
                    f'an inference takes {latency * 1e3:.0f} ms, so every chunk is over before it arrives; {lower}')
        if self.status.failing():
            return f'no plan: inference failed: {self.status.get("last_inference_error")}'
        age = self.inputs.image_age(now) or 0.0
        if self.queue.stats.chunks_pushed == self._chunks_at_hold:
            if age >= span:
                return (f'waiting for the first chunk: the newest image is {age * 1e3:.0f} ms old, longer than the '
                        f'{span * 1e3:.0f} ms a {horizon}-action chunk lasts at {rate:g} Hz; {lower}')
            return 'waiting for the first chunk' + (' after the hold' if self._chunks_at_hold else '')
        if age > span / 2:  # chunks start at the image stamp: an old image leaves little of its chunk
            return (f'queue ran dry: the newest image is {age * 1e3:.0f} ms old, most of its '
                    f'{span * 1e3:.0f} ms chunk is over before it is computed (slow camera or refused images)')
        return (f'queue ran dry: no planned action for this tick (expected inference delay {latency * 1e3:.0f} ms, '
                f'newest image {age * 1e3:.0f} ms old)')

    def _publish_hold(self, now_ns: int, reason: str) -> None:
        """A true hold: 0 for delta dimensions, the last target for absolute ones (nothing before the first
        action of this activation unless every dimension is a delta)."""
        previous = self.status.change_hold(reason)
        if previous is None or reason.split(':', 1)[0] != previous.split(':', 1)[0]:  # log changes only
            self.get_logger().info(f'holding: {reason}')
        if self._action_pub is None or not self._kinds:
            return
        last = self._last_action
        if last is None:
            if any(k != 'delta' for k in self._kinds):
                return  # nothing was commanded yet: there is no target to hold
            last = np.zeros(len(self._kinds), np.float32)
        position = hold_action(last, self._kinds)
        self._action_pub.publish(joint_command(self._action_names, position, now_ns, hold=True))
        if self._chunk_pub is not None:
            cols = list(self._trajectory.indices)
            self._chunk_pub.publish(trajectory(self._trajectory.joint_names, position[None, cols], now_ns, self.dt,
                                               hold=True))

    def _request(self, now: float) -> None:
        """Start an inference when the queue is low, none is running and the retry back-off has passed."""
        runner = self.policies.current
        horizon = runner.config.chunk_len
        threshold = max(math.ceil(self._chunk_threshold * horizon), min(horizon, self.delay.ticks(self.dt) + 1))
        if self.queue.depth() > threshold or not self.status.may_infer(now) or self._worker.busy:
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
        runner = self.policies.current  # read once per chunk: a swap takes effect between chunks
        fresh = obs.instruction != self._chunk_instruction  # a new task: do not continue the old task's chunk
        max_known = runner.config.chunk_len - 1 if self._rtc and not fresh else 0
        asked = self.now_seconds()  # node clock (sim time under use_sim_time), as the ticks and the queue
        start = time.perf_counter()
        chunk = request_chunk(runner, self.queue, obs.image, obs.instruction, obs.state, obs.stamp, asked,
                              self.delay.expected(), max_known)
        self.inference_s.add(time.perf_counter() - start)  # wall time: the inference latency diagnostics report
        k, pred = chunk.known, chunk.prediction
        actions, clipped = postprocess_chunk(chunk.actions, k, self._limits)
        arrived = self.now_seconds()
        self.delay.add(arrived - asked)
        if self.inputs is None or self.inputs.instruction != obs.instruction:
            self.status.add('stale_chunks_dropped')  # the task changed while this chunk was computed
            return
        result = self.queue.push_chunk(actions, obs.stamp, arrived)
        if result.accepted and fresh and self._chunk_instruction is not None:
            self.status.add('fresh_chunks')
        if result.accepted:
            self._chunk_instruction = obs.instruction
        self.status.add('clipped_values', clipped)
        self.status.set(known_last=k, nfe_last=getattr(pred, 'nfe', None))
        self.status.retry_now()
        if not result.accepted:
            self.get_logger().warning(f'chunk dropped: {result.reason}', throttle_duration_sec=5.0)

    def _on_inference_error(self, error: Exception) -> None:
        message = f'{type(error).__name__}: {error}'
        self.status.inference_failed(self.now_seconds(), message)  # back off instead of failing every tick
        self.get_logger().error(f'inference failed: {message}', throttle_duration_sec=5.0)

    # --- diagnostics (executor thread) --------------------------------------------------------------------------
    def diagnostics_sources(self) -> Sources:
        loop, p = self._loop, self.params
        return Sources(status=self.status.snapshot(), now=self.now_seconds(), engine=p['engine'] if p else '',
                       control_rate_hz=1.0 / self.dt if self.dt and self.policies else None,
                       max_image_age_s=self.max_image_age_s, policies=self.policies, queue=self.queue,
                       inputs=self.inputs, ticks=self.ticks, priority_error=loop.priority_error if loop else '',
                       inference_s=self.inference_s, e2e_s=self.e2e_s, delay=self.delay,
                       real_time_chunking=self._rtc)

    def publish_diagnostics(self) -> None:
        try:
            level, message, values = collect(self.diagnostics_sources())
        except Exception as e:  # never let a reporting bug stop the node
            level, message, values = 'error', f'diagnostics failed: {type(e).__name__}: {e}', {}
        try:
            hardware_id = self.get_parameter('hardware_id').value or self.get_fully_qualified_name()
            self._diag_pub.publish(diagnostic_array(self.get_clock().now().nanoseconds,
                                                    f'{self.get_name()}: policy', hardware_id, level, message,
                                                    values))
        except Exception as e:
            self.status.add('callback_errors')
            self.get_logger().error(f'publishing diagnostics failed: {e}', throttle_duration_sec=5.0)


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


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(args=None) -> None:
    """``ros2 run blockvla_ros policy_node [--ros-args ...]``; Ctrl-C and SIGTERM shut down cleanly, ending with a
    hold when the node was acting."""
    # rclpy's own SIGINT/SIGTERM handlers shut the context down inside the handler, before the node could publish
    # its final hold (the last action_chunk would run out on the robot): here both signals only interrupt the spin,
    # and the context goes after the node's shutdown.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        node = PolicyNode()
    except Exception as e:  # e.g. a parameter given with the wrong type on the command line
        print(f'policy_node: cannot start: {type(e).__name__}: {e}', file=sys.stderr)
        rclpy.try_shutdown()
        raise SystemExit(2) from None
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
        while rclpy.ok():
            executor.spin_once(timeout_sec=0.1)  # returns to Python often enough for a signal to interrupt it
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
