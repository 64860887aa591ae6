"""The policy node's parts on their own: input validation, the one-job worker, tick statistics, and the control
loop on a real rclpy ROS clock driven as sim time (no DDS needed)."""
import threading
import time

import numpy as np
import pytest

from blockvla_ros.ros.inference_worker import InferenceWorker
from blockvla_ros.ros.inputs import InputStore
from blockvla_ros.ros.stats import RollingWindow, TickMonitor

RGB = np.zeros((4, 4, 3), np.uint8)


def test_hold_reasons_follow_the_inputs():
    store = InputStore(max_instruction_chars=20)
    assert 'no camera image' in store.hold_reason(10.0, 0.5)
    store.reject_image('camera: unknown image encoding')
    assert 'unknown image encoding' in store.hold_reason(10.0, 0.5)
    store.set_image(RGB, 9.9, received=10.0)
    assert store.hold_reason(10.0, 0.5) == 'no instruction'
    assert store.set_instruction('  pick it  ') is None and store.instruction == 'pick it'
    assert store.hold_reason(10.0, 0.5) is None
    assert 'camera stale' in store.hold_reason(10.6, 0.5)
    assert 'in the future' in store.hold_reason(9.0, 0.5)
    obs = store.snapshot()
    assert obs.stamp == 9.9 and obs.instruction == 'pick it' and obs.state is None and obs.image_seq == 1


def test_bad_instructions_clear_the_task():
    store = InputStore(max_instruction_chars=20)
    store.set_image(RGB, 1.0, received=1.0)
    store.set_instruction('go')
    assert 'empty instruction' in store.set_instruction('   ')
    assert store.snapshot() is None and 'empty instruction' in store.hold_reason(1.0, 0.5)
    store.set_instruction('go')
    assert 'longer than max_instruction_chars 20' in store.set_instruction('x' * 21)
    assert store.instruction is None and store.counters.instructions_rejected == 2


def test_zero_stamp_uses_the_receive_time():
    store = InputStore()
    store.set_image(RGB, 0.0, received=5.0)
    assert store.image_age(5.25) == pytest.approx(0.25) and store.counters.images_unstamped == 1


def test_joint_state_selected_by_name_or_prefix():
    named = InputStore(state_dim=2, state_names=['elbow', 'wrist'])
    named.set_image(RGB, 1.0, received=1.0)
    named.set_instruction('go')
    assert 'no usable joint state' in named.hold_reason(1.0, 0.5)
    assert named.set_joint_state(['wrist', 'base', 'elbow'], [0.3, 0.1, 0.2]) is None
    assert np.allclose(named.snapshot().state, [0.2, 0.3])
    assert 'NaN' in named.set_joint_state(['elbow', 'wrist'], [0.1, float('nan')])
    assert named.snapshot() is None and 'NaN' in named.hold_reason(1.0, 0.5)
    assert named.set_joint_state(['elbow', 'wrist'], [0.2, 0.3]) is None
    assert 'names but' in named.set_joint_state(['elbow', 'wrist'], [0.1])
    unnamed = InputStore(state_dim=2)
    assert unnamed.set_joint_state([], [1.0, 2.0, 3.0]) is None
    assert 'needs 2' in unnamed.set_joint_state([], [1.0])


def test_joint_states_from_several_publishers_are_merged_by_name():
    """/joint_states commonly carries several publishers (arm driver, gripper driver, a base): each message holds
    only its own joints. A message without the policy's joints left the state empty, so the node held whenever the
    gripper's message was the newest."""
    store = InputStore(state_dim=3, state_names=['elbow', 'wrist', 'finger'])
    store.set_image(RGB, 1.0, received=1.0)
    store.set_instruction('go')
    assert store.set_joint_state(['elbow', 'wrist'], [0.2, 0.3]) is None  # the arm first: the finger not yet seen
    assert store.snapshot() is None and "['finger']" in store.hold_reason(1.0, 0.5)
    assert store.counters.joint_states_rejected == 0
    assert store.set_joint_state(['finger'], [0.04]) is None
    assert np.allclose(store.snapshot().state, [0.2, 0.3, 0.04])
    assert store.set_joint_state(['wheel_left', 'wheel_right'], [5.0, 6.0]) is None  # none of the policy's joints
    assert store.set_joint_state(['wrist', 'elbow'], [0.5, 0.6]) is None
    assert np.allclose(store.snapshot().state, [0.6, 0.5, 0.04]) and store.hold_reason(1.0, 0.5) is None
    assert 'NaN' in store.set_joint_state(['finger'], [float('inf')])  # a bad value still holds until replaced
    assert store.snapshot() is None and 'finger' in store.hold_reason(1.0, 0.5)
    assert store.set_joint_state(['finger'], [0.01]) is None and np.allclose(store.snapshot().state, [0.6, 0.5, 0.01])


def test_a_joint_state_publisher_that_stops_makes_the_node_hold():
    """A gripper driver that dies leaves its last value behind: without an age check the policy would act on it
    forever. The joint whose publisher went quiet is named; fresh values release the hold."""
    store = InputStore(state_dim=3, state_names=['elbow', 'wrist', 'finger'])
    store.set_image(RGB, 2.0, received=2.0)
    store.set_instruction('go')
    assert store.set_joint_state(['elbow', 'wrist'], [0.2, 0.3], received=1.9) is None
    assert store.set_joint_state(['finger'], [0.04], received=1.4) is None
    assert store.hold_reason(2.0, 0.5, 0.7) is None and store.joint_state_age(2.0) == pytest.approx(0.6)
    assert store.hold_reason(2.0, 0.5) is None  # 0: no age check
    why = store.hold_reason(2.0, 0.5, 0.55)
    assert 'joint state stale (finger)' in why and '0.60 s' in why and 'max_joint_state_age_s 0.55' in why
    assert store.set_joint_state(['finger'], [0.05], received=2.0) is None
    assert store.hold_reason(2.0, 0.5, 0.55) is None
    unnamed = InputStore(state_dim=2)
    unnamed.set_image(RGB, 3.0, received=3.0)
    unnamed.set_instruction('go')
    assert unnamed.set_joint_state([], [1.0, 2.0], received=2.0) is None
    assert 'joint state stale: last received 1.00 s ago' in unnamed.hold_reason(3.0, 0.5, 0.5)


def test_worker_runs_one_job_at_a_time_and_survives_errors():
    errors = []
    worker = InferenceWorker(on_error=errors.append)
    release = threading.Event()
    ran = []
    assert worker.submit(lambda: (release.wait(5), ran.append(1)))
    assert worker.busy and not worker.submit(lambda: ran.append(2)), 'a second job was accepted while busy'
    release.set()
    assert worker.wait_idle(5)
    assert worker.submit(lambda: 1 / 0)
    assert worker.wait_idle(5) and isinstance(errors[0], ZeroDivisionError)
    assert worker.submit(lambda: ran.append(3)) and worker.wait_idle(5)
    assert ran == [1, 3]
    assert worker.stop(5) and not worker.submit(lambda: None)


def test_tick_monitor_counts_missed_ticks():
    monitor = TickMonitor(0.02)
    for t in (0.0, 0.02, 0.04, 0.10, 0.12):  # 0.04 -> 0.10 misses two ticks
        monitor.tick(t)
    assert monitor.missed == 2 and monitor.ticks == 5
    assert monitor.summary_ms()['period_p50_ms'] == pytest.approx(20.0)
    window = RollingWindow(3)
    for v in (1.0, float('nan'), 2.0, 3.0, 4.0):
        window.add(v)
    assert window.values().tolist() == [2.0, 3.0, 4.0] and window.count == 4


def test_control_loop_follows_sim_time_and_restarts_after_a_jump_back():
    from rclpy.clock import ROSClock
    from rclpy.time import Time

    from blockvla_ros.ros.control_loop import ControlLoop

    clock = ROSClock()
    clock._set_ros_time_is_active(True)
    clock.set_ros_time_override(Time(seconds=100))
    ticks = []
    loop = ControlLoop(clock, 0.1, ticks.append, on_error=pytest.fail)
    loop.start()

    def advance_to(seconds, n_before):
        clock.set_ros_time_override(Time(nanoseconds=int(seconds * 1e9)))
        end = time.monotonic() + 5
        while len(ticks) <= n_before and time.monotonic() < end:
            time.sleep(0.005)

    time.sleep(0.05)
    assert ticks == [], 'ticked although sim time stood still'
    for k in range(1, 4):  # sim time moves in whole periods: one tick each
        advance_to(100 + 0.1 * k, len(ticks))
    assert [round(t * 1e-9, 3) for t in ticks] == [100.1, 100.2, 100.3]
    n = len(ticks)
    clock.set_ros_time_override(Time(seconds=50))  # the bag looped: a new grid from 50 s, no tick yet
    time.sleep(0.05)
    assert len(ticks) == n
    advance_to(50.1, n)
    assert round(ticks[-1] * 1e-9, 3) == 50.1
    assert loop.stop(2.0)
    n = len(ticks)
    clock.set_ros_time_override(Time(seconds=60))
    time.sleep(0.05)
    assert len(ticks) == n, 'ticked after stop()'
