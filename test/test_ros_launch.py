"""launch/policy.launch.py loads with the launch / launch_ros API of the installed ROS 2 (skipped without it)."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip('launch_ros', reason='launch_ros is not installed (no ROS 2 launch here)')
pytest.importorskip('launch.actions', reason='the launch package is not installed')

LAUNCH_FILE = Path(__file__).resolve().parents[1] / 'launch' / 'policy.launch.py'
ARGUMENTS = ('policy', 'engine', 'control_rate_hz', 'camera_topic', 'params_file', 'namespace', 'use_sim_time')


def _description():
    spec = importlib.util.spec_from_file_location('policy_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


def test_arguments_are_declared_with_descriptions():
    from launch.actions import DeclareLaunchArgument

    description = _description()
    declared = {a.name: a for a in description.entities if isinstance(a, DeclareLaunchArgument)}
    for name in ARGUMENTS:
        assert name in declared, f'launch argument {name!r} is not declared'
        assert declared[name].description and 'no description' not in declared[name].description.lower()


def _module():
    spec = importlib.util.spec_from_file_location('policy_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lifecycle_node_is_configured_and_activated():
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, EmitEvent, RegisterEventHandler
    from launch_ros.actions import LifecycleNode

    module = _module()
    context = LaunchContext()
    for entity in module.generate_launch_description().entities:
        if isinstance(entity, DeclareLaunchArgument) and entity.name not in ('params_file',):
            entity.visit(context)  # params_file's default needs the installed package
    entities = module._node_and_transitions(context)
    nodes = [e for e in entities if isinstance(e, LifecycleNode)]
    assert len(nodes) == 1
    assert nodes[0].node_package == 'blockvla_ros' and nodes[0].node_executable == 'policy_node'
    assert any(isinstance(e, EmitEvent) for e in entities), 'no configure event'
    assert any(isinstance(e, RegisterEventHandler) for e in entities), 'no activate handler'


def test_only_given_arguments_override_the_parameters_file():
    module = _module()
    assert module.given_parameters({'policy': '', 'engine': '', 'control_rate_hz': '', 'camera_topic': ''}) == {}
    given = module.given_parameters({'policy': 'pick_v2', 'control_rate_hz': '15', 'use_sim_time': 'true'})
    assert given == {'policy': 'pick_v2', 'control_rate_hz': 15.0, 'use_sim_time': True}


def test_launch_file_resolves_in_a_launch_context():
    """Visiting the description evaluates every substitution (package share, parameters file, arguments)."""
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument

    pytest.importorskip('ament_index_python')
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        get_package_share_directory('blockvla_ros')
    except PackageNotFoundError:
        pytest.skip('blockvla_ros is not installed in an ament prefix (colcon build + source install/setup.bash)')
    description = _description()
    context = LaunchContext()
    for entity in description.entities:
        if isinstance(entity, DeclareLaunchArgument):
            entity.visit(context)
    assert context.launch_configurations['policy'] == ''  # not given: config/policy_node.yaml decides
    assert context.launch_configurations['params_file'].endswith('config/policy_node.yaml')
