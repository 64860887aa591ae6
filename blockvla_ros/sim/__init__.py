"""Meta-World (MuJoCo) through this package: an environment wrapper with fixed fast rendering, expert recordings
as rosbag2, closed-loop evaluation through PolicyRunner or through ROS 2 (the sim bridge node lives in
blockvla_ros.ros.sim_bridge_node, the only place that touches rclpy). Optional: `pip install .[sim]`.
Nothing outside this package imports it; its modules import metaworld/mujoco only when used."""
