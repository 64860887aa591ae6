"""`colcon build` of a workspace holding this package gives the install layout a ROS 2 user relies on.

The package is copied as a clone would have it (git's tracked and unignored files) into <tmp>/ws/src, then
`colcon build --base-paths src` runs exactly as on a machine with ROS 2 (colcon-ros picks the ament_python
build type from package.xml).
"""
import os
import shutil
import subprocess
import sys
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
