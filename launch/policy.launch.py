"""Launch the blockvla_policy lifecycle node, then configure and activate it.

    ros2 launch blockvla_ros policy.launch.py policy:=demo camera_topic:=/cam/image_raw

One source of truth: the parameters file (params_file, default config/policy_node.yaml). A launch argument is
passed to the node only when it is given on the command line, and then overrides that file; every argument left
empty leaves the file's value in force. With autostart:=false the node stays unconfigured; drive it with
`ros2 lifecycle set /blockvla_policy configure` and `... activate`.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, OpaqueFunction, RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

# Node parameters settable from the command line: passed only when given (empty: the parameters file decides).
NODE_ARGUMENTS = (
    ('policy', str, 'Policy folder name (or a path inside policy_dirs) to run. Default: the parameters file '
     '(demo).'),
    ('engine', str, 'Inference backend: onnxruntime | onnxruntime-cuda | tensorrt | torch. Default: the '
     'parameters file.'),
    ('torch_dtype', str, 'Weights and cache dtype of engine torch: float32 | bfloat16 | float16. Default: the '
     'parameters file (float32).'),
    ('control_rate_hz', float, 'Control rate of the action topics (Hz). Default: the parameters file, whose 0 '
     'means the rate the policy was trained at.'),
    ('camera_topic', str, 'Camera topic; a name ending in /compressed subscribes to sensor_msgs/CompressedImage. '
     'Default: the parameters file.'),
    ('use_sim_time', bool, 'Use /clock (for example from a bag played with --clock). Default: false.'),
)
OTHER_ARGUMENTS = (
    ('params_file', PathJoinSubstitution([FindPackageShare('blockvla_ros'), 'config', 'policy_node.yaml']),
     'YAML file with the node parameters: the one source of truth (given arguments above override it).'),
    ('namespace', '', 'Namespace of the node and of its relative topics.'),
    ('autostart', 'true', 'Configure and activate the node once it is up.'),
)


def given_parameters(values: dict) -> dict:
    """The node parameters among ``values`` (argument name -> text) that were given, converted to their types."""
    out = {}
    for name, kind, _ in NODE_ARGUMENTS:
        text = str(values.get(name, '')).strip()
        if not text:
            continue
        if kind is bool:
            if text.lower() not in ('true', 'false'):
                raise ValueError(f'{name} must be true or false, got {text!r}')
            out[name] = text.lower() == 'true'
        else:
            out[name] = kind(text)
    return out


def _node_and_transitions(context):
    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in NODE_ARGUMENTS}
    overrides = given_parameters(values)
    overrides['autostart'] = False  # this file drives the lifecycle
    node = LifecycleNode(
        package='blockvla_ros',
        executable='policy_node',
        name='blockvla_policy',
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        emulate_tty=True,
        parameters=[LaunchConfiguration('params_file'), overrides],
    )
    autostart = IfCondition(LaunchConfiguration('autostart'))
    configure = EmitEvent(
        event=ChangeState(lifecycle_node_matcher=matches_action(node),
                          transition_id=Transition.TRANSITION_CONFIGURE),
        condition=autostart)
    activate_when_configured = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=node, start_state='configuring', goal_state='inactive',
            entities=[
                LogInfo(msg='blockvla_policy configured; activating'),
                EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                            transition_id=Transition.TRANSITION_ACTIVATE)),
            ]),
        condition=autostart)
    report_failed_configure = RegisterEventHandler(
        OnStateTransition(
            target_lifecycle_node=node, start_state='configuring', goal_state='unconfigured',
            entities=[LogInfo(msg='blockvla_policy failed to configure: see its log and /diagnostics')]))
    return [activate_when_configured, report_failed_configure, node, configure]


def generate_launch_description():
    arguments = [DeclareLaunchArgument(name, default_value='', description=description)
                 for name, _, description in NODE_ARGUMENTS]
    arguments += [DeclareLaunchArgument(name, default_value=default, description=description)
                  for name, default, description in OTHER_ARGUMENTS]
    return LaunchDescription([*arguments, OpaqueFunction(function=_node_and_transitions)])
