"""Hostile and clumsy peers against the running node over real rclpy (issue 13's node items).

Each test ends by checking that the node is still up and publishing policy actions at its rate. Policies: ``alpha``
and ``beta`` (test_ros_policy_node's tiny policy and its shifted copy) and folders whose stats.json or policy.yaml
hold wrong types (their manifests rebuilt, so only the content is wrong).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip('rclpy')
from lifecycle_msgs.msg import Transition  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from blockvla_ros.ros.policy_node import PolicyNode  # noqa: E402
from blockvla_ros.runtime.policy_folder import write_manifest  # noqa: E402
from ros_spin import Spinner  # noqa: E402
from test_ros_policy_node import (GOOD, RATE, Peer, _export_alpha, _shifted_copy, acting,  # noqa: E402
                                  hold_ends_the_streams, is_hold, policy_action, stamp)

pytestmark = [pytest.mark.ros, pytest.mark.slow]

# name -> (file, change): every one is a type or shape that parses as JSON/YAML but is wrong
BAD_FOLDERS = {
    'stats_extra_key': ('stats.json', lambda d: {**d, 'surprise': 1}),
    'stats_null': ('stats.json', lambda d: None),
    'stats_list': ('stats.json', lambda d: [1, 2, 3]),
    'stats_strings': ('stats.json', lambda d: {**d, 'action_low': ['a', 'b', 'c']}),
    'actions_empty': ('policy.yaml', lambda d: {**d, 'actions': {}}),
    'graphs_list': ('policy.yaml', lambda d: {**d, 'graphs': []}),
    'tokenizer_files_int': ('policy.yaml', lambda d: {**d, 'tokenizer_files': 5}),
    'config_null': ('policy.yaml', lambda d: {**d, 'config': None}),
    'kinds_wrong': ('policy.yaml', lambda d: {**d, 'config': {**d['config'], 'action_kinds': 'delta'}}),
    'names_dict': ('policy.yaml', lambda d: {**d, 'actions': {**d['actions'], 'names': {'a': 1}}}),
}


def _bad_folder(models, name, file, change):
    dest = models / name
    shutil.copytree(models / 'alpha', dest)
    path = dest / file
    if file.endswith('.json'):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        path.write_text(yaml.safe_dump(change(yaml.safe_load(path.read_text())), sort_keys=False))
    write_manifest(dest)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('hostile')
    models = tmp / 'models'
    _export_alpha(tmp, models)
    _shifted_copy(models / 'alpha', models / 'beta', 10.0)
    for name, (file, change) in BAD_FOLDERS.items():
        _bad_folder(models, name, file, change)
    outside = tmp / 'outside'
    shutil.copytree(models / 'alpha', outside / 'evil')
    return models


@pytest.fixture(scope='module')
def running(models):
    context = rclpy.Context()
    rclpy.init(context=context)
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter('policy', value='alpha'), Parameter('policy_dirs', value=[str(models)]),
        Parameter('diagnostics_period_s', value=0.2), Parameter('warmup_runs', value=1),
        Parameter('threads', value=1), Parameter('autostart', value=True)])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = Spinner(executor)
    peer = Peer(context)
    assert peer.transition(Transition.TRANSITION_CONFIGURE) and peer.transition(Transition.TRANSITION_ACTIVATE)
    peer.make_frame = peer.good_raw
    peer.say(GOOD)
    peer.wait_actions(policy_action(-1, 1), timeout=30)
    yield node, peer
    peer.close()
    spinner.stop()
    node.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)


def alive_at_rate(node, peer, low=-1.0, high=1.0, seconds=1.5):
    """The node is up, active, and publishes its policy's actions at the control rate."""
    peer.make_frame = peer.good_raw
    peer.say(GOOD)
    mark = peer.wait_actions(policy_action(low, high), mark=peer.mark(), timeout=30)
    time.sleep(seconds)
    got = [m for m in peer.since(mark) if policy_action(low, high)(m)]
    # mostly acting (holds while a chunk is late on a loaded 2-core machine: 43 of 75 seen once); the rate
    # itself is the median spacing below
    assert len(got) >= 0.4 * RATE * seconds, f'{len(got)} policy actions in {seconds} s'
    assert np.median(np.diff([stamp(m) for m in got])) == pytest.approx(1 / RATE, abs=0.002)
    assert node.lifecycle_state == 'active' and node.context.ok()


def test_folders_with_wrong_types_are_refused_with_an_answer(running):
    """Issue 13 item 1: every set gets an answer naming the problem; nothing escapes the callback."""
    node, peer = running
    for name in BAD_FOLDERS:
        result = peer.set_param('policy', name)
        assert not result.successful, name
        assert name in result.reason and 'refused' in result.reason, (name, result.reason)
    assert peer.get_param('policy') == 'alpha'
    diag = peer.wait_diag(lambda d: d['policy'] == 'alpha')
    assert diag['callback_errors'] == '0'
    alive_at_rate(node, peer)


def test_a_policy_yaml_of_megabytes_is_refused_by_its_size(running, models):
    """policy.yaml is ~15 kB (~0.5 MB with a full calibration table). A 3 MB one of small values (1.5 M list items)
    took the set-callback ~35 s of YAML parsing before its value count refused it (14 MB: 162 s), with the executor,
    so /diagnostics, images and the lifecycle service (deactivate), held all that time; its size refuses it now."""
    node, peer = running
    folder = shutil.copytree(models / 'alpha', models / 'yaml_3mb')
    with open(folder / 'policy.yaml', 'a') as f:
        f.write('padding: [' + ','.join(['1'] * 1_500_000) + ']\n')
    write_manifest(folder)
    result = peer.set_param('policy', 'yaml_3mb')
    assert not result.successful and 'bytes; policy.yaml is at most' in result.reason, result.reason[:300]
    assert peer.get_param('policy') == 'alpha'
    alive_at_rate(node, peer)


def test_policy_dirs_and_other_parameters_are_read_only(running, models):
    """Issue 13 item 5: deactivate, cleanup, point policy_dirs at / -> refused; an outside folder never loads.
    use_sim_time (rclpy's own parameter) too: set live, it froze the node's clock (no action, not even a hold), and
    whoever publishes /clock then sets the rate of the ticks."""
    node, peer = running
    for name, value in (('policy_dirs', ['/']), ('action_topic', '/arm/command'), ('action_limits.upper', [9.0] * 3),
                        ('trajectory_joints', ['j0=shoulder']), ('control_rate_hz', 500.0), ('engine', 'torch'),
                        ('use_sim_time', True)):
        result = peer.set_param(name, value)
        assert not result.successful and 'read-only' in result.reason, (name, result.reason)
    assert peer.transition(Transition.TRANSITION_DEACTIVATE) and peer.transition(Transition.TRANSITION_CLEANUP)
    assert not peer.set_param('policy_dirs', ['/']).successful
    outside = str(models.parent / 'outside' / 'evil')
    assert peer.set_param('policy', outside).successful  # unconfigured: checked when configure resolves it
    assert not peer.transition(Transition.TRANSITION_CONFIGURE)
    diag = peer.wait_diag(lambda d: 'outside the policy directories' in d['last_error'])
    assert diag['lifecycle_state'] == 'unconfigured'
    assert peer.set_param('policy', 'alpha').successful
    assert peer.transition(Transition.TRANSITION_CONFIGURE) and peer.transition(Transition.TRANSITION_ACTIVATE)
    alive_at_rate(node, peer)


def test_swap_flood_ends_with_the_parameter_naming_the_running_policy(running):
    """Issue 13 item 6: 50 sets/s for 3 s (alpha, beta, and refused names); at quiescence parameter == running."""
    node, peer = running
    rng = np.random.default_rng(3)
    names = ['alpha', 'beta', 'nope', 'stats_null']
    assert peer.set_params.wait_for_service(timeout_sec=10)
    futures = []
    for _ in range(150):  # 50 sets/s for 3 s, not waiting for the answers (a flood)
        request = SetParameters.Request(parameters=[Parameter('policy', value=str(rng.choice(names)))
                                                    .to_parameter_msg()])
        futures.append(peer.set_params.call_async(request))
        time.sleep(0.02)
    end = time.monotonic() + 120
    while not all(f.done() for f in futures) and time.monotonic() < end:
        time.sleep(0.1)
    assert all(f.done() for f in futures), f'{sum(not f.done() for f in futures)} of 150 sets were never answered'
    last = str(rng.choice(['alpha', 'beta']))
    assert peer.set_param('policy', last).successful
    diag = peer.wait_diag(lambda d: d['pending_policy'] == '' and d['policy'] == last, timeout=60)
    assert peer.get_param('policy') == last == diag['policy'] == diag['requested_policy']
    low, high = (9.0, 11.0) if last == 'beta' else (-1.0, 1.0)
    alive_at_rate(node, peer, low, high)
    assert peer.set_param('policy', 'alpha').successful
    peer.wait_diag(lambda d: d['pending_policy'] == '' and d['policy'] == 'alpha', timeout=60)


def test_a_failed_swap_does_not_undo_a_newer_set(running, models):
    """Set a folder that fails to load, then at once one that is fine but slow to validate (a 1 GB listed file to
    hash): the failure lands while the second set is being validated. The revert of the failed swap used to set the
    parameter back to the running policy after that newer, accepted set, so the operator's choice was silently
    dropped; now only the failed set is undone and the newer one loads."""
    node, peer = running
    broken = shutil.copytree(models / 'alpha', models / 'broken_graph')
    (broken / 'backbone.onnx').write_bytes(b'not an onnx graph')
    write_manifest(broken)
    slow = shutil.copytree(models / 'beta', models / 'beta_slow')
    with open(slow / 'pad.bin', 'wb') as f:
        f.truncate(1 << 30)  # sparse: nothing written, but hashed at every validation
    write_manifest(slow)
    assert peer.set_param('policy', 'broken_graph').successful
    result = peer.set_param('policy', 'beta_slow')
    assert result.successful, result.reason
    peer.wait_diag(lambda d: 'broken_graph' in d['last_swap_error'], timeout=60)
    peer.wait_diag(lambda d: d['pending_policy'] == '' and d['requested_policy'] == 'beta_slow'
                   and d['policy'] == 'beta', timeout=60)  # beta_slow is beta's copy: its policy.yaml names beta
    assert peer.get_param('policy') == 'beta_slow'
    alive_at_rate(node, peer, 9.0, 11.0)
    assert peer.set_param('policy', 'alpha').successful
    peer.wait_diag(lambda d: d['pending_policy'] == '' and d['policy'] == 'alpha', timeout=60)


def test_a_new_instruction_starts_a_fresh_chunk(running):
    """Issue 13 item 10: with real-time chunking on, a changed instruction is not a continuation of the old chunk."""
    node, peer = running
    assert peer.set_param('real_time_chunking', True).successful  # off by default
    try:
        alive_at_rate(node, peer, seconds=0.5)
        before = node.status.get('fresh_chunks')
        mark = peer.mark()
        peer.say('put the green cube in the box')
        peer.wait_diag(lambda d: int(d['fresh_chunks_new_instruction']) > before, timeout=10)
        peer.wait_actions(policy_action(-1, 1), mark=mark, timeout=10)
        peer.say(GOOD)
        peer.wait_diag(lambda d: int(d['fresh_chunks_new_instruction']) > before + 1, timeout=10)
        alive_at_rate(node, peer)
    finally:
        assert peer.set_param('real_time_chunking', False).successful


def test_a_chunk_shorter_than_an_inference_is_explained(models):
    """Issue 13 item 10: at 1000 Hz a 16-action chunk lasts 16 ms; the node says why it never acts, and ticks on."""
    context = rclpy.Context()
    rclpy.init(context=context)
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter('policy', value='alpha'), Parameter('policy_dirs', value=[str(models)]),
        Parameter('control_rate_hz', value=1000.0), Parameter('diagnostics_period_s', value=0.2),
        Parameter('warmup_runs', value=1), Parameter('threads', value=1),
        Parameter('control_thread_priority', value=0)])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    node.trigger_configure()
    node.trigger_activate()
    spinner = Spinner(executor)
    peer = Peer(context)
    try:
        peer.make_frame = peer.good_raw
        peer.say(GOOD)
        diag = peer.wait_diag(lambda d: 'control_rate_hz' in d['hold_reason'], timeout=30)
        assert '1000 Hz' in diag['hold_reason'] and 'trained at 50 Hz' in diag['hold_reason']
        assert 'differs from the 50 Hz' in diag['rate_warning'] and diag['_level'] == b'\x01'
        ticks = int(diag['ticks'])
        # still ticking: 100 more ticks within 30 s (a liveness check, not a rate: on the loaded 2-core machine the
        # node and this peer, each handling 1000 holds a second, once counted 32 ticks in the 2 s of a fixed sleep)
        peer.wait_diag(lambda d: int(d['ticks']) - ticks >= 100, timeout=30)
        assert node.lifecycle_state == 'active'
    finally:
        peer.close()
        spinner.stop()
        node.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_unconfigured_node_with_missing_policy_answers_and_recovers(running):
    """Configure with a folder that fails, set a valid one, configure again: nothing escapes, the node runs."""
    node, peer = running
    assert peer.transition(Transition.TRANSITION_DEACTIVATE) and peer.transition(Transition.TRANSITION_CLEANUP)
    for name in ('stats_list', 'config_null', 'graphs_list'):
        assert peer.set_param('policy', name).successful  # unconfigured: checked by configure
        assert not peer.transition(Transition.TRANSITION_CONFIGURE)
        peer.wait_diag(lambda d: 'configure failed' in d['last_error'])
    assert peer.set_param('policy', 'alpha').successful
    assert peer.transition(Transition.TRANSITION_CONFIGURE) and peer.transition(Transition.TRANSITION_ACTIVATE)
    alive_at_rate(node, peer)


def test_a_controller_that_cannot_receive_the_actions_is_reported(running):
    """A controller subscribing to action or action_chunk with a QoS the node does not offer (transient-local: the
    node's outputs are volatile) never receives a command. rclpy only logged that; /diagnostics now counts it and
    names the topic, as for the node's own subscriptions."""
    node, peer = running
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    for msg_type, topic in ((JointState, 'action'), (JointTrajectory, 'action_chunk')):
        events = int(peer.wait_diag(lambda d: True)['qos_incompatible_events'])
        sub = peer.node.create_subscription(msg_type, topic, lambda m: None, latched)
        try:
            diag = peer.wait_diag(lambda d: int(d['qos_incompatible_events']) > events
                                  and f'incompatible QoS on {topic} ' in d['last_error'])
            assert 'subscriber' in diag['last_error'], diag['last_error']
        finally:
            peer.node.destroy_subscription(sub)
    alive_at_rate(node, peer)


def test_reactivation_does_not_hold_the_target_of_the_last_activation(running):
    """Deactivate, then the robot is moved by hand or teleop, then activate with no usable camera: the node has
    commanded nothing in this activation, so it holds no absolute target (as at the first start); holding the last
    activation's target would drive the arm back to where it was before the pause."""
    node, peer = running
    alive_at_rate(node, peer, seconds=0.2)
    peer.make_frame = None  # the camera stops: holds of the running activation's target
    peer.wait_actions(is_hold, mark=peer.mark(), timeout=10)
    assert peer.transition(Transition.TRANSITION_DEACTIVATE)
    peer.wait_diag(lambda d: d['lifecycle_state'] == 'inactive')
    mark, activated = peer.mark(), time.time()
    assert peer.transition(Transition.TRANSITION_ACTIVATE)
    peer.wait_diag(lambda d: d['lifecycle_state'] == 'active' and 'camera stale' in d['hold_reason']
                   and int(d['ticks']) >= 10)
    stale = [m for m in peer.since(mark) if stamp(m) >= activated]
    assert not stale, f'{len(stale)} holds of the previous activation\'s target after activate: {stale[0].position}'
    alive_at_rate(node, peer)


def test_shutdown_transition_while_active_ends_with_a_hold(models):
    """The lifecycle shutdown transition straight from active (no deactivate first) stops the node as deactivate
    does: a final hold on action and action_chunk."""
    domain = 100 + (os.getpid() + 61) % 100  # its own domain: the module's running node is on the default one
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter('policy', value='alpha'), Parameter('policy_dirs', value=[str(models)]),
        Parameter('diagnostics_period_s', value=0.2), Parameter('warmup_runs', value=1),
        Parameter('threads', value=1)])
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = Spinner(executor)
    peer = Peer(context)
    try:
        assert peer.transition(Transition.TRANSITION_CONFIGURE) and peer.transition(Transition.TRANSITION_ACTIVATE)
        peer.make_frame = peer.good_raw
        peer.say(GOOD)
        peer.wait_actions(policy_action(-1, 1), timeout=30)
        mark = acting(peer)
        stopped = time.time()
        assert peer.transition(Transition.TRANSITION_ACTIVE_SHUTDOWN)
        assert node.lifecycle_state == 'finalized'
        hold_ends_the_streams(peer, mark, stopped)
    finally:
        peer.close()
        spinner.stop()
        node.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def node_process(policy_dir, salt: int, *params: str):
    """The policy node as its own process (policy alpha from ``policy_dir``, autostart) on a domain of its own, and a
    peer in this process on that domain: (process, context, peer)."""
    domain = 100 + (os.getpid() + salt) % 100
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    args = ['autostart:=true', 'policy:=alpha', f'policy_dirs:=["{policy_dir}"]', 'warmup_runs:=1', 'threads:=1',
            *params]
    proc = subprocess.Popen([sys.executable, '-m', 'blockvla_ros.ros.policy_node', '--ros-args',
                             *[x for a in args for x in ('-p', a)]],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    return proc, context, Peer(context)


def test_sigterm_while_acting_ends_with_a_hold_and_a_clean_exit(models):
    """systemd, docker stop and ros2 launch's escalation send SIGTERM: the node publishes its final hold before the
    context goes, and exits 0 without a traceback (Ctrl-C: test_ros_policy_node's process test)."""
    proc, context, peer = node_process(models, 67)
    try:
        peer.make_frame = peer.good_raw
        peer.say(GOOD)
        peer.wait_actions(policy_action(-1, 1), timeout=60)
        mark = acting(peer)
        stopped = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        hold_ends_the_streams(peer, mark, stopped)
    finally:
        if proc.poll() is None:
            proc.kill()
            out, _ = proc.communicate()
        peer.close()
        rclpy.shutdown(context=context)
    assert proc.returncode == 0, out
    assert 'Traceback' not in out, out


def control_threads():
    return [t for t in threading.enumerate() if t.name == 'blockvla-control' and t.is_alive()]


def test_a_control_period_of_millennia_keeps_the_control_thread_alive_and_stoppable(models):
    """control_rate_hz 1e-12 (a careless parameter, or what a policy.yaml's config.control_rate_hz may carry): one
    period outlasts what time.sleep takes. The control thread waits on (it once died of OverflowError at activate,
    leaving an 'active' node that never ticked) and deactivate still stops it at once."""
    domain = 100 + (os.getpid() + 71) % 100
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = PolicyNode(context=context, parameter_overrides=[
        Parameter('policy', value='alpha'), Parameter('policy_dirs', value=[str(models)]),
        Parameter('control_rate_hz', value=1e-12), Parameter('warmup_runs', value=0), Parameter('threads', value=1)])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.status.get('last_error')
        before = set(control_threads())
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS, node.status.get('last_error')
        time.sleep(0.3)
        ours = set(control_threads()) - before
        assert len(ours) == 1, 'the control thread died'
        assert node.status.get('last_error') == ''
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert not ours.pop().is_alive(), 'deactivate did not end the control thread'
    finally:
        node.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_policy_files_overwritten_in_place_under_the_running_node(models, tmp_path):
    """`cp -r new_export/* models/<running policy>/` truncates and rewrites the running policy's files in place. The
    text table was memory-mapped: the next lookup of a truncated map killed the process with SIGBUS. Now the node
    lives on, holds and says why (the file changed on disk) for as long as the running policy's files differ from
    what it loaded."""
    dirs = tmp_path / 'models'
    shutil.copytree(models / 'alpha', dirs / 'alpha')
    proc, context, peer = node_process(dirs, 73, 'diagnostics_period_s:=0.2')
    try:
        peer.make_frame = peer.good_raw
        peer.say(GOOD)
        peer.wait_actions(policy_action(-1, 1), timeout=60)
        tables = dirs / 'alpha' / 'tables.safetensors'
        data = tables.read_bytes()
        tables.write_bytes(data[:len(data) // 3])  # cp has truncated it and written a third
        peer.say('pick up the blue block')  # a new instruction: its words are looked up in the text table
        diag = peer.wait_diag(lambda d: 'changed on disk' in d['hold_reason'], timeout=30)  # once the queue is out
        assert 'tables.safetensors' in diag['last_inference_error'] and 'inference failed' in diag['hold_reason']
        tables.write_bytes(data)  # the copy is complete: still not what the running policy loaded
        ticks = int(peer.wait_diag(lambda d: True)['ticks'])
        peer.wait_diag(lambda d: int(d['ticks']) > ticks + 20 and 'changed on disk' in d['hold_reason'])
        assert proc.poll() is None, 'the node died'
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        peer.close()
        rclpy.shutdown(context=context)
    assert proc.returncode == 0, out[-3000:]
