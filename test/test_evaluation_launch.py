"""launch/replay.launch.py: launch_ros is not installed here, so check what can be checked without it:
it compiles, every argument carries a description, and it starts player, node and recorder."""
import ast
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / 'launch' / 'replay.launch.py'


def test_replay_launch_arguments_are_described():
    source = LAUNCH.read_text()
    tree = ast.parse(source)
    compile(tree, str(LAUNCH), 'exec')
    [arguments] = [ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == 'ARGUMENTS']
    names = [name for name, _, _ in arguments]
    assert len(names) == len(set(names))
    assert {'bag', 'policy', 'out', 'rate', 'player', 'record_topics', 'instruction_qos'} <= set(names)
    assert all(isinstance(desc, str) and len(desc) > 15 for _, _, desc in arguments)
    for needle in ("'ros2', 'bag', 'record', '--use-sim-time'", "'ros2', 'bag', 'play'", "'--clock'",
                   "executable='policy_node'", "executable='bag_play'", "'use_sim_time': True", 'Shutdown(',
                   "'instruction_qos': instruction_qos", 'recorded_instruction_qos('):
        assert needle in source, needle
