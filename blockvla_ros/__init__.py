"""blockvla_ros: BlockVLA block-diffusion robot policies for ROS 2.

Subpackages (dependencies point one way):
    model/       torch + transformers: config, action tokenizer, policy module, masks, losses
    runtime/     backend-agnostic decode loop, KV cache, engines (torch | onnxruntime | tensorrt)
    export/      torch -> ONNX (vision + one backbone graph, each weight once) -> TensorRT, writes a policy folder
    training/    finetuning from rosbag2 demonstrations
    io/          ROS-free message <-> numpy conversion and rosbag2 reading/writing (rosbags)
    tasks/       the built-in tabletop benchmark task and its scripted expert
    evaluation/  offline bag replay, metrics, plots, reports
    ros/         the only code that imports rclpy or message packages
"""
__version__ = '0.1.0'
