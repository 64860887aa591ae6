"""Replay a rosbag through the live policy node on simulated time and record the node's outputs.

    ros2 launch blockvla_ros replay.launch.py bag:=/data/episode_0001 policy:=demo out:=/tmp/replay_0001

Starts (1) the policy node with use_sim_time and autostart, (2) a recorder of the node's outputs
(`ros2 bag record --use-sim-time`), (3) the player: `ros2 bag play --clock` or, with
player:=blockvla, this package's `bag_play` (same behaviour, waits until the node subscribes).
When the player finishes, the launch waits `settle_s` and shuts everything down; the recorder
closes the output bag cleanly. Offline metrics on the same bag: `blockvla-replay` (no ROS needed).
"""
from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess, LogInfo, OpaqueFunction,
                            RegisterEventHandler, TimerAction)
from launch.event_handlers import OnProcessExit
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

ARGUMENTS = [
    ('bag', None, 'Bag to play: a rosbag2 directory (mcap or sqlite3) or a .mcap file.'),
    ('policy', 'demo', 'Policy folder name under policy_dirs (the node parameter `policy`).'),
    ('policy_dirs', '', 'Comma-separated policy directories (empty: the package models/ directory).'),
    ('engine', 'onnxruntime', 'Inference engine: onnxruntime | onnxruntime-cuda | tensorrt | torch.'),
    ('control_rate_hz', '', "Control rate of the node (empty: the rate the policy was trained at)."),
    ('namespace', '', 'Namespace of the policy node (its topics are relative to it).'),
    ('out', 'replay_output', 'Output bag directory for the recorded node outputs (must not exist).'),
    ('storage', 'mcap', 'Storage of the output bag: mcap | sqlite3.'),
    ('rate', '1.0', 'Playback speed factor (1.0 = recorded timing).'),
    ('player', 'ros2', "'ros2' (`ros2 bag play --clock`) or 'blockvla' (this package's bag_play)."),
    ('start_delay_s', '5.0', 'Seconds `ros2 bag play` waits so the node can configure (player:=ros2 only).'),
    ('settle_s', '2.0', 'Seconds to keep running after the player ends, so the last chunks get recorded.'),
    ('record_topics', 'action_chunk,action,/diagnostics',
     'Comma-separated topics to record; relative names are resolved in the node namespace.'),
    ('image_topic', '/camera/image_raw', 'Bag camera topic the node reads (Image, or CompressedImage when it ends '
     'in /compressed); player:=blockvla waits until the node subscribes to it.'),
    ('instruction_topic', '/instruction', 'Bag instruction topic (std_msgs/String) the node reads.'),
    ('instruction_qos', 'auto', "The node's instruction_qos: auto (transient_local when the bag's recorded "
     'publisher offered it, else volatile: bags from other tools often record none), transient_local or volatile.'),
    ('state_topic', '/joint_states', 'Bag proprioception topic (JointState), read by policies with a state.'),
]


def _absolute(topic: str, namespace: str) -> str:
    if topic.startswith('/'):
        return topic
    ns = '/' + namespace.strip('/') if namespace.strip('/') else ''
    return f'{ns}/{topic}'


def _setup(context):
    get = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    dirs = [d for d in get['policy_dirs'].split(',') if d]
    instruction_qos = get['instruction_qos']
    if instruction_qos == 'auto':  # a volatile publisher never matches the node's default transient-local one
        from blockvla_ros.evaluation.live import recorded_instruction_qos

        instruction_qos = recorded_instruction_qos(get['bag'], get['instruction_topic'])
    params = {'policy': get['policy'], 'engine': get['engine'], 'use_sim_time': True, 'autostart': True,
              'camera_topic': get['image_topic'], 'instruction_topic': get['instruction_topic'],
              'joint_states_topic': get['state_topic'], 'instruction_qos': instruction_qos}
    if dirs:  # else the node's default: the package's models/
        params['policy_dirs'] = dirs
    if get['control_rate_hz'].strip():  # else the policy's trained rate
        params['control_rate_hz'] = float(get['control_rate_hz'])
    node = Node(package='blockvla_ros', executable='policy_node', name='blockvla_policy',
                namespace=get['namespace'] or None, parameters=[params], output='screen')
    topics = [_absolute(t.strip(), get['namespace']) for t in get['record_topics'].split(',') if t.strip()]
    recorder = ExecuteProcess(
        cmd=['ros2', 'bag', 'record', '--use-sim-time', '-s', get['storage'], '-o', get['out'], *topics],
        output='screen')
    if get['player'] == 'blockvla':
        player = Node(package='blockvla_ros', executable='bag_play', name='bag_player', output='screen',
                      arguments=[get['bag'], '--rate', get['rate'], '--wait-for-subscribers', get['image_topic'],
                                 get['instruction_topic']])
    elif get['player'] == 'ros2':
        player = ExecuteProcess(cmd=['ros2', 'bag', 'play', get['bag'], '--clock', '--rate', get['rate'],
                                     '--delay', get['start_delay_s']], output='screen')
    else:
        raise ValueError(f"player must be 'ros2' or 'blockvla', got {get['player']!r}")
    stop_after_player = RegisterEventHandler(OnProcessExit(
        target_action=player,
        on_exit=[TimerAction(period=float(get['settle_s']),
                             actions=[EmitEvent(event=Shutdown(reason='bag playback finished'))])]))
    stop_if_node_dies = RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_node_exited))
    return [node, recorder, player, stop_after_player, stop_if_node_dies]


def _node_exited(event, context):
    """The policy node ended before the player: nothing more can be recorded, so stop everything and say why."""
    reason = f'the policy node exited with code {event.returncode} before the bag finished; see its log above'
    return [LogInfo(msg=reason), EmitEvent(event=Shutdown(reason=reason))]


def generate_launch_description():
    declared = [DeclareLaunchArgument(name, description=desc, **({} if default is None else {'default_value': default}))
                for name, default, desc in ARGUMENTS]
    return LaunchDescription([*declared, OpaqueFunction(function=_setup)])
