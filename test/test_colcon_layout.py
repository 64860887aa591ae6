"""`colcon build` of a workspace holding this package gives the install layout a ROS 2 user relies on.

The package is copied as a clone would have it (git's tracked and unignored files) into <tmp>/ws/src, then
`colcon build --base-paths src` runs exactly as on a machine with ROS 2 (colcon-ros picks the ament_python
build type from package.xml).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = 'blockvla_ros'
EXECUTABLES = ('policy_node', 'bag_play', 'blockvla-bag-play', 'blockvla-train', 'blockvla-export',
               'blockvla-replay', 'blockvla-task')

pytestmark = pytest.mark.slow


def _colcon() -> str:
    exe = Path(sys.executable).with_name('colcon')
    if exe.is_file():
        return str(exe)
    found = shutil.which('colcon')
    if not found:
        pytest.skip('colcon is not installed (pip install colcon-common-extensions)')
    return found


def _clone_files() -> list:
    out = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=REPO, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split('\0') if f and (REPO / f).is_file()]


@pytest.fixture(scope='module')
def install(tmp_path_factory):
    ws = tmp_path_factory.mktemp('ws')
    src = ws / 'src' / PACKAGE
    for rel in _clone_files():
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')
    proc = subprocess.run([_colcon(), 'build', '--base-paths', 'src', '--build-base', 'build',
                           '--install-base', 'install', '--event-handlers', 'console_cohesion+'],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'colcon build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
    return ws / 'install' / PACKAGE


def test_share_holds_package_xml_launch_and_config(install):
    share = install / 'share' / PACKAGE
    assert (share / 'package.xml').read_text() == (REPO / 'package.xml').read_text()
    assert (share / 'launch' / 'policy.launch.py').is_file()
    assert (share / 'config' / 'policy_node.yaml').is_file()
    for src in (REPO / 'launch').glob('*.launch.py'):
        assert (share / 'launch' / src.name).is_file(), f'{src.name} is not installed'
    for src in (REPO / 'config').glob('*.yaml'):
        assert (share / 'config' / src.name).is_file(), f'{src.name} is not installed'


def test_ament_index_marker(install):
    marker = install / 'share' / 'ament_index' / 'resource_index' / 'packages' / PACKAGE
    assert marker.is_file()


def test_executables_are_where_ros2_run_looks(install):
    lib = install / 'lib' / PACKAGE
    for name in EXECUTABLES:
        exe = lib / name
        assert exe.is_file(), f'lib/{PACKAGE}/{name} missing (setup.cfg script_dir / install_scripts?)'
        assert os.access(exe, os.X_OK), f'lib/{PACKAGE}/{name} is not executable'


def test_installed_package_imports_and_finds_its_share(install):
    site = next(install.glob('lib/python3*/site-packages'))
    env = dict(os.environ, PYTHONPATH=str(site), AMENT_PREFIX_PATH=str(install))
    code = ('import blockvla_ros.ros.policy_node as n, ament_index_python.packages as a; '
            "print(n.__file__); print(a.get_package_share_directory('blockvla_ros'))")
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=install, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    module_file, share = out.stdout.split()
    assert Path(module_file).is_relative_to(site), f'imported {module_file}, not the installed copy'
    assert Path(share) == install / 'share' / PACKAGE
    # data the code reads at run time travels with the installed package
    ops = Path(module_file).parent.parent / 'export' / 'tensorrt_onnx_ops.txt'
    assert ops.is_file(), 'export/tensorrt_onnx_ops.txt is not installed (setup.py package_data)'


def _installed_env(install):
    site = next(install.glob('lib/python3*/site-packages'))
    return dict(os.environ, PYTHONPATH=str(site), AMENT_PREFIX_PATH=str(install), PYTHONDONTWRITEBYTECODE='1')


def test_installed_code_finds_models_and_data_in_share(install):
    code = ('from blockvla_ros.paths import package_data_dir; from blockvla_ros.ros.params import default_policy_dirs; '
            "print(package_data_dir('models')); print(package_data_dir('data')); print(default_policy_dirs()[0])")
    out = subprocess.run([sys.executable, '-c', code], env=_installed_env(install), cwd=install, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    models, data, policy_dir = out.stdout.split()
    share = install / 'share' / PACKAGE
    assert Path(models) == Path(policy_dir) == share / 'models' and Path(data) == share / 'data'
    assert (share / 'models' / 'demo' / 'policy.yaml').is_file()
    assert any((share / 'data' / 'demo_recording').iterdir()), 'the demo recording is not installed'


def test_installed_policy_node_runs_the_demo_as_ros2_run_starts_it(install):
    """`ros2 run blockvla_ros policy_node --ros-args -p autostart:=true`: lib/blockvla_ros/policy_node, no
    policy_dirs: it finds share/blockvla_ros/models/demo and goes active at the demo's 10 Hz."""
    rclpy = pytest.importorskip('rclpy')
    from diagnostic_msgs.msg import DiagnosticArray

    domain = 100 + (os.getpid() + 71) % 100
    env = dict(_installed_env(install), ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    proc = subprocess.Popen([str(install / 'lib' / PACKAGE / 'policy_node'), '--ros-args', '-p', 'autostart:=true',
                             '-p', 'diagnostics_period_s:=0.2'], env=env, cwd=install, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    node = rclpy.create_node('colcon_probe', context=context)
    seen = {}

    def on_diag(msg):
        for status in msg.status:
            if status.name.endswith(': policy'):
                seen.update({kv.key: kv.value for kv in status.values})

    node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, 10)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        end = time.monotonic() + 90
        while seen.get('lifecycle_state') != 'active' and time.monotonic() < end and proc.poll() is None:
            executor.spin_once(timeout_sec=0.1)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert seen.get('lifecycle_state') == 'active', (seen, out[-3000:])
    assert seen['policy_folder'] == str(install / 'share' / PACKAGE / 'models' / 'demo')
    assert float(seen['control_rate_hz']) == 10.0
    assert proc.returncode == 0 and 'Traceback' not in out, out[-3000:]


def test_installed_launch_files_load(install):
    """Every installed launch file compiles; with launch_ros importable it also loads with the launch API."""
    files = sorted((install / 'share' / PACKAGE / 'launch').glob('*.launch.py'))
    assert files
    for path in files:
        compile(path.read_text(), str(path), 'exec')
    try:
        import launch  # noqa: F401
        import launch_ros  # noqa: F401
        from launch.launch_description_sources import PythonLaunchDescriptionSource
    except ImportError:
        pytest.skip('launch / launch_ros are not installed (not on PyPI; they come with a ROS 2 distribution)')
    for path in files:
        description = PythonLaunchDescriptionSource(str(path)).try_get_launch_description_without_context()
        assert description is not None and description.entities, path.name
