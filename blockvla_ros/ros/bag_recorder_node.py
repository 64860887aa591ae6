"""Record topics into a rosbag2 bag (mcap or sqlite3) with rosbags: `ros2 bag record` where it is missing.

Each topic is subscribed as soon as a publisher shows its type, with QoS adapted to the publishers
(best effort if any publisher is, transient-local if all are). Messages are stored as received
(CDR bytes) and stamped with the node clock (sim time with ``use_sim_time:=true``). The bag
appears at ``--out`` only when the recorder stops cleanly (Ctrl-C / SIGTERM included): it is
written in a temporary sibling directory and renamed.

    python -m blockvla_ros.ros.bag_recorder_node --out OUT TOPIC [TOPIC ...] [--ready-file F]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import rclpy
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from blockvla_ros.io.atomic import atomic_write_text
from blockvla_ros.ros.bag_player_node import message_class

STORAGES = ('mcap', 'sqlite3')


class TopicRecorder(Node):
    """Subscribes to ``topics`` (raw) and writes every message to a rosbags Writer."""

    def __init__(self, out: str | Path, topics: list[str], storage: str = 'mcap',
                 ready_file: str | Path | None = None, node_name: str = 'bag_recorder'):
        super().__init__(node_name)
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        if storage not in STORAGES:
            raise ValueError(f'storage must be one of {STORAGES}, got {storage!r}')
        if not topics:
            raise ValueError('no topics to record')
        self.out = Path(out)
        if self.out.exists():
            raise FileExistsError(f'{self.out} already exists; choose a new output path')
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._typestore = get_typestore(Stores.LATEST)
        self._tmp = Path(tempfile.mkdtemp(prefix=f'.{self.out.name}.', suffix='.tmp', dir=self.out.parent))
        plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
        self._writer = Writer(self._tmp / self.out.name, version=9, storage_plugin=plugin)
        self._unstamped: list = []  # (connection, topic, raw) received before the first /clock
        self._writer.open()
        self._pending = [self.resolve_topic_name(t) for t in topics]
        self._subs: dict[str, object] = {}
        self._ready_file = Path(ready_file) if ready_file else None
        self.counts: dict[str, int] = {}
        # steady clock: with use_sim_time the node clock stands still until /clock arrives
        self._timer = self.create_timer(0.05, self._discover, clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._discover()

    def _discover(self) -> None:
        """Subscribe to every pending topic whose publishers are visible now."""
        for topic in list(self._pending):
            infos = self.get_publishers_info_by_topic(topic)
            if not infos:
                continue
            msgtype = infos[0].topic_type
            if msgtype not in self._typestore.types:
                self.get_logger().error(f'cannot record {topic}: type {msgtype} is unknown to rosbags')
                self._pending.remove(topic)
                continue
            best_effort = any(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for i in infos)
            latched = all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                             reliability=ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)
            connection = self._writer.add_connection(topic, msgtype, typestore=self._typestore)
            cls = message_class(msgtype)
            self._subs[topic] = self.create_subscription(
                cls, topic, lambda raw, c=connection, t=topic: self._store(c, t, raw), qos, raw=True)
            self._pending.remove(topic)
            self.counts[topic] = 0
            self.get_logger().info(f'recording {topic} [{msgtype}]')
        if not self._pending and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            if self._ready_file is not None:
                atomic_write_text(self._ready_file, '\n'.join(sorted(self._subs)) + '\n')

    def _store(self, connection, topic: str, raw: bytes) -> None:
        if self._writer is None:
            return
        stamp = int(self.get_clock().now().nanoseconds)
        if stamp <= 0:  # sim time before the first /clock (it may be discovered late): the header's own stamp
            stamp = self._header_stamp(connection, raw)
        if stamp <= 0:  # no header either: keep it until the clock is known
            self._unstamped.append((connection, topic, bytes(raw)))
            return
        self._flush_unstamped(stamp)
        self._writer.write(connection, stamp, bytes(raw))
        self.counts[topic] += 1

    def _header_stamp(self, connection, raw) -> int:
        try:
            msg = self._typestore.deserialize_cdr(bytes(raw), connection.msgtype)
            st = msg.header.stamp
            return int(st.sec) * 10**9 + int(st.nanosec)
        except (AttributeError, ValueError, KeyError, TypeError):
            return 0

    def _flush_unstamped(self, stamp: int) -> None:
        """Messages that arrived before /clock get the first known time (their order is kept)."""
        pending, self._unstamped = self._unstamped, []
        for connection, topic, raw in pending:
            self._writer.write(connection, stamp, raw)
            self.counts[topic] += 1

    def close(self) -> Path | None:
        """Finish the bag and move it to ``out``; None if nothing was subscribed (no bag is left)."""
        if self._writer is not None and self._unstamped:
            self._flush_unstamped(0)  # the clock never came: time 0 rather than losing the messages
        writer, self._writer = self._writer, None
        if writer is None:
            return None
        try:
            writer.close()
            if not self._subs:
                self.get_logger().warning(f'no topic was ever published; {self.out} not written')
                return None
            os.rename(self._tmp / self.out.name, self.out)
            self.get_logger().info(f'wrote {self.out}: {self.counts}')
            return self.out
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog='bag_record', description=__doc__.split('\n\n')[0])
    p.add_argument('topics', nargs='+', help='topics to record (types are discovered from their publishers)')
    p.add_argument('--out', required=True, help='bag directory to create (must not exist)')
    p.add_argument('--storage', choices=STORAGES, default='mcap', help='rosbag2 storage (default mcap)')
    p.add_argument('--ready-file', default=None, help='write this file once every topic is subscribed')
    args = p.parse_args(rclpy.utilities.remove_ros_args(['prog'] + list(argv))[1:])
    rclpy.init(args=['prog'] + list(argv))
    recorder = None
    try:
        recorder = TopicRecorder(args.out, args.topics, args.storage, args.ready_file)
        rclpy.spin(recorder)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, FileExistsError) as err:
        print(f'bag_record: error: {err}', file=sys.stderr)
        return 2
    finally:
        if recorder is not None:
            recorder.close()
            recorder.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
