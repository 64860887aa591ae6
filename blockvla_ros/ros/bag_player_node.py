"""`blockvla-bag-play`: publish a rosbag2 recording's topics with their original timing and /clock.

Like `ros2 bag play --clock` for machines without the rosbag2 tools: reads mcap or sqlite3 bags with
rosbags and republishes every connection on the same topic with the same type and recorded QoS. The
CDR bytes go out untouched (``Publisher.publish(bytes)``), so header stamps stay as recorded; run
the listening nodes with ``use_sim_time:=true``. /clock carries the bag time of each message and is
also published ``--clock-hz`` times per second in between.

    blockvla-bag-play BAG [--rate 1.0] [--topics T ...] [--loop] [--wait-for-subscribers T ...]

BAG may also be a directory of bags (a dataset): they play one after another in name order, each on its own
recorded time (/clock jumps back at each new bag, as with --loop).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock

from blockvla_ros.io.bag_reader import BagError, iter_bag_paths, list_topics, open_bag

logger = logging.getLogger(__name__)
DEFAULT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)


@dataclass(frozen=True)
class PlaybackClock:
    """Maps bag time to wall time for playback at ``rate`` x speed started at wall time ``wall0``."""

    bag0_ns: int  # bag time of the first message
    wall0: float  # time.monotonic() when playback started
    rate: float = 1.0

    def deadline(self, bag_ns: int) -> float:
        """Monotonic wall time at which the message recorded at ``bag_ns`` is due."""
        return self.wall0 + (bag_ns - self.bag0_ns) / 1e9 / self.rate

    def bag_now(self, wall: float) -> int:
        """Bag time (ns) that corresponds to monotonic wall time ``wall``."""
        return self.bag0_ns + int(round((wall - self.wall0) * self.rate * 1e9))


MESSAGE_TYPE = re.compile(r'^([a-z][a-z0-9_]{0,63})/msg/([A-Z][A-Za-z0-9]{0,63})$')
INTERFACE_INDEX = Path('share', 'ament_index', 'resource_index', 'rosidl_interfaces')


def _interface_index_dirs() -> list[Path]:
    """The ament index dirs that list installed interface packages: AMENT_PREFIX_PATH, then this Python's prefix
    (where the pip ROS wheels install theirs)."""
    prefixes = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p] + [sys.prefix]
    return [Path(p) / INTERFACE_INDEX for p in prefixes]


def message_class(msgtype: str):
    """'pkg/msg/Name' -> the rclpy message class; ImportError naming the type if it is not a known message.

    A bag names its types, and a bag is untrusted: nothing it names is imported unless the ament index lists
    `pkg` as an installed interface package with a `msg/Name` message (the name is checked against a strict
    pattern first, so it cannot be a path or a module like `unittest/__main__/X`). Only then is `pkg.msg` imported,
    and the attribute must be a generated message class.
    """
    match = MESSAGE_TYPE.match(msgtype) if isinstance(msgtype, str) else None
    if match is None:
        raise ImportError(f'unexpected message type name {msgtype!r:.80} (expected pkg/msg/Name of a message '
                          'package)')
    pkg, name = match.groups()
    listed = False
    for index in _interface_index_dirs():
        try:
            entries = (index / pkg).read_text().split()
        except OSError:
            continue
        if f'msg/{name}.msg' in entries or f'msg/{name}.idl' in entries:
            listed = True
            break
    if not listed:
        raise ImportError(f'message type {msgtype} is not installed (no interface package {pkg!r} with message '
                          f'{name!r} in the ament index)')
    try:
        cls = getattr(importlib.import_module(f'{pkg}.msg'), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f'message type {msgtype} is not installed ({err})') from err
    if not (isinstance(cls, type) and hasattr(cls, 'get_fields_and_field_types') and hasattr(cls, '_TYPE_SUPPORT')):
        raise ImportError(f'{msgtype} is not a generated ROS message class')
    return cls


def _qos_from_bag(connection) -> QoSProfile:
    """The QoS the recorded publisher offered (first profile), else reliable / volatile / depth 10."""
    profiles = getattr(getattr(connection, 'ext', None), 'offered_qos_profiles', None) or []
    if not profiles:
        return DEFAULT_QOS
    q = profiles[0]

    def value(x) -> int:  # rosbags enums are plain Enums of the rmw values
        return int(getattr(x, 'value', x))

    reliability = ReliabilityPolicy(value(q.reliability))
    durability = DurabilityPolicy(value(q.durability))
    if reliability not in (ReliabilityPolicy.RELIABLE, ReliabilityPolicy.BEST_EFFORT):
        reliability = ReliabilityPolicy.RELIABLE
    if durability not in (DurabilityPolicy.VOLATILE, DurabilityPolicy.TRANSIENT_LOCAL):
        durability = DurabilityPolicy.VOLATILE
    depth = int(q.depth) if value(q.history) == int(HistoryPolicy.KEEP_LAST) and int(q.depth) > 0 else 10
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=durability)


class BagPlayer(Node):
    """Publishes a bag's messages (or those of every bag in a directory of bags, in turn) on their recorded topics,
    paced by recorded time."""

    def __init__(self, bag: str | Path, rate: float = 1.0, topics: list[str] | None = None, clock: bool = True,
                 clock_hz: float = 100.0, node_name: str = 'bag_player'):
        super().__init__(node_name)
        if not rate > 0:
            raise ValueError(f'rate must be > 0, got {rate}')
        if clock and not clock_hz > 0:
            raise ValueError(f'clock_hz must be > 0, got {clock_hz}')
        self.bag = Path(bag)
        self.bags = list(iter_bag_paths(self.bag))  # BagError naming the path if it holds no bag
        self.rate, self.clock_hz = float(rate), float(clock_hz)
        self._stop = threading.Event()
        available = {}
        for path in self.bags:
            available.update(list_topics(path))  # BagError naming the file if it is not a readable bag
        wanted = set(topics) if topics else set(available)
        unknown = sorted(wanted - set(available))
        if unknown:
            raise BagError(f'{self.bag}: topics {unknown} are not in the bag; it has: {sorted(available)}')
        self._clock_pub = self.create_publisher(Clock, '/clock', 10) if clock else None
        self._bag_publishers: dict[str, object] = {}
        self._wanted = wanted
        self.published = 0

    def _open(self, bag: Path):
        reader = open_bag(bag)  # the reader's own opening: bags from other tools play too (BagError if not)
        for conn in reader.connections:
            if conn.topic not in self._wanted or conn.topic in self._bag_publishers:
                continue
            try:
                cls = message_class(conn.msgtype)
            except ImportError as err:
                self.get_logger().warning(f'{bag}: skipping {conn.topic}: {err}')
                continue
            self._bag_publishers[conn.topic] = self.create_publisher(cls, conn.topic, _qos_from_bag(conn))
        return reader

    def advertise(self) -> list[str]:
        """Create the publishers now (so subscribers can match before playback); returns their topics."""
        for bag in self.bags:
            self._open(bag).close()
        return sorted(self._bag_publishers)

    def wait_for_subscribers(self, topics: list[str], timeout_s: float) -> None:
        """Block until each of ``topics`` has a matched subscription; TimeoutError naming the missing ones."""
        self.advertise()
        missing = [t for t in topics if t not in self._bag_publishers]
        if missing:
            raise BagError(f'{self.bag}: cannot wait for subscribers on {missing}: not played from this bag')
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = [t for t in topics if self._bag_publishers[t].get_subscription_count() < 1]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f'no subscriber appeared on {waiting} within {timeout_s:g} s')
            if self._stop.wait(0.05):
                return

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _publish_clock(self, bag_ns: int) -> None:
        if self._clock_pub is not None:
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = divmod(int(bag_ns), 1_000_000_000)
            self._clock_pub.publish(msg)

    def _sleep_until(self, clock: PlaybackClock, bag_ns: int) -> bool:
        """Wait for the message at ``bag_ns``, publishing /clock meanwhile; False when stopped."""
        due = clock.deadline(bag_ns)
        step = 1.0 / self.clock_hz if self._clock_pub is not None else None
        while True:
            now = time.monotonic()
            if now >= due:
                return not self._stop.is_set()
            if step is not None:
                self._publish_clock(min(clock.bag_now(now), bag_ns))
            if self._stop.wait(min(due - now, step) if step else due - now):
                return False

    def play_once(self) -> int:
        """Play the bag(s) from start to end; returns the number of messages published."""
        count = 0
        for bag in self.bags:
            if self._stop.is_set():
                break
            count += self._play_bag(bag)
        self.published += count
        return count

    def _play_bag(self, bag: Path) -> int:
        reader = self._open(bag)
        count = 0
        try:
            connections = [c for c in reader.connections if c.topic in self._bag_publishers]
            clock = None
            messages = reader.messages(connections=connections)
            while not self._stop.is_set():
                try:
                    item = next(messages, None)
                except Exception as err:
                    raise BagError(f'{bag}: cannot read messages (corrupt or truncated bag?): {err}') from err
                if item is None:
                    break
                conn, bag_ns, raw = item
                if clock is None:
                    clock = PlaybackClock(bag_ns, time.monotonic(), self.rate)
                if not self._sleep_until(clock, bag_ns):
                    break
                self._publish_clock(bag_ns)
                self._bag_publishers[conn.topic].publish(bytes(raw))
                count += 1
        finally:
            reader.close()
        return count


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='blockvla-bag-play', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('bag', help='a rosbag2 bag directory (mcap or sqlite3), a .mcap file, or a directory of bags '
                               '(played one after another)')
    p.add_argument('--rate', type=float, default=1.0, help='playback speed factor (default 1.0 = recorded timing)')
    p.add_argument('--topics', nargs='+', default=None, help='play only these topics (default: all)')
    p.add_argument('--loop', action='store_true', help='start again at the end (the clock jumps back)')
    p.add_argument('--no-clock', action='store_true', help='do not publish /clock')
    p.add_argument('--clock-hz', type=float, default=100.0, help='/clock rate between messages (default 100)')
    p.add_argument('--delay', type=float, default=0.0, help='seconds to wait before playing (default 0)')
    p.add_argument('--wait-for-subscribers', nargs='+', default=[], metavar='TOPIC',
                   help='before playing, wait until each of these topics has a subscriber')
    p.add_argument('--wait-timeout', type=float, default=60.0,
                   help='seconds to wait for those subscribers before giving up (default 60)')
    p.add_argument('--linger', type=float, default=1.0,
                   help='seconds to keep the publishers alive after the last message (default 1)')
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(rclpy.utilities.remove_ros_args(['prog'] + list(argv))[1:])
    logging.basicConfig(level=logging.INFO, format='[bag_player] %(message)s')
    rclpy.init(args=['prog'] + list(argv))
    player = None
    executor = None
    spinner = None
    try:
        player = BagPlayer(args.bag, rate=args.rate, topics=args.topics, clock=not args.no_clock,
                           clock_hz=args.clock_hz)
        executor = SingleThreadedExecutor()
        executor.add_node(player)
        spinner = threading.Thread(target=executor.spin, name='bag_player_spin', daemon=True)
        spinner.start()
        topics = player.advertise()
        player.get_logger().info(f'playing {args.bag} ({len(player.bags)} bag(s)) at {args.rate:g}x: '
                                 f'{", ".join(topics)}')
        if args.wait_for_subscribers:
            player.wait_for_subscribers(args.wait_for_subscribers, args.wait_timeout)
        if args.delay > 0:
            time.sleep(args.delay)
        while True:
            n = player.play_once()
            player.get_logger().info(f'published {n} messages')
            if not args.loop or player.stopped:
                break
        time.sleep(max(args.linger, 0.0))
        return 0
    except (BagError, TimeoutError, ValueError) as err:
        print(f'blockvla-bag-play: error: {err}', file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        if player is not None:
            player.stop()
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        if spinner is not None:
            spinner.join(timeout=2.0)
        if player is not None:
            player.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == '__main__':
    sys.exit(main())
