"""Control-loop timing of the policy node while inference runs, measured over real DDS.

    python benchmarks/control_loop.py --rate 50 --seconds 20 --json out/control_loop.json [--policy demo]
    python benchmarks/control_loop.py --tiny ...        # export a small random policy first (no demo needed)

Starts ``policy_node`` in its own process (autostart, ONNX Runtime by default), publishes a camera (30 Hz,
640x480 rgb8), an instruction and (for a policy with proprioception) joint states, records every per-tick ``action``
for ``--seconds`` and reports:

- period_p50_ms / period_p99_ms / period_error_p99_ms: gaps between the header stamps of consecutive actions
  (the node stamps each tick with its clock when the tick starts), and the p99 of |gap - 1/rate|;
- missed_ticks: a gap of k periods counts k - 1;
- e2e_latency_p50_ms / e2e_latency_p99_ms: image header stamp -> the tick that executes the first action
  computed from it (measured by the node, read from its last /diagnostics);
- hold_ticks: ticks that held instead of executing a planned action (velocity = zeros);
- reference_timer: the same figures for a bare sleep loop in its own process at the same rate and priority,
  run during the same window: what the machine allows at all (a VM whose host takes CPU time shows it here,
  and in cpu_steal_ms, the time the hypervisor took from this VM during the window).
The window starts ``--settle`` seconds after the first planned action. The control thread runs SCHED_FIFO
(``--priority``, the node's default 50) when the user may (root, or an rtprio limit); `priority_error` says
when it could not.
Target: period_error_p99_ms < 2 and missed_ticks == 0 at 50 Hz.
"""
from __future__ import annotations

import argparse
import array
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_tiny_policy(folder: Path) -> Path:
    """Export a small random policy (tiny Qwen2 backbone) into folder/tiny; returns the policy directory."""
    import torch

    from blockvla_ros.export.policy_writer import export_policy
    from blockvla_ros.model.action_tokenizer import NormStats
    from blockvla_ros.model.config import BlockVLAConfig
    from blockvla_ros.model.policy import BlockVLAPolicy

    torch.manual_seed(0)
    # 16 steps x 7 dims (320 ms at 50 Hz), blocks of two timesteps, 4 refine passes each
    config = BlockVLAConfig(image_size=64, vision={'type': 'patch', 'patch_size': 16, 'dim': 64}, max_text_tokens=32,
                            action_dim=7, chunk_len=16, block_size=14, steps_per_block=4,
                            action_names=[f'joint{i}' for i in range(7)])
    checkpoint = folder / 'checkpoint'
    BlockVLAPolicy(config).save(checkpoint)
    actions = np.random.default_rng(0).uniform(-1, 1, (256, 7)).astype(np.float32)
    NormStats.from_data(actions, None).save(checkpoint / 'stats.json')
    export_policy(checkpoint, folder / 'models' / 'tiny')
    return folder / 'models'


REFERENCE_TIMER = r"""
import os, sys, time, json
period, seconds, priority = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
if priority > 0:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError:
        pass
stamps, next_t = [], time.monotonic()
end = next_t + seconds
while next_t < end:
    next_t += period
    time.sleep(max(0.0, next_t - time.monotonic()))
    stamps.append(time.monotonic())
print(json.dumps(stamps))
"""


def start_reference_timer(period: float, seconds: float, priority: int) -> subprocess.Popen:
    """A bare sleep loop in its own process at the node's rate and priority: what this machine allows at all."""
    return subprocess.Popen([sys.executable, '-c', REFERENCE_TIMER, str(period), str(seconds), str(priority)],
                            stdout=subprocess.PIPE, text=True)


def period_figures(stamps, period: float) -> dict:
    """Gaps between consecutive stamps (seconds): p50/p99/max, p99 of |gap - period|, missed ticks."""
    gaps = np.diff(np.asarray(stamps, dtype=np.float64))
    return {'period_p50_ms': percentile(gaps * 1e3, 50), 'period_p99_ms': percentile(gaps * 1e3, 99),
            'period_max_ms': float(gaps.max() * 1e3) if gaps.size else None,
            'period_error_p99_ms': percentile(np.abs(gaps - period) * 1e3, 99),
            'missed_ticks': int(np.sum(np.maximum(np.rint(gaps / period) - 1, 0)))}


def cpu_steal_ms() -> float | None:
    """CPU time the hypervisor took from this VM (all CPUs), from /proc/stat; None off Linux."""
    try:
        fields = Path('/proc/stat').read_text().split('\n', 1)[0].split()
        return int(fields[8]) * 1000.0 / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError):
        return None


def policy_state_names(policy_dirs, policy) -> list[str]:
    """The proprioception joint names the policy expects, [] for none (the folder as the node resolves it)."""
    from blockvla_ros.runtime.policy_folder import load_policy_folder, resolve_policy

    config = load_policy_folder(resolve_policy(policy, policy_dirs)).config
    return list(config.state_names or []) or [f'state{i}' for i in range(config.state_dim)]


def percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--rate', type=float, default=50.0, help='control_rate_hz of the node')
    ap.add_argument('--seconds', type=float, default=20.0, help='measurement window after the first action')
    ap.add_argument('--json', type=Path, help='write the results here')
    ap.add_argument('--policy', default='demo', help="policy name ('tiny' with --tiny)")
    ap.add_argument('--policy-dirs', nargs='*', default=[], help='policy directories (default: models/)')
    ap.add_argument('--tiny', action='store_true', help='export a small random policy and run it')
    ap.add_argument('--tiny-dir', type=Path, help='with --tiny: export into (or reuse) this directory')
    ap.add_argument('--engine', default='onnxruntime')
    ap.add_argument('--threads', type=int, default=1, help="ONNX Runtime intra-op threads (the node's default: 1)")
    ap.add_argument('--priority', type=int, default=50,
                    help="control_thread_priority (SCHED_FIFO, needs rtprio; the node's default: 50; 0: normal)")
    ap.add_argument('--settle', type=float, default=2.0,
                    help='seconds between the first planned action and the measurement window (first-use costs)')
    ap.add_argument('--camera-hz', type=float, default=30.0)
    ap.add_argument('--width', type=int, default=640)
    ap.add_argument('--height', type=int, default=480)
    ap.add_argument('--domain-id', type=int, default=int(os.environ.get('ROS_DOMAIN_ID', 0)) or 57)
    ap.add_argument('--startup-timeout', type=float, default=120.0)
    args = ap.parse_args(argv)

    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    os.environ['ROS_DOMAIN_ID'] = str(args.domain_id)
    tmp = tempfile.TemporaryDirectory(prefix='blockvla-bench-')
    policy_dirs = [str(Path(d).resolve()) for d in args.policy_dirs] or [str(REPO / 'models')]
    policy = args.policy
    if args.tiny:
        root = args.tiny_dir.resolve() if args.tiny_dir else Path(tmp.name)
        if not (root / 'models' / 'tiny' / 'manifest.json').is_file():
            print(f'exporting a small random policy into {root} ...', flush=True)
            make_tiny_policy(root)
        policy_dirs, policy = [str(root / 'models')], 'tiny'

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    cmd = [sys.executable, '-m', 'blockvla_ros.ros.policy_node', '--ros-args', '--log-level', 'warn',
           '-p', f'policy:={policy}', '-p', f'policy_dirs:={json.dumps(policy_dirs)}', '-p', 'autostart:=true',
           '-p', f'control_rate_hz:={float(args.rate)}', '-p', f'engine:={args.engine}',
           '-p', f'threads:={args.threads}', '-p', f'control_thread_priority:={args.priority}']
    node_proc = subprocess.Popen(cmd, env=dict(os.environ))
    rclpy.init()
    node = rclpy.create_node('blockvla_control_loop_bench')
    stamps, holds, diag = [], [], {}

    def on_action(msg: JointState):
        stamps.append(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
        holds.append(len(msg.velocity) > 0)

    def on_diag(msg: DiagnosticArray):
        for status in msg.status:
            if status.name.endswith(': policy'):
                diag.clear()
                diag.update({kv.key: kv.value for kv in status.values})
                diag['_message'] = status.message

    node.create_subscription(JointState, 'action', on_action, 100)
    node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, 10)
    camera = node.create_publisher(Image, 'camera/image_raw', QoSProfile(depth=1,
                                                                         reliability=ReliabilityPolicy.BEST_EFFORT))
    instruction = node.create_publisher(String, 'instruction', QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
    instruction.publish(String(data='pick up the red block'))
    state_names = policy_state_names(policy_dirs, policy)
    joint_states = node.create_publisher(JointState, 'joint_states', 10) if state_names else None
    frames = []
    rng = np.random.default_rng(0)
    for _ in range(4):  # a few prebuilt frames: building a 900 kB message costs more than publishing it
        msg = Image(height=args.height, width=args.width, encoding='rgb8', step=args.width * 3)
        msg.data = array.array('B', rng.integers(0, 255, (args.height, args.width, 3), np.uint8).tobytes())
        frames.append(msg)
    count = [0]

    def publish_frame():
        msg = frames[count[0] % len(frames)]
        msg.header.stamp = node.get_clock().now().to_msg()
        camera.publish(msg)
        if joint_states is not None:  # a policy with proprioception holds until it has a joint state
            joint_states.publish(JointState(header=msg.header, name=state_names,
                                            position=[0.0] * len(state_names)))
        count[0] += 1

    node.create_timer(1.0 / args.camera_hz, publish_frame)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    load = os.getloadavg()
    deadline = time.monotonic() + args.startup_timeout
    try:
        while not any(not h for h in holds):  # the first planned action: the policy is running
            executor.spin_once(timeout_sec=0.05)
            if time.monotonic() > deadline or node_proc.poll() is not None:
                raise SystemExit(f'the node produced no action within {args.startup_timeout:.0f} s '
                                 f'(exit code {node_proc.poll()}); last diagnostics: {diag}')
        settle_end = time.monotonic() + args.settle
        while time.monotonic() < settle_end:
            executor.spin_once(timeout_sec=0.05)
        print(f'node running; measuring {args.seconds:g} s at {args.rate:g} Hz ...', flush=True)
        reference = start_reference_timer(1.0 / args.rate, args.seconds, args.priority)
        steal_start = cpu_steal_ms()
        start = len(stamps)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        stop = len(stamps)
        steal_end = cpu_steal_ms()
        reference_out, _ = reference.communicate(timeout=30)
        final = time.monotonic() + 2.5  # one more /diagnostics after the window
        diag.clear()
        while time.monotonic() < final and not diag:
            executor.spin_once(timeout_sec=0.05)
    finally:
        node_proc.send_signal(signal.SIGINT)
        try:
            code = node_proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node_proc.kill()
            code = 'killed'
        node.destroy_node()
        rclpy.try_shutdown()
        tmp.cleanup()

    period = 1.0 / args.rate
    window = stamps[start:stop]
    figures = period_figures(window, period)

    def num(key):
        try:
            return float(diag[key])
        except (KeyError, ValueError):
            return None

    result = {
        'rate_hz': args.rate, 'seconds': args.seconds, 'settle_s': args.settle, 'policy': policy, 'engine': args.engine,
        'threads': args.threads, 'control_thread_priority': args.priority,
        'priority_error': diag.get('control_thread_priority_error', ''),
        'backend': diag.get('backend'), 'runtime_provider': diag.get('runtime.provider'),
        'ticks': len(window), 'expected_ticks': int(round(args.seconds * args.rate)), **figures,
        'hold_ticks': int(np.sum(holds[start:stop])),
        'e2e_latency_p50_ms': num('e2e_latency_p50_ms'), 'e2e_latency_p99_ms': num('e2e_latency_p99_ms'),
        'inference_latency_p50_ms': num('inference_latency_p50_ms'),
        'inference_latency_p99_ms': num('inference_latency_p99_ms'),
        'chunks': num('chunks'), 'node_period_error_p99_ms': num('period_error_p99_ms'),
        'camera': f'{args.width}x{args.height} rgb8 at {args.camera_hz:g} Hz', 'node_exit_code': code,
        'loadavg_at_start': [round(x, 2) for x in load], 'cpu_count': os.cpu_count(),
        'cpu_steal_ms': None if steal_start is None or steal_end is None else round(steal_end - steal_start, 1),
        'reference_timer': period_figures(json.loads(reference_out), period),
    }
    result['target_met'] = bool(result['period_error_p99_ms'] is not None and result['period_error_p99_ms'] < 2.0
                                and figures['missed_ticks'] == 0)
    for key, value in result.items():
        print(f'{key:28s} {value}')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(args.json.name + '.tmp')
        tmp_json.write_text(json.dumps(result, indent=2))
        os.replace(tmp_json, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())
