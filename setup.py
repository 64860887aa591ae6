"""ament_python build for blockvla_ros (also installs with plain pip)."""
import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'blockvla_ros'


def _tree(src_root, dest_root):
    """data_files entries that mirror every file under src_root into share/<pkg>/dest_root."""
    entries = []
    for dirpath, _dirs, files in os.walk(src_root):
        files = [os.path.join(dirpath, f) for f in files if not f.endswith('.engine')]
        if files:
            rel = os.path.relpath(dirpath, src_root)
            dest = os.path.normpath(os.path.join('share', PACKAGE, dest_root, rel))
            entries.append((dest, files))
    return entries


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*', 'benchmarks']),
    package_data={'blockvla_ros.export': ['tensorrt_onnx_ops.txt']},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', glob('config/*.yaml')),
        ('share/' + PACKAGE + '/config/train', glob('config/train/*.yaml')),
        *_tree('models', 'models'),
        *_tree('data/demo_recording', 'data/demo_recording'),  # what `python -m blockvla_ros.demo` plays
    ],
    install_requires=['setuptools'],
    # Meta-World simulation (blockvla_ros/sim, `blockvla-sim`, the sim bridge node): metaworld pins mujoco 3.3.0.
    # Off-screen rendering also needs EGL (apt: libegl1 libegl-mesa0 libgl1-mesa-dri) or OSMesa (libosmesa6).
    extras_require={'sim': ['metaworld==3.1.1', 'mujoco==3.3.0', 'packaging']},
    zip_safe=True,
    maintainer='blockvla_ros maintainers',
    maintainer_email='maintainers@blockvla-ros.dev',
    description='BlockVLA block-diffusion robot policies as a ROS 2 node (ONNX Runtime / TensorRT)',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'policy_node = blockvla_ros.ros.policy_node:main',
            'bag_play = blockvla_ros.ros.bag_player_node:main',
            'blockvla-bag-play = blockvla_ros.ros.bag_player_node:main',
            'blockvla-train = blockvla_ros.training.cli:main',
            'blockvla-export = blockvla_ros.export.cli:main',
            'blockvla-replay = blockvla_ros.evaluation.cli:main',
            'blockvla-live-replay = blockvla_ros.evaluation.live:main',
            'bag_record = blockvla_ros.ros.bag_recorder_node:main',
            'blockvla-task = blockvla_ros.tasks.cli:main',
            'blockvla-sim = blockvla_ros.sim.cli:main',
            'sim_bridge = blockvla_ros.ros.sim_bridge_node:main',
        ],
    },
)
