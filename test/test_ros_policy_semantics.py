"""What the node's outputs mean, on the shipped demo policy over real rclpy (loopback DDS).

The demo was trained at 10 Hz on (ee_dx, ee_dy) deltas + a gripper level (absolute). Started with no control rate,
the node ticks at 10 Hz; with action limits it clips (and counts it); with the gripper mapped to a joint,
action_chunk carries that joint only; when the camera goes silent the hold is (0, 0, last gripper level). Also: the
installed console script starts as `ros2 run` starts it, with no parameters and with `-p policy:=demo`.
"""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402

from blockvla_ros.ros.policy_node import PolicyNode  # noqa: E402
from blockvla_ros.tasks import TabletopEnv  # noqa: E402
from ros_spin import Spinner  # noqa: E402
from test_ros_policy_node import Peer, image_msg, is_hold, stamp  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]
LOWER, UPPER = [-0.2, -0.2, 0.0], [0.2, 0.2, 1.0]


@pytest.fixture(scope='module')
def demo_node():
    context = rclpy.Context()
    rclpy.init(context=context)
    node = PolicyNode(context=context, parameter_overrides=[  # no policy_dirs, no control_rate_hz: the defaults
        Parameter('policy', value='demo'), Parameter('diagnostics_period_s', value=0.2),
        Parameter('warmup_runs', value=1), Parameter('action_limits.lower', value=LOWER),
        Parameter('action_limits.upper', value=UPPER), Parameter('trajectory_joints', value=['gripper=tool_joint']),
        Parameter('autostart', value=True)])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    node.trigger_configure()
    assert node.lifecycle_state == 'inactive', node.status.get('last_error')
    node.trigger_activate()
    spinner = Spinner(executor)
    peer = Peer(context)
    obs = TabletopEnv('touch_red', seed=5).reset()
    state_pub = peer.node.create_publisher(JointState, 'joint_states', 10)
    peer.make_frame = lambda s: image_msg(obs.image, s)
    peer.say(obs.instruction)
    yield node, peer, state_pub, obs
    peer.close()
    spinner.stop()
    node.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)


def test_demo_holds_until_joint_states_then_runs_at_its_trained_rate(demo_node):
    node, peer, state_pub, obs = demo_node
    diag = peer.wait_diag(lambda d: 'joint state' in d['hold_reason'], timeout=30)
    assert diag['lifecycle_state'] == 'active' and diag['holding'] == 'True'
    assert float(diag['control_rate_hz']) == 10.0 and diag['rate_warning'] == ''
    assert diag['action_kinds'] == 'ee_dx: delta, ee_dy: delta, gripper: absolute'

    stop = threading.Event()

    def publish_state():
        while not stop.wait(0.05):
            state_pub.publish(JointState(name=['ee_x', 'ee_y'], position=[float(v) for v in obs.state]))

    threading.Thread(target=publish_state, daemon=True).start()
    try:
        mark = peer.wait_actions(lambda m: not is_hold(m), mark=peer.mark(), timeout=30)
        time.sleep(3.0)
        got = [m for m in peer.since(mark - 1) if not is_hold(m)]
        periods = np.diff([stamp(m) for m in got])
        assert len(got) >= 15 and np.median(periods) == pytest.approx(0.1, abs=0.002)
        positions = np.array([m.position for m in got])  # [n, 3]
        assert np.all(positions >= np.array(LOWER) - 1e-6) and np.all(positions <= np.array(UPPER) + 1e-6)
        diag = peer.wait_diag(lambda d: int(d['actions_clipped']) > 0)  # the demo commands |dx| up to 1
        assert 'ee_dx [-0.2, 0.2]' in diag['action_limits']
        with peer.lock:
            chunks = [m for _, m in peer.chunks[-10:]]
        assert chunks and all(c.joint_names == ['tool_joint'] for c in chunks)
        assert all(len(p.positions) == 1 for c in chunks for p in c.points)

        peer.make_frame = None  # camera silent: hold
        held = peer.wait_actions(is_hold, mark=peer.mark(), timeout=10)
        hold = peer.since(held - 1)[0]
        last = [m for m in peer.since(mark) if not is_hold(m)][-1]
        assert list(hold.position) == [0.0, 0.0, pytest.approx(last.position[2])]  # deltas 0, gripper kept
        assert list(hold.velocity) == [0.0, 0.0, 0.0]
    finally:
        stop.set()
        peer.make_frame = lambda s: image_msg(obs.image, s)
    assert node.lifecycle_state == 'active'


def _console_script(name):
    found = Path(sys.executable).with_name(name)
    return str(found) if found.is_file() else shutil.which(name)


@pytest.mark.parametrize('args, state', [([], 'unconfigured'),
                                         (['-p', 'policy:=demo', '-p', 'autostart:=true'], 'active')])
def test_console_script_starts_as_ros2_run_starts_it(args, state):
    exe = _console_script('policy_node')
    if exe is None:
        pytest.skip('the policy_node console script is not installed (pip install -e .)')
    domain = 100 + (os.getpid() + 53 + len(args)) % 100
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    proc = subprocess.Popen([exe, *(['--ros-args', *args] if args else [])], env=env, cwd='/',
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    peer = Peer(context)
    try:
        diag = peer.wait_diag(lambda d: d['lifecycle_state'] == state, timeout=60)
        if state == 'active':  # models/demo found from the installed package, at its own rate
            assert diag['policy'] == 'demo' and float(diag['control_rate_hz']) == 10.0
            assert 'no camera image' in diag['hold_reason']
    finally:
        peer.close()
        rclpy.shutdown(context=context)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert 'Traceback' not in out and 'Exception' not in out, out
