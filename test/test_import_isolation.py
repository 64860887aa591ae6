"""Only blockvla_ros.ros imports rclpy or message packages; the ONNX runtime path never imports torch."""
import pkgutil
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
