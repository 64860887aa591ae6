"""Only blockvla_ros.ros imports rclpy or message packages (the sim bridge node included: it lives in ros/);
the Meta-World extra (blockvla_ros.sim) imports metaworld/mujoco only when used, and nothing outside it and the
bridge imports it; the ONNX runtime path never imports torch."""
import pkgutil
from pathlib import Path
import subprocess
import sys

import blockvla_ros

ROS_MODULES = ('rclpy', 'sensor_msgs', 'std_msgs', 'trajectory_msgs', 'diagnostic_msgs', 'lifecycle_msgs',
               'rosgraph_msgs', 'builtin_interfaces')


def _all_modules_except_ros():
    names = []
    for info in pkgutil.walk_packages(blockvla_ros.__path__, 'blockvla_ros.'):
        if info.name.startswith('blockvla_ros.ros') or info.name == 'blockvla_ros.demo':
            continue
        names.append(info.name)
    return names


def test_nothing_outside_ros_loads_rclpy_or_messages():
    names = _all_modules_except_ros()
    assert 'blockvla_ros.model.policy' in names and 'blockvla_ros.runtime.decoding' in names
    code = ('import importlib, sys\n'
            f'for n in {names!r}: importlib.import_module(n)\n'
            f'bad = [m for m in sys.modules if m.split(".")[0] in {ROS_MODULES!r}]\n'
            'print(",".join(bad))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == '', f'ROS modules imported outside blockvla_ros.ros: {out.stdout.strip()}'


def test_the_sim_extra_is_optional_and_only_the_bridge_uses_it():
    names = _all_modules_except_ros()
    sim = [n for n in names if n.startswith('blockvla_ros.sim')]
    assert 'blockvla_ros.sim.env' in sim and 'blockvla_ros.sim.cli' in sim
    others = [n for n in names if n not in sim]
    code = ('import importlib, sys\n'
            f'for n in {others!r}: importlib.import_module(n)\n'
            'print(",".join(m for m in sys.modules if m.startswith("blockvla_ros.sim")))\n'
            f'for n in {sim!r}: importlib.import_module(n)\n'
            'print(",".join(m for m in sys.modules if m.split(".")[0] in ("metaworld", "mujoco", "gymnasium")))\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    sim_loaded, heavy = out.stdout.split('\n')[:2]
    assert sim_loaded == '', f'blockvla_ros.sim imported outside the sim package: {sim_loaded}'
    assert heavy == '', f'importing blockvla_ros.sim loaded {heavy} (import it where used)'
    bridge = (Path(blockvla_ros.__file__).parent / 'ros' / 'sim_bridge_node.py').read_text()
    assert 'blockvla_ros.sim' in bridge  # the one ROS module that uses the sim package
