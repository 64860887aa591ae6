"""rosbag2 (mcap or sqlite3) -> aligned episodes, with rosbags (no ROS install needed).

One episode per instruction segment: the instruction is published at the start and repeated;
a change of text (ignoring surrounding whitespace) starts a new segment; an empty instruction
ends one without starting another (so two identical tasks in a row can be told apart).
Within a segment, ticks at ``rate_hz`` start once an image, the instruction and (when mapped) a
state have been seen; each tick takes the latest message of each stream with stamp <= tick +
period/2 (see alignment.py). Stamps are header stamps, or bag time for header-less messages.
Actions count only from period/2 before their segment's start up to its end, and the episode
ends half a period after the last image, state or action of the segment.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from blockvla_ros.io import actions as vec
from blockvla_ros.io.alignment import align_segment, period_ns, sort_by_stamp
from blockvla_ros.io.images import DEFAULT_MAX_PIXELS, ImageConversionError, message_to_rgb8

logger = logging.getLogger(__name__)

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
STRING = 'std_msgs/msg/String'
BAG_FILE_SUFFIXES = ('.mcap', '.db3')
MAX_IMAGE_AGE_S = 1.0  # a tick whose newest image is older than this lies in a gap of the camera stream


class BagError(ValueError):
    """A bag that cannot be read as episodes; the message names the file and the problem."""


@dataclass(frozen=True)
class TopicMap:
    """Which topics of a recording hold what (the image topic's type is auto-detected)."""

    image: str = '/camera/image_raw'  # Image, or CompressedImage; falls back to '<image>/compressed'
    instruction: str = '/instruction'  # std_msgs/String
    action: str | None = '/joint_command'  # JointTrajectory | JointState | Float32/64MultiArray; None: no actions
    state: str | None = None  # proprioception (JointState position or a MultiArray); None: unused
    action_field: str = 'position'  # JointState actions only: 'position' | 'velocity'

    def __post_init__(self):
        for name in ('image', 'instruction'):
            if not getattr(self, name):
                raise ValueError(f'TopicMap.{name} must name a topic')
        if self.action_field not in vec.JOINT_STATE_FIELDS:
            raise ValueError(f'TopicMap.action_field must be one of {vec.JOINT_STATE_FIELDS}, '
                             f'got {self.action_field!r}')


@dataclass
class Episode:
    """One instruction segment of one bag, aligned at the control rate (T ticks)."""

    bag_path: str
    instruction: str
    images: np.ndarray  # uint8 [T, H, W, 3] RGB
    actions: np.ndarray | None  # float32 [T, D]; None when the bag has no action topic
    states: np.ndarray | None  # float32 [T, S]; None when no state topic is mapped
    stamps_ns: np.ndarray  # int64 [T] tick times
    action_names: list[str] = field(default_factory=list)
    state_names: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)  # ticks_total, ticks (kept), dropped_no_action,
    #                                      dropped_nan_action, dropped_nan_state, dropped_stale_image

    def __len__(self) -> int:
        return int(self.stamps_ns.shape[0])


def iter_bag_paths(path_or_dir: str | Path) -> Iterator[Path]:
    """The bags under a path, sorted: a bag directory (with metadata.yaml), a .mcap/.db3 file, or a
    dataset directory searched recursively for bag directories and .mcap files."""
    root = Path(path_or_dir)
    if not root.exists():
        raise BagError(f'{root}: does not exist')
    if root.is_file() or (root / 'metadata.yaml').is_file():
        yield _check_bag_path(root)
        return
    found = 0
    for child in sorted(root.iterdir()):
        if child.is_dir():
            if (child / 'metadata.yaml').is_file():
                found += 1
                yield child
            elif any(child.glob('*.db3')) and not any(child.glob('*.mcap')):
                logger.warning('%s: skipped, holds .db3 files but no metadata.yaml '
                               '(run `ros2 bag reindex` on it)', child)
            else:
                for bag in _iter_nested(child):
                    found += 1
                    yield bag
        elif child.suffix == '.mcap':
            found += 1
            yield child
    if not found:
        ros1 = sorted(root.rglob('*.bag'))
        raise BagError(f'{root}: no rosbag2 recordings found (a bag is a directory with metadata.yaml or a .mcap file)'
                       + (f'; {_ROS1_HINT.format(ros1[0])}' if ros1 else ''))


def _iter_nested(directory: Path) -> Iterator[Path]:
    try:
        yield from iter_bag_paths(directory)
    except BagError:
        return


def _check_bag_path(path: Path) -> Path:
    """``path`` if it looks like one bag, else a BagError saying why not."""
    if not path.exists():
        raise BagError(f'{path}: does not exist')
    if path.is_dir():
        if (path / 'metadata.yaml').is_file():
            return path
        if any(path.glob('*.db3')) and not any(path.glob('*.mcap')):
            raise BagError(f'{path}: bag directory has no metadata.yaml (an interrupted recording? '
                           'run `ros2 bag reindex` on it)')
        raise BagError(f'{path}: not a rosbag2 bag (no metadata.yaml): pass a bag directory (with metadata.yaml) '
                       'or a .mcap/.db3 file; blockvla-bag-play and blockvla-replay also take a directory of bags')
    if path.suffix == '.bag':
        raise BagError(f'{path}: not a rosbag2 bag; {_ROS1_HINT.format(path)}')
    if path.suffix not in BAG_FILE_SUFFIXES:
        raise BagError(f'{path}: not a rosbag2 bag (expected a bag directory or a {"/".join(BAG_FILE_SUFFIXES)} file)')
    return path


_ROS1_HINT = ('ROS 1 .bag files ({}) are read once converted to rosbag2: rosbags-convert --src X.bag --dst X '
              '(rosbags-convert comes with the rosbags package)')


def _mcap_files(path: Path) -> tuple[list[Path], dict[str, int]] | None:
    """A bag directory of uncompressed mcap storage -> (its .mcap files, {topic: count per metadata.yaml}), else None.

    rosbags' directory reader pairs metadata.yaml's topics with the mcap channels by topic, type AND offered QoS;
    an mcap written by another library (no QoS in its channel metadata, or other channel ids) then reads as
    empty. The mcap files describe themselves (schemas, channels, statistics), so they are read directly.
    """
    try:
        meta = yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
        if meta['storage_identifier'] != 'mcap' or str(meta.get('compression_mode') or '').lower() not in ('', 'none'):
            return None
        files = [path / PurePath(str(name)).name for name in meta['relative_file_paths']]
        counts: dict[str, int] = {}
        for entry in meta.get('topics_with_message_count') or []:
            topic = str(entry['topic_metadata']['name'])
            counts[topic] = counts.get(topic, 0) + int(entry['message_count'])
    except Exception:  # noqa: BLE001 - an unreadable metadata.yaml: rosbags' reader says what is wrong with it
        return None
    if not files or not all(f.suffix == '.mcap' and f.is_file() for f in files):
        return None
    return files, counts


def open_bag(path: str | Path):
    """An open rosbags AnyReader on one bag (mcap storage: its files read directly, see _mcap_files); rosbags'
    errors become BagError naming the file. The caller closes it."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    path = _check_bag_path(Path(path))
    mcap = _mcap_files(path) if path.is_dir() else None
    reader = AnyReader(mcap[0] if mcap else [path], default_typestore=get_typestore(Stores.LATEST))
    try:
        reader.open()
    except Exception as err:  # rosbags raises several types for damaged files; name the file
        raise BagError(f'{path}: cannot open bag (corrupt or truncated file, or not a bag?): {err}') from err
    if mcap:
        _warn_on_count_mismatch(path, mcap[1], reader)
    return reader


def _warn_on_count_mismatch(path: Path, listed: dict[str, int], reader: Any) -> None:
    """metadata.yaml's message counts vs what the mcap files hold: say so when they differ (what is read is what is
    in the files)."""
    found: dict[str, int] = {}
    for c in reader.connections:
        found[c.topic] = found.get(c.topic, 0) + c.msgcount
    differ = {t: (listed.get(t), found.get(t, 0)) for t in sorted(set(listed) | set(found))
              if listed.get(t) is not None and listed.get(t) != found.get(t, 0)}
    if differ:
        logger.warning('%s: metadata.yaml and the mcap files disagree on message counts (topic: listed, found): %s; '
                       'reading what the files hold', path, differ)


def list_topics(path: str | Path) -> dict[str, str]:
    """{topic: message type} of one bag."""
    path = Path(path)
    reader = open_bag(path)
    try:
        return {c.topic: c.msgtype for c in reader.connections}
    finally:
        reader.close()


def _describe(topics: dict[str, str]) -> str:
    return ', '.join(f'{t} [{m}]' for t, m in sorted(topics.items())) or 'none'


def _resolve_topics(path: Path, topics: dict[str, str], counts: dict[str, int], topic_map: TopicMap,
                    require_actions: bool, instruction: str | None = None) -> dict[str, str]:
    """{role: topic} for the roles present in this bag, after checking names and types."""
    def missing(role: str, topic: str) -> BagError:
        return BagError(f'{path}: mapped {role} topic {topic!r} is not in the bag (map it with data.topics.{role} '
                        f'in training, --{role}-topic in blockvla-replay); the bag has: {_describe(topics)}')

    roles: dict[str, str] = {}
    image = topic_map.image
    if image not in topics and f'{image}/compressed' in topics:
        logger.info('%s: no %s, using %s/compressed', path, image, image)
        image = f'{image}/compressed'
    if image not in topics:
        raise missing('image', topic_map.image)
    roles['image'] = image
    if instruction is not None:
        if counts.get(topic_map.instruction, 0):
            raise BagError(f'{path}: has instruction topic {topic_map.instruction!r} and data.instruction is '
                           f'{instruction!r}: use one (drop data.instruction to read the topic)')
    elif topic_map.instruction not in topics:
        err = missing('instruction', topic_map.instruction)
        raise BagError(f'{err}; bags without an instruction topic train with data.instruction (the task text)')
    else:
        roles['instruction'] = topic_map.instruction
    if topic_map.state is not None:
        if topic_map.state not in topics:
            raise missing('state', topic_map.state)
        roles['state'] = topic_map.state
    if topic_map.action is not None:
        if topic_map.action in topics and (require_actions or counts.get(topic_map.action, 0) > 0):
            roles['action'] = topic_map.action
        elif require_actions:
            raise missing('action', topic_map.action)
        else:
            logger.info('%s: no (or an empty) action topic %s, episodes without actions', path, topic_map.action)

    allowed = {'image': (IMAGE, COMPRESSED_IMAGE), 'instruction': (STRING,),
               'state': vec.VECTOR_TYPES, 'action': vec.VECTOR_TYPES}
    for role, topic in roles.items():
        if topics[topic] not in allowed[role]:
            raise BagError(f'{path}: {role} topic {topic!r} has type {topics[topic]}; '
                           f'expected one of {", ".join(allowed[role])}')
        if counts.get(topic, 0) == 0:
            raise BagError(f'{path}: {role} topic {topic!r} has no messages')
    return roles


class _Stream:
    """Messages of one role: stamps plus payloads, sortable by stamp."""

    def __init__(self):
        self.stamps: list[int] = []
        self.bag_times: list[int] = []
        self.items: list[Any] = []

    def sorted(self) -> tuple[np.ndarray, list[Any]]:
        order = sort_by_stamp(np.asarray(self.stamps, dtype=np.int64))
        return np.asarray(self.stamps, dtype=np.int64)[order], [self.items[i] for i in order]


def _read_streams(reader: Any, path: Path, roles: dict[str, str], topic_map: TopicMap,
                  use_header_stamps: bool, progress: bool | None,
                  state_names: Sequence[str] | None = None) -> dict[str, _Stream]:
    """Deserialize the mapped topics once; images stay messages until picked by a tick."""
    by_topic = {topic: role for role, topic in roles.items()}
    connections = [c for c in reader.connections if c.topic in by_topic]
    streams = {role: _Stream() for role in roles}
    widths: dict[str, tuple[int, list[str], int]] = {}
    empty_actions = 0
    joint_states: list = []  # (stamp, bag_time, positions, names) of a JointState state topic
    messages = reader.messages(connections=connections)
    total = sum(c.msgcount for c in connections)
    quiet = None if progress is None else not progress
    with tqdm(total=total, desc=f'reading {path.name}', unit='msg', disable=quiet) as bar:
        while True:
            try:
                item = next(messages, None)
                if item is None:
                    break
                connection, bag_time, raw = item
                msg = reader.deserialize(raw, connection.msgtype)
            except Exception as err:  # damaged chunk or record: name the file
                raise BagError(f'{path}: cannot read messages (corrupt or truncated bag?): {err}') from err
            bar.update(1)
            role = by_topic[connection.topic]
            stamp = (vec.header_stamp_ns(msg) if use_header_stamps else None) or bag_time
            if role == 'instruction':
                payload: Any = str(msg.data).strip()
            elif role == 'image':
                payload = msg
            else:
                field_name = topic_map.action_field if role == 'action' else 'position'
                vector, names = vec.vector_from_message(msg, connection.msgtype, field_name)
                if vector is None:
                    empty_actions += role == 'action'
                    continue
                if role == 'state' and connection.msgtype == vec.JOINT_STATE:
                    if len(names) != vector.size:
                        raise BagError(f'{path}: {connection.topic} at stamp {stamp} ns: {vector.size} positions for '
                                       f'{len(names)} names')
                    joint_states.append((stamp, bag_time, vector, names))  # merged by name below
                    continue
                if role not in widths:
                    widths[role] = (vector.size, names, stamp)
                width, first_names, first_stamp = widths[role]
                if vector.size != width:
                    raise BagError(f'{path}: {role} width changes within the bag on {connection.topic}: '
                                   f'{width} at stamp {first_stamp} ns, {vector.size} at stamp {stamp} ns')
                if names != first_names:
                    raise BagError(f'{path}: {role} names change within the bag on {connection.topic}: '
                                   f'{first_names} at stamp {first_stamp} ns, {names} at stamp {stamp} ns')
                payload = (vector, names)
            stream = streams[role]
            stream.stamps.append(stamp)
            stream.bag_times.append(bag_time)
            stream.items.append(payload)
    if joint_states:
        _merge_joint_states(path, roles['state'], joint_states, streams['state'], state_names)
    if empty_actions:
        logger.warning('%s: %d action messages on %s hold no values (no points / empty %s); ignored',
                       path, empty_actions, roles['action'], topic_map.action_field)
    for role in ('action', 'state'):
        if role in streams and not streams[role].stamps:
            raise BagError(f'{path}: {role} topic {roles[role]!r} has messages but none holds values')
    return streams


def _merge_joint_states(path: Path, topic: str, messages: list, stream: _Stream,
                        select: Sequence[str] | None = None) -> None:
    """JointStates -> state vectors over every joint name the topic carries (first-seen order), or over the joints
    ``select`` names, in that order (a policy reading some of the robot's joints). Several publishers (an arm driver,
    a gripper driver) commonly share /joint_states, each with its own joints: the state at a message is the latest
    position of each name, from the first message at which every name has been seen (as the node merges them)."""
    found = list(dict.fromkeys(n for _, _, _, names in messages for n in names))
    order = list(select) if select else found
    missing = [n for n in order if n not in found]
    if missing:
        raise BagError(f'{path}: state names {missing} are not among the joints of {topic!r}: {found}')
    if all(names == found for _, _, _, names in messages):
        index = [found.index(n) for n in order]
        for stamp, bag_time, vector, _ in messages:
            stream.stamps.append(stamp)
            stream.bag_times.append(bag_time)
            stream.items.append((vector[index] if select else vector, order))
        return
    logger.info('%s: %s holds JointStates with different names (several publishers?): merged by name into %s',
                path, topic, order)
    wanted = set(order)
    latest: dict[str, float] = {}
    for stamp, bag_time, vector, names in messages:
        if wanted.isdisjoint(names):
            continue  # another publisher's joints only: the state does not change
        latest.update((n, v) for n, v in zip(names, vector.tolist()) if n in wanted)
        if len(latest) == len(order):
            stream.stamps.append(stamp)
            stream.bag_times.append(bag_time)
            stream.items.append((np.array([latest[n] for n in order], np.float32), order))


def _warn_on_clock_mismatch(path: Path, image: _Stream) -> None:
    """Header stamps far from bag time (sim time vs wall time) break header-less alignment."""
    offset = np.median(np.asarray(image.stamps, np.int64) - np.asarray(image.bag_times, np.int64))
    if abs(offset) > 60e9:
        logger.warning('%s: image header stamps differ from bag time by %.0f s; the instruction has no header, '
                       'so segments may not line up (pass use_header_stamps=False?)', path, offset / 1e9)


def _segments(instructions: _Stream) -> list[tuple[int, int | None, str]]:
    """(start_ns, end_ns or None, text) per run of identical instruction text, empty text skipped."""
    stamps, texts = instructions.sorted()
    starts = [(int(s), t) for i, (s, t) in enumerate(zip(stamps, texts)) if i == 0 or t != texts[i - 1]]
    segments = []
    for i, (start, text) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else None
        if text.strip():
            segments.append((start, end, text))
    return segments


def read_episodes(path: str | Path, topic_map: TopicMap | None = None, rate_hz: float = 10.0, *,
                  require_actions: bool = True, action_dim: int | None = None, state_dim: int | None = None,
                  use_header_stamps: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                  value_max: float | None = None, progress: bool | None = None,
                  max_image_age_s: float = MAX_IMAGE_AGE_S,
                  state_names: Sequence[str] | None = None, instruction: str | None = None) -> list[Episode]:
    """Read one bag into episodes (one per instruction segment), aligned at ``rate_hz``.

    require_actions=False accepts a bag without the action topic (actions=None). action_dim /
    state_dim, when given, must match the bag. Ticks whose action or state holds NaN/inf are
    dropped, counted in ``Episode.stats`` and logged. ``max_pixels`` and ``value_max`` go to
    the image conversion; ``progress`` shows a bar (None: only on a terminal). A segment ends at a
    gap longer than ``max_image_age_s`` in the camera stream (the dropped ticks are counted and
    warned about) instead of repeating the last image and action across the gap. ``state_names`` picks those joints,
    in that order, from a JointState state topic that carries more (unnamed MultiArray states are read whole).
    ``instruction`` is the text of a bag without an instruction topic: one episode over the whole bag (a bag with
    the topic is then an error).
    """
    path = Path(path)
    topic_map = topic_map or TopicMap()
    period_ns(rate_hz)  # validates rate_hz before any reading
    reader = open_bag(path)
    try:
        topics = {c.topic: c.msgtype for c in reader.connections}
        counts: dict[str, int] = {}
        for c in reader.connections:
            counts[c.topic] = counts.get(c.topic, 0) + c.msgcount
        if not sum(counts.values()):
            raise BagError(f'{path}: bag is empty (no messages; topics: {_describe(topics)})')
        roles = _resolve_topics(path, topics, counts, topic_map, require_actions, instruction)
        streams = _read_streams(reader, path, roles, topic_map, use_header_stamps, progress, state_names)
    finally:
        reader.close()

    widths = {role: streams[role].items[0][0].size for role in ('action', 'state') if role in streams}
    for role, expected in (('action', action_dim), ('state', state_dim)):
        if expected is not None and role in widths and widths[role] != expected:
            raise BagError(f'{path}: {role} topic {roles[role]!r} has width {widths[role]}, expected {expected}')
    if use_header_stamps:
        _warn_on_clock_mismatch(path, streams['image'])

    image_stamps, image_msgs = streams['image'].sorted()
    vectors, names = {}, {}
    for role in ('action', 'state'):
        if role in streams:
            stamps, items = streams[role].sorted()
            vectors[role] = (stamps, np.stack([v for v, _ in items]))  # N x [D] -> [N, D]
            names[role] = list(items[0][1])
    observed = [image_stamps] + ([vectors['state'][0]] if 'state' in vectors else [])
    first_seen, last_obs = max(int(s[0]) for s in observed), min(int(s[-1]) for s in observed)
    images = _ImageDecoder(path, roles['image'], image_stamps, image_msgs, max_pixels, value_max)

    episodes = []
    segments = _segments(streams['instruction']) if 'instruction' in streams else \
        [(int(image_stamps[0]), None, instruction.strip())]
    for start, end, text in segments:
        seg = align_segment(start, end, rate_hz, first_seen, last_obs, image_stamps, vectors,
                            int(max_image_age_s * 1e9))
        if seg.stats.get('dropped_stale_image'):
            logger.warning('%s: segment %r: %d ticks dropped at or after a gap of more than %.2g s in %s inside '
                           'the segment (an action or state stamped across the pause between two episodes,'
                           ' i.e. stamps out of order?)', path, text, seg.stats['dropped_stale_image'],
                           max_image_age_s, roles['image'])
        dropped = {k: v for k, v in seg.stats.items() if k.startswith('dropped') and v}
        if dropped:
            logger.warning('%s: segment %r: dropped ticks %s of %d', path, text, dropped, seg.stats['ticks_total'])
        if seg.skipped:
            logger.warning('%s: segment %r skipped: %s', path, text, seg.skipped)
            continue
        episodes.append(Episode(
            bag_path=str(path), instruction=text, images=images.stack(seg.image_index),
            actions=seg.rows.get('action'), states=seg.rows.get('state'), stamps_ns=seg.ticks_ns,
            action_names=names.get('action', []), state_names=names.get('state', []), stats=seg.stats))
    if not episodes:
        logger.warning('%s: no episodes (no instruction segment had aligned image%s)', path,
                       ' and action' if 'action' in roles else '')
    return episodes


class _ImageDecoder:
    """Decodes the image messages picked by ticks, each once, and checks they share one size."""

    def __init__(self, path: Path, topic: str, stamps: np.ndarray, msgs: list[Any], max_pixels: int,
                 value_max: float | None):
        self.path, self.topic, self.stamps, self.msgs = path, topic, stamps, msgs
        self.max_pixels, self.value_max = max_pixels, value_max
        self.decoded: dict[int, np.ndarray] = {}
        self.shape: tuple[int, ...] | None = None

    def get(self, index: int) -> np.ndarray:
        if index not in self.decoded:
            where = f'{self.path}: image on {self.topic} at stamp {self.stamps[index]} ns'
            try:
                rgb = message_to_rgb8(self.msgs[index], max_pixels=self.max_pixels, value_max=self.value_max)
            except ImageConversionError as err:
                raise BagError(f'{where}: {err}') from err
            self.shape = self.shape or rgb.shape
            if rgb.shape != self.shape:
                raise BagError(f'{where}: size {rgb.shape} differs from earlier images {self.shape}')
            self.decoded[index] = rgb
        return self.decoded[index]

    def stack(self, indices: np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3]; the per-episode cache is then released (the stack holds the pixels)."""
        stacked = np.stack([self.get(int(i)) for i in indices])  # T x [H, W, 3] -> [T, H, W, 3]
        self.decoded.clear()
        return stacked
