"""Launch the blockvla_policy lifecycle node, then configure and activate it.

    ros2 launch blockvla_ros policy.launch.py policy:=demo engine:=onnxruntime camera_topic:=/cam/image_raw

Launch arguments override the parameters file. With autostart:=false the node stays unconfigured; drive it with
`ros2 lifecycle set /blockvla_policy configure` and `... activate`.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, LogInfo, RegisterEventHandler
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

ARGUMENTS = (
    ('policy', 'demo', 'Policy folder name (or a path inside policy_dirs) to run.'),
    ('engine', 'onnxruntime', 'Inference backend: onnxruntime | onnxruntime-cuda | tensorrt | torch.'),
    ('control_rate_hz', '50.0', 'Control rate of the action and action_chunk topics (Hz).'),
    ('camera_topic', 'camera/image_raw', 'Camera topic; a name ending in /compressed subscribes to '
     'sensor_msgs/CompressedImage.'),
    ('params_file', PathJoinSubstitution([FindPackageShare('blockvla_ros'), 'config', 'policy_node.yaml']),
     'YAML file with the node parameters (the arguments here override it).'),
    ('namespace', '', 'Namespace of the node and of its relative topics.'),
    ('use_sim_time', 'false', 'Use /clock (for example from a bag played with --clock).'),
    ('autostart', 'true', 'Configure and activate the node once it is up.'),
)


def generate_launch_description():
    arguments = [DeclareLaunchArgument(name, default_value=default, description=description)
                 for name, default, description in ARGUMENTS]
    node = LifecycleNode(
        package='blockvla_ros',
        executable='policy_node',
        name='blockvla_policy',
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        emulate_tty=True,
        parameters=[
            LaunchConfiguration('params_file'),
            {
                'policy': ParameterValue(LaunchConfiguration('policy'), value_type=str),
                'engine': ParameterValue(LaunchConfiguration('engine'), value_type=str),
                'control_rate_hz': ParameterValue(LaunchConfiguration('control_rate_hz'), value_type=float),
                'camera_topic': ParameterValue(LaunchConfiguration('camera_topic'), value_type=str),
                'use_sim_time': ParameterValue(LaunchConfiguration('use_sim_time'), value_type=bool),
                'autostart': False,  # this file drives the lifecycle
            },
        ],
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
    return LaunchDescription([*arguments, activate_when_configured, report_failed_configure, node, configure])
