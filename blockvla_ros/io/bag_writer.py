"""Write robot-like rosbag2 recordings (camera, instruction, joint states, commanded action) with `rosbags`.

Pure Python (no rclpy). Conventions every reader in this package relies on:
- an observation (image, state) and the action computed from it carry the SAME header stamp;
- the bag receive time of every message equals its stamp (Float32MultiArray has no header: only the
  receive time carries it);
- the bag appears at `path` only when the writer closes cleanly (written in a temporary sibling directory,
  then renamed); a writer that exits with an exception leaves nothing at `path`.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

logger = logging.getLogger(__name__)

STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
IMAGE_FORMATS = ('raw', 'jpeg', 'png')
ACTION_MSGS = {
    'JointTrajectory': 'trajectory_msgs/msg/JointTrajectory',
    'JointState': 'sensor_msgs/msg/JointState',
    'Float32MultiArray': 'std_msgs/msg/Float32MultiArray',
}
# image_transport's convention: "<original encoding>; <codec> compressed <encoding of the compressed bytes>"
COMPRESSED_FORMATS = {'jpeg': 'rgb8; jpeg compressed bgr8', 'png': 'rgb8; png compressed bgr8'}
CAMERA_FRAME = 'camera'
_TOPIC_RE = re.compile(r'^(/[A-Za-z_][A-Za-z0-9_]*)+$')
_UNSET = QosTime(0, 0)  # rmw "unspecified": the middleware default (infinite)


@dataclass(frozen=True)
class TopicNames:
    """Topic names of a recording (defaults look like a robot's); the image topic depends on the format."""

    image: str = '/camera/image_raw'                         # sensor_msgs/Image, rgb8
    compressed_image: str = '/camera/image_raw/compressed'   # sensor_msgs/CompressedImage
    instruction: str = '/instruction'                        # std_msgs/String
    state: str = '/joint_states'                             # sensor_msgs/JointState
    action: str = '/joint_command'                           # see ACTION_MSGS

    def __post_init__(self):
        for f in fields(self):
            name = getattr(self, f.name)
            if not isinstance(name, str) or not _TOPIC_RE.match(name):
                raise ValueError(f'TopicNames.{f.name}: {name!r} is not an absolute ROS topic name')

    def image_topic(self, image_format: str) -> str:
        """The camera topic for 'raw' (Image) or 'jpeg'/'png' (CompressedImage)."""
        return self.image if image_format == 'raw' else self.compressed_image


def _qos(depth: int, durability: QosDurability) -> list[Qos]:
    return [Qos(QosHistory.KEEP_LAST, depth, QosReliability.RELIABLE, durability, _UNSET, _UNSET,
                QosLiveliness.AUTOMATIC, _UNSET, False)]


class RecordingWriter:
    """Context manager writing one rosbag2 recording. Topics are fixed at open; `counts` tells what was written.

    >>> with RecordingWriter('out/ep0', storage='mcap') as w:
    ...     w.write_instruction(t, 'touch the red block'); w.write_image(t, rgb)
    ...     w.write_state(t, ee_xy, ['ee_x', 'ee_y']); w.write_action(t, action, ['ee_dx', 'ee_dy', 'gripper'])
    """

    def __init__(self, path, storage: str = 'mcap', image_format: str = 'raw',
                 action_msg: str = 'JointTrajectory', topics: TopicNames | None = None, version: int = 9,
                 jpeg_quality: int = 95):
        if storage not in STORAGES:
            raise ValueError(f'storage must be one of {sorted(STORAGES)}, got {storage!r}')
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f'image_format must be one of {list(IMAGE_FORMATS)}, got {image_format!r}')
        if action_msg not in ACTION_MSGS:
            raise ValueError(f'action_msg must be one of {sorted(ACTION_MSGS)}, got {action_msg!r}')
        if version not in (8, 9):
            raise ValueError(f'rosbag2 version must be 8 or 9, got {version!r}')
        if not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f'jpeg_quality must be in [1, 100], got {jpeg_quality!r}')
        self.path = Path(path)
        if self.path.exists() or self.path.is_symlink():
            raise FileExistsError(f'recording path {self.path} already exists; choose a new path or delete it')
        self.storage = storage
        self.image_format = image_format
        self.action_msg = action_msg
        self.topics = topics or TopicNames()
        self.version = version
        self.jpeg_quality = int(jpeg_quality)
        self.counts: Counter[str] = Counter()   # topic -> messages written
        self._ts = get_typestore(Stores.ROS2_HUMBLE)
        self._writer: Writer | None = None
        self._tmp: Path | None = None
        self._conns = {}

    # --- lifecycle -------------------------------------------------------------------------------------
    def open(self) -> RecordingWriter:
        if self._writer is not None:
            raise RuntimeError(f'recording {self.path} is already open')
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f'.{self.path.name}.', suffix='.tmp', dir=self.path.parent))
        try:
            # The bag directory inside the temp dir already has its final name, so its files do too.
            self._writer = Writer(self._tmp / self.path.name, version=self.version,
                                  storage_plugin=STORAGES[self.storage])
            self._writer.open()
            t = self.topics
            image_type = 'sensor_msgs/msg/Image' if self.image_format == 'raw' else 'sensor_msgs/msg/CompressedImage'
            plan = [
                ('image', t.image_topic(self.image_format), image_type, _qos(10, QosDurability.VOLATILE)),
                # transient-local, so a late subscriber during `ros2 bag play` still gets the instruction
                ('instruction', t.instruction, 'std_msgs/msg/String', _qos(1, QosDurability.TRANSIENT_LOCAL)),
                ('state', t.state, 'sensor_msgs/msg/JointState', _qos(10, QosDurability.VOLATILE)),
                ('action', t.action, ACTION_MSGS[self.action_msg], _qos(10, QosDurability.VOLATILE)),
            ]
            for key, topic, msgtype, qos in plan:
                self._conns[key] = self._writer.add_connection(topic, msgtype, typestore=self._ts,
                                                               offered_qos_profiles=qos)
        except BaseException:
            self.abort()
            raise
        return self

    def close(self) -> Path:
        """Finish the bag and move it to `path`; returns `path`."""
        writer, self._writer = self._writer, None
        if writer is None:
            raise RuntimeError(f'recording {self.path} is not open')
        try:
            writer.close()
            if self.path.exists() or self.path.is_symlink():
                raise FileExistsError(f'recording path {self.path} appeared while writing; not overwriting it')
            os.rename(self._tmp / self.path.name, self.path)
        finally:
            self._remove_tmp()
        logger.info('wrote %s (%s)', self.path, dict(self.counts))
        return self.path

    def abort(self) -> None:
        """Drop everything written; nothing is left at `path`."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:  # the temp dir is removed below anyway
                logger.debug('rosbags abort failed for %s', self.path, exc_info=True)
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> RecordingWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def set_metadata(self, key: str, value: str) -> None:
        """Store a string pair under `custom_data` in the bag's metadata.yaml."""
        if self._writer is None:
            raise RuntimeError(f'recording {self.path} is not open')
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ValueError(f'recording {self.path}: metadata key and value must be str, got {key!r}: {value!r}')
        self._writer.set_custom_data(key, value)

    # --- messages --------------------------------------------------------------------------------------
    def write_image(self, t_ns: int, rgb: np.ndarray) -> None:
        """rgb: [H, W, 3] uint8 RGB."""
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
            raise ValueError(f'{self._topic("image")}: image must be [H, W, 3] uint8 RGB, '
                             f'got {rgb.dtype} {rgb.shape}')
        header = self._header(t_ns, CAMERA_FRAME)
        types = self._ts.types
        if self.image_format == 'raw':
            h, w, _ = rgb.shape
            msg = types['sensor_msgs/msg/Image'](
                header=header, height=h, width=w, encoding='rgb8', is_bigendian=0, step=w * 3,
                data=np.ascontiguousarray(rgb).reshape(-1))     # [H*W*3]
        else:
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            ext, params = ('.jpg', [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]) \
                if self.image_format == 'jpeg' else ('.png', [])
            ok, buf = cv2.imencode(ext, bgr, params)
            if not ok:
                raise ValueError(f'{self._topic("image")}: OpenCV could not encode the image as {self.image_format}')
            msg = types['sensor_msgs/msg/CompressedImage'](
                header=header, format=COMPRESSED_FORMATS[self.image_format], data=buf.reshape(-1))
        self._write('image', t_ns, msg)

    def write_instruction(self, t_ns: int, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f'{self._topic("instruction")}: instruction must be a non-empty str, got {text!r}')
        self._write('instruction', t_ns, self._ts.types['std_msgs/msg/String'](data=text))

    def write_state(self, t_ns: int, position, names) -> None:
        """sensor_msgs/JointState with `names` and `position` (velocity and effort empty)."""
        pos = self._vector('state', position, names)
        empty = np.zeros(0, dtype=np.float64)
        msg = self._ts.types['sensor_msgs/msg/JointState'](
            header=self._header(t_ns, ''), name=list(names), position=pos, velocity=empty, effort=empty)
        self._write('state', t_ns, msg)

    def write_action(self, t_ns: int, action, names) -> None:
        """The commanded action as the configured message type (see ACTION_MSGS).

        JointTrajectory: one point, positions = action, time_from_start = 0. JointState: position = action.
        Float32MultiArray: one dimension whose label is the comma-joined names."""
        vec = self._vector('action', action, names)
        types = self._ts.types
        empty = np.zeros(0, dtype=np.float64)
        if self.action_msg == 'JointTrajectory':
            point = types['trajectory_msgs/msg/JointTrajectoryPoint'](
                positions=vec, velocities=empty, accelerations=empty, effort=empty,
                time_from_start=types['builtin_interfaces/msg/Duration'](sec=0, nanosec=0))
            msg = types['trajectory_msgs/msg/JointTrajectory'](
                header=self._header(t_ns, ''), joint_names=list(names), points=[point])
        elif self.action_msg == 'JointState':
            msg = types['sensor_msgs/msg/JointState'](
                header=self._header(t_ns, ''), name=list(names), position=vec, velocity=empty, effort=empty)
        else:
            dim = types['std_msgs/msg/MultiArrayDimension'](label=','.join(names), size=len(vec), stride=len(vec))
            msg = types['std_msgs/msg/Float32MultiArray'](
                layout=types['std_msgs/msg/MultiArrayLayout'](dim=[dim], data_offset=0),
                data=vec.astype(np.float32))
        self._write('action', t_ns, msg)

    # --- helpers ---------------------------------------------------------------------------------------
    def _topic(self, key: str) -> str:
        t = self.topics
        return {'image': t.image_topic(self.image_format), 'instruction': t.instruction,
                'state': t.state, 'action': t.action}[key]

    def _vector(self, key: str, values, names) -> np.ndarray:
        vec = np.asarray(values, dtype=np.float64).reshape(-1)
        names = list(names) if isinstance(names, (list, tuple)) else None
        if names is None or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f'{self._topic(key)}: names must be a list of non-empty str, got {names!r}')
        if len(names) != vec.size:
            raise ValueError(f'{self._topic(key)}: {vec.size} values but {len(names)} names {names}')
        if not np.all(np.isfinite(vec)):
            raise ValueError(f'{self._topic(key)}: non-finite value in {vec.tolist()}')
        return vec

    def _header(self, t_ns: int, frame_id: str):
        sec, nanosec = divmod(self._check_time(t_ns), 1_000_000_000)
        types = self._ts.types
        return types['std_msgs/msg/Header'](
            stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id=frame_id)

    def _check_time(self, t_ns) -> int:
        if isinstance(t_ns, bool) or not isinstance(t_ns, (int, np.integer)) or t_ns < 0:
            raise ValueError(f'recording {self.path}: t_ns must be a non-negative int (nanoseconds), got {t_ns!r}')
        return int(t_ns)

    def _write(self, key: str, t_ns: int, msg) -> None:
        if self._writer is None:
            raise RuntimeError(f'recording {self.path} is not open; use it as a context manager')
        self._writer.write(self._conns[key], self._check_time(t_ns), self._ts.serialize_cdr(msg, msg.__msgtype__))
        self.counts[self._topic(key)] += 1
