"""The policy node's parameters: declaration with descriptions and ranges, validation, QoS profiles.

Parameters marked ``live`` may change while the node runs (``policy`` triggers a background swap). Every other
parameter is read-only after start-up (set it on the command line, in the parameters file or as a launch argument;
restart the node to change it), and so is rclpy's own ``use_sim_time``: whoever reaches the parameter service can
swap policies inside ``policy_dirs`` and tune the live knobs, but cannot point the node at other folders, topics,
limits, joints or clocks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data, qos_profile_system_default)

from ..paths import package_data_dir
from ..runtime.engine_factory import ENGINES
from ..runtime.torch_static_engine import DTYPES

TORCH_DTYPES = tuple(dict.fromkeys(DTYPES.values()))  # float32, bfloat16, float16 (without the short aliases)
IMAGE_TRANSPORTS = ('auto', 'raw', 'compressed')
IMAGE_QOS = ('sensor_data', 'reliable', 'best_effort', 'system_default')
INSTRUCTION_QOS = ('transient_local', 'volatile')
DECODERS = ('', 'blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')
SCHEDULES = ('', 'fixed', 'threshold')
STRING_LISTS = ('policy_dirs', 'trajectory_joints')  # list parameters: any list type is accepted at start-up and
NUMBER_LISTS = ('action_limits.lower', 'action_limits.upper')  # checked by read() (YAML [1, 2] is an int array)


def default_policy_dirs() -> list:
    """The package's models/ directory: the checkout's, or share/blockvla_ros/models of an install."""
    found = package_data_dir('models')
    return [str(found)] if found is not None else []


@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    description: str
    choices: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None
    live: bool = False  # may change while configured


SPECS = [
    Spec('policy', 'demo', 'Policy folder name, or a path inside policy_dirs. Setting it while the node runs '
         'validates the folder (manifest, action space) and swaps to it between chunks.', live=True),
    Spec('policy_dirs', [], 'Directories policies are loaded from; nothing outside them is loaded. '
         'Empty: the package\'s models/ directory.'),
    Spec('engine', 'onnxruntime', 'Inference backend.', choices=ENGINES),
    Spec('require_gpu', False, 'Fail at configure instead of silently falling back to the CPU.'),
    Spec('torch_dtype', 'float32', "Weights and KV cache dtype of engine 'torch' (bfloat16: half the GPU memory, "
         'the CUDA-graph path of README "GPU and Jetson"). The other engines run the precision the policy folder '
         'was exported at (blockvla-export --precision); with them anything but float32 is ignored with a '
         'warning.', choices=TORCH_DTYPES),
    Spec('threads', 1, 'Intra-op threads for ONNX Runtime (0: its default, one spinning thread per core, which '
         'takes the CPU from the control thread on small machines: measured 100+ missed ticks in 20 s on 2 '
         'cores vs ~1 with 1 thread).', low=0, high=256),
    Spec('warmup_runs', 2, 'Inferences run at configure (and before a swap) so the first real one is fast.',
         low=0, high=100),
    Spec('control_rate_hz', 0.0, 'Rate of the control tick that publishes action and action_chunk. 0: the rate '
         'the policy was trained at (policy.yaml config.control_rate_hz). Another rate is allowed but warned '
         'about in the log and /diagnostics: delta actions then move the robot faster or slower than in training.',
         low=0.0, high=1000.0),
    Spec('control_thread_priority', 50, 'SCHED_FIFO priority of the control thread (1-99; 0: normal scheduling). '
         'Keeps the tick on time on a busy CPU; needs an rtprio limit (as ros2_control, whose default is also '
         '50); without one the node runs at normal priority and says so in diagnostics.', low=0, high=99),
    Spec('action_limits.lower', [], "The robot's lower limit per action, in the policy's action order and units "
         '(empty: no limits). Every planned action is clipped to the limits; /diagnostics counts the clipped '
         'values. blockvla-replay --action-lower applies the same limits offline.'),
    Spec('action_limits.upper', [], "The robot's upper limit per action (see action_limits.lower)."),
    Spec('trajectory_joints', [], "Which actions action_chunk (JointTrajectory) carries, as '<action name>=<robot "
         "joint name>' entries; only absolute actions can be mapped. Empty: every action under its own name if all "
         'are absolute targets, else action_chunk is not published (a delta is not a joint position).'),
    Spec('camera_topic', 'camera/image_raw', 'Camera topic (sensor_msgs/Image, or CompressedImage).'),
    Spec('image_transport', 'auto', "'raw' (Image), 'compressed' (CompressedImage) or 'auto' (compressed when "
         "camera_topic ends in /compressed).", choices=IMAGE_TRANSPORTS),
    Spec('image_qos', 'sensor_data', 'Camera subscription QoS (depth image_qos_depth, keep last). '
         'sensor_data/best_effort also match reliable publishers.', choices=IMAGE_QOS),
    Spec('image_qos_depth', 1, 'Camera queue depth; 1 keeps only the newest frame.', low=1, high=100),
    Spec('instruction_topic', 'instruction', 'Language instruction (std_msgs/String). Empty text clears the '
         'task (hold).'),
    Spec('instruction_qos', 'transient_local', "'transient_local' (reliable, late joiners get the last "
         "instruction; the publisher must be transient_local too) or 'volatile' (matches any publisher).",
         choices=INSTRUCTION_QOS),
    Spec('joint_states_topic', 'joint_states', 'Proprioception (sensor_msgs/JointState); subscribed only when '
         'the policy has state inputs (the node holds until one arrives).'),
    Spec('action_topic', 'action', 'Per-tick action (sensor_msgs/JointState).'),
    Spec('action_chunk_topic', 'action_chunk', 'Remaining planned chunk every tick '
         '(trajectory_msgs/JointTrajectory; absolute targets only, see trajectory_joints).'),
    Spec('max_image_age_s', 0.5, 'Hold when the newest image (header stamp vs node clock) is older.',
         low=0.001, high=3600.0, live=True),
    Spec('max_joint_state_age_s', 0.5, 'Hold when a state input of the policy was last received on '
         'joint_states_topic longer ago (node clock; 0: never).', low=0.0, high=3600.0, live=True),
    Spec('max_image_pixels', 4096 * 4096, 'Larger images are refused before decoding.', low=1, high=1 << 31),
    Spec('max_instruction_chars', 1000, 'Longer instructions are refused (and the node holds).',
         low=1, high=1 << 20),
    Spec('chunk_threshold', 0.5, 'Request the next chunk when the queue holds at most this fraction of a '
         'chunk (never fewer actions than the measured inference delay needs).', low=0.0, high=1.0, live=True),
    Spec('real_time_chunking', False, 'Decode each new chunk as the continuation of the old plan\'s actions for '
         'the ticks that pass while it is computed (a new instruction always starts a fresh chunk). Off by '
         'default: a policy trained on demonstrations can follow that stale plan instead of the camera; turn '
         'on only for a policy evaluated with it.', live=True),
    Spec('decoding.decoder', '', 'Decoder override (empty: the policy\'s own).', choices=DECODERS),
    Spec('decoding.steps_per_block', 0, 'Refine passes per block override (0: the policy\'s own).',
         low=0, high=1024),
    Spec('decoding.schedule', '', 'Unmasking schedule override (empty: the policy\'s own).', choices=SCHEDULES),
    Spec('decoding.threshold', 0.0, 'Confidence threshold override for the threshold schedule (0: the '
         'policy\'s own).', low=0.0, high=1.0),
    Spec('diagnostics_period_s', 1.0, 'Period of /diagnostics.', low=0.05, high=60.0),
    Spec('hardware_id', '', 'hardware_id reported in /diagnostics.'),
    Spec('autostart', False, 'Configure and activate at start-up (ros2 run); launch files drive the lifecycle '
         'instead.'),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}


def _descriptor(spec: Spec) -> ParameterDescriptor:
    desc = ParameterDescriptor(name=spec.name, description=spec.description, read_only=not spec.live)
    if spec.choices:
        desc.additional_constraints = 'one of: ' + ', '.join(repr(c) for c in spec.choices)
    if spec.low is not None:
        if isinstance(spec.default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high))]
        else:
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
    if spec.name in STRING_LISTS + NUMBER_LISTS:
        desc.dynamic_typing = True  # an empty list has no type in rclpy; read() checks the elements
    if not spec.live:
        desc.additional_constraints = (desc.additional_constraints + '; ' if desc.additional_constraints
                                       else '') + 'read-only after start-up'
    return desc


def declare(node) -> None:
    """Declare every parameter on ``node`` with its descriptor (each has a value: nothing is left uninitialized)."""
    for spec in SPECS:
        node.declare_parameter(spec.name, spec.default, _descriptor(spec))


def check_value(name: str, value: Any) -> Optional[str]:
    """The reason a value is invalid (ranges are enforced by rclpy from the descriptor), or None."""
    spec = SPEC_BY_NAME.get(name)
    if spec is None:
        return None
    if spec.choices and value not in spec.choices:
        return f'{name} must be one of {list(spec.choices)}, got {value!r}'
    if name in ('camera_topic', 'instruction_topic', 'joint_states_topic', 'action_topic', 'action_chunk_topic'):
        if not str(value).strip():
            return f'{name} must not be empty'
    if name == 'decoding.threshold' and value != 0.0 and not 0.0 < value <= 1.0:
        return f'decoding.threshold must be in (0, 1] or 0 for the policy default, got {value}'
    if name == 'policy' and (not isinstance(value, str) or not value.strip()):
        return f'policy must be a non-empty folder name, got {value!r}'
    return None


def _as_list(name: str, value: Any, kind) -> list:
    """A list parameter's value as a list of ``kind`` (str or float); ValueError naming the parameter."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f'{name} must be a list, got {value!r}') from None
    if kind is str:
        if not all(isinstance(x, str) for x in items):
            raise ValueError(f'{name} must be a list of strings, got {value!r}')
        return [x for x in items if x.strip()]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in items):
        raise ValueError(f'{name} must be a list of finite numbers, got {value!r}')
    return [float(x) for x in items]


@dataclass(frozen=True)
class NodeParams:
    """Every parameter's value at configure time."""

    values: dict = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.values[name]

    @property
    def policy_dirs_resolved(self) -> list:
        dirs = [os.path.expanduser(d) for d in self.values.get('policy_dirs') or []]
        return dirs or default_policy_dirs()

    @property
    def compressed(self) -> bool:
        transport = self.values['image_transport']
        if transport == 'auto':
            return self.values['camera_topic'].rstrip('/').endswith('/compressed')
        return transport == 'compressed'

    @property
    def decoding_overrides(self) -> dict:
        out = {}
        if self.values['decoding.steps_per_block']:
            out['steps_per_block'] = int(self.values['decoding.steps_per_block'])
        if self.values['decoding.schedule']:
            out['schedule'] = self.values['decoding.schedule']
        if self.values['decoding.threshold']:
            out['threshold'] = float(self.values['decoding.threshold'])
        return out


def read(node) -> NodeParams:
    """Every parameter's value, list parameters checked and normalized; ValueError naming a bad one."""
    values = {}
    for spec in SPECS:
        value = node.get_parameter(spec.name).value
        if spec.name in STRING_LISTS:
            value = _as_list(spec.name, value, str)
        elif spec.name in NUMBER_LISTS:
            value = _as_list(spec.name, value, float)
        else:
            reason = check_value(spec.name, value)
            if reason:
                raise ValueError(reason)
        values[spec.name] = value
    return NodeParams(values)


def live_values(node) -> dict:
    """The live parameters only (never raises for the read-only ones)."""
    return {s.name: node.get_parameter(s.name).value for s in SPECS if s.live}


def image_qos(name: str, depth: int) -> QoSProfile:
    if name == 'sensor_data':
        base = qos_profile_sensor_data
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=base.reliability,
                          durability=base.durability)
    if name == 'system_default':
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                          reliability=qos_profile_system_default.reliability,
                          durability=qos_profile_system_default.durability)
    reliability = ReliabilityPolicy.RELIABLE if name == 'reliable' else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability,
                      durability=DurabilityPolicy.VOLATILE)


def instruction_qos(name: str) -> QoSProfile:
    durability = DurabilityPolicy.TRANSIENT_LOCAL if name == 'transient_local' else DurabilityPolicy.VOLATILE
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=durability)


def output_qos() -> QoSProfile:
    """action / action_chunk: reliable, keep the last few (a slow consumer gets the newest)."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)
