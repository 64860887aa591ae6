"""The policy node's parameters: declaration with descriptions and ranges, validation, QoS profiles.

Parameters marked ``live`` may change while the node runs (``policy`` triggers a background swap); all others
are read at configure and a change is refused while the node is configured (deactivate + cleanup first).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data, qos_profile_system_default)

ENGINES = ('onnxruntime', 'onnxruntime-cuda', 'tensorrt', 'torch')
IMAGE_TRANSPORTS = ('auto', 'raw', 'compressed')
IMAGE_QOS = ('sensor_data', 'reliable', 'best_effort', 'system_default')
INSTRUCTION_QOS = ('transient_local', 'volatile')
DECODERS = ('', 'blockdiff', 'ar', 'fulldiff', 'fulldiff_nocache')
SCHEDULES = ('', 'fixed', 'threshold')


def default_policy_dirs() -> list:
    """The installed package's models/ (share/blockvla_ros/models), else the source checkout's models/."""
    dirs = []
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            share = Path(get_package_share_directory('blockvla_ros')) / 'models'
            if share.is_dir():
                dirs.append(str(share))
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    source = Path(__file__).resolve().parents[2] / 'models'
    if not dirs:
        dirs.append(str(source))
    return dirs


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
    Spec('threads', 1, 'Intra-op threads for ONNX Runtime (0: its default, one spinning thread per core, which '
         'takes the CPU from the control thread on small machines: measured 100+ missed ticks in 20 s on 2 '
         'cores vs ~1 with 1 thread).', low=0, high=256),
    Spec('warmup_runs', 2, 'Inferences run at configure (and before a swap) so the first real one is fast.',
         low=0, high=100),
    Spec('control_rate_hz', 50.0, 'Rate of the control tick that publishes action and action_chunk; must '
         'match the rate the policy was trained at.', low=0.1, high=1000.0),
    Spec('control_thread_priority', 50, 'SCHED_FIFO priority of the control thread (1-99; 0: normal scheduling). '
         'Keeps the tick on time on a busy CPU; needs an rtprio limit (as ros2_control, whose default is also '
         '50); without one the node runs at normal priority and says so in diagnostics.', low=0, high=99),
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
         'the policy has state inputs.'),
    Spec('action_topic', 'action', 'Per-tick action (sensor_msgs/JointState).'),
    Spec('action_chunk_topic', 'action_chunk', 'Remaining planned chunk every tick '
         '(trajectory_msgs/JointTrajectory).'),
    Spec('max_image_age_s', 0.5, 'Hold when the newest image (header stamp vs node clock) is older.',
         low=0.001, high=3600.0, live=True),
    Spec('max_image_pixels', 4096 * 4096, 'Larger images are refused before decoding.', low=1, high=1 << 31),
    Spec('max_instruction_chars', 1000, 'Longer instructions are refused (and the node holds).',
         low=1, high=1 << 20),
    Spec('chunk_threshold', 0.5, 'Request the next chunk when the queue holds at most this fraction of a '
         'chunk (never fewer actions than the measured inference delay needs).', low=0.0, high=1.0, live=True),
    Spec('real_time_chunking', True, 'Pass the actions executed during inference as known actions so the new '
         'chunk continues the old one.', live=True),
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
    desc = ParameterDescriptor(name=spec.name, description=spec.description)
    if spec.choices:
        desc.additional_constraints = 'one of: ' + ', '.join(repr(c) for c in spec.choices)
    if spec.low is not None:
        if isinstance(spec.default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high))]
        else:
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
    if not spec.live:
        desc.additional_constraints = (desc.additional_constraints + '; ' if desc.additional_constraints
                                       else '') + 'read at configure'
    return desc


def declare(node) -> None:
    """Declare every parameter on ``node`` with its descriptor."""
    for spec in SPECS:
        default = spec.default
        if spec.name == 'policy_dirs':
            default = Parameter.Type.STRING_ARRAY  # typed, no value: empty list -> package default
        node.declare_parameter(spec.name, default, _descriptor(spec))


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
    return None


@dataclass(frozen=True)
class NodeParams:
    """Every parameter's value at configure time."""

    values: dict = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.values[name]

    @property
    def policy_dirs_resolved(self) -> list:
        dirs = [os.path.expanduser(d) for d in (self.values.get('policy_dirs') or []) if str(d).strip()]
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
    values = {}
    for spec in SPECS:
        value = node.get_parameter(spec.name).value
        values[spec.name] = list(value) if spec.name == 'policy_dirs' and value is not None else value
    return NodeParams(values)


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
