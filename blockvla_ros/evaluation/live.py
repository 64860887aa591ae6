"""The live replay path without `ros2 launch`: bag player + policy node + recorder as processes.

What launch/replay.launch.py does on a ROS 2 install, for machines with only the pip ROS wheels:
1. the recorder (blockvla_ros.ros.bag_recorder_node) subscribes to the node's outputs on sim time;
2. the policy node starts with use_sim_time and autostart (configure + activate), its instruction QoS
   matching the bag's recorded publisher (recorded_instruction_qos);
3. once the recorder sees the node's publishers, the player (blockvla_ros.ros.bag_player_node)
   waits for the node's camera and instruction subscriptions and plays the bag with /clock;
4. after the player ends and ``settle_s`` passed, node and recorder get SIGINT; the recorder
   closes the output bag.
All processes run on this machine, so DDS discovery stays on localhost. This module starts
processes only; it imports no ROS package.

    python -m blockvla_ros.evaluation.live --bag BAG --policy NAME --out OUT_BAG [--policy-dir DIR]
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)
DEFAULT_RECORD_TOPICS = ('action_chunk', 'action', '/diagnostics')  # action_chunk: when the node publishes it


class LiveReplayError(RuntimeError):
    """A process of the live replay failed or did not become ready; the message holds its log tail."""


@dataclass
class LiveResult:
    output_bag: Path
    counts: dict[str, int]  # topic -> messages recorded
    logs: dict[str, str] = field(default_factory=dict)  # process name -> combined stdout/stderr


def _absolute(topic: str, namespace: str) -> str:
    if topic.startswith('/'):
        return topic
    ns = '/' + namespace.strip('/') if namespace.strip('/') else ''
    return f'{ns}/{topic}'


class _Process:
    """A child process whose output goes to a log file (no pipe to fill up)."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f'{name}.log'
        self._log = open(self.log_path, 'w')
        logger.info('starting %s: %s', name, ' '.join(cmd))
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')

    def fail(self, what: str) -> LiveReplayError:
        return LiveReplayError(f'{self.name}: {what}; its log ends with:\n{self.log()[-3000:]}')

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise self.fail(f'exited early with code {self.proc.returncode}')

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGINT (clean shutdown), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning('%s did not stop within %.0f s after SIGINT; killing it', self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def _node_cmd(policy: str, policy_dirs: list[str], engine: str, control_rate_hz: float | None, namespace: str,
              decoder: str | None, topics: dict[str, str], extra_params: dict | None) -> list[str]:
    params = {'policy': policy, 'engine': engine, 'use_sim_time': True, 'autostart': True, **topics}
    if control_rate_hz:  # else the policy's trained rate
        params['control_rate_hz'] = float(control_rate_hz)
    if policy_dirs:
        params['policy_dirs'] = '[' + ','.join(f'"{d}"' for d in policy_dirs) + ']'
    if decoder:
        params['decoding.decoder'] = decoder
    params.update(extra_params or {})
    cmd = [sys.executable, '-m', 'blockvla_ros.ros.policy_node', '--ros-args']
    if namespace.strip('/'):
        cmd += ['-r', f'__ns:=/{namespace.strip("/")}']
    for key, value in params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        cmd += ['-p', f'{key}:={text}']
    return cmd


def _publishes_chunks(policy: str, policy_dirs: list[str], extra_params: dict | None) -> bool:
    """Whether the node will publish action_chunk for this policy (absolute targets only; see TrajectoryMap)."""
    from blockvla_ros.paths import package_data_dir
    from blockvla_ros.runtime.action_output import TrajectoryMap
    from blockvla_ros.runtime.policy_folder import load_policy_folder, resolve_policy

    dirs = list(policy_dirs) or [str(package_data_dir('models') or 'models')]
    try:
        spec = load_policy_folder(resolve_policy(policy, dirs))
        mapping = (extra_params or {}).get('trajectory_joints') or []
        return TrajectoryMap.build(spec.action_names, spec.config.kinds, mapping).enabled
    except ValueError:  # an unusable folder or mapping: the node will say so itself
        return True


def recorded_instruction_qos(bag: str | Path, topic: str) -> str:
    """The node's `instruction_qos` that matches how the bag's player will offer `topic`: 'transient_local' when the
    recorded publisher offered it, else 'volatile'. The player offers the recorded QoS (reliable / volatile when the
    bag has none, as bags written by other tools often do), and a volatile publisher never matches the node's default
    transient-local subscription: the node would hold for the whole bag ('no instruction'). A directory of bags:
    'transient_local' only when every bag's publisher offered it."""
    from rosbags.interfaces import QosDurability

    from blockvla_ros.io.bag_reader import iter_bag_paths, open_bag

    profiles = []
    for path in iter_bag_paths(bag):  # a bag, or each bag of a directory of bags
        reader = open_bag(path)
        try:
            profiles += [p for c in reader.connections if c.topic == topic
                         for p in (getattr(getattr(c, 'ext', None), 'offered_qos_profiles', None) or [])[:1]]
        finally:
            reader.close()
    durable = profiles and all(p.durability == QosDurability.TRANSIENT_LOCAL for p in profiles)
    return 'transient_local' if durable else 'volatile'


def run_live(bag: str | Path, policy: str, out: str | Path, *, policy_dirs: list[str] | None = None,
             engine: str = 'onnxruntime', control_rate_hz: float | None = None, rate: float = 1.0, namespace: str = '',
             decoder: str | None = None, record_topics: tuple[str, ...] = DEFAULT_RECORD_TOPICS,
             storage: str = 'mcap', image_topic: str = '/camera/image_raw', instruction_topic: str = '/instruction',
             state_topic: str = '/joint_states', startup_timeout_s: float = 120.0,
             settle_s: float = 2.0, domain_id: int | None = None, extra_params: dict | None = None) -> LiveResult:
    """Play ``bag`` into the policy node and record its outputs into the new bag ``out``.

    The node reads the bag's topics by their absolute names (``<image_topic>/compressed`` when only that is
    recorded), whatever its namespace; its outputs ``record_topics`` are relative to the namespace.
    """
    from blockvla_ros.io.bag_reader import list_topics

    bag, out = Path(bag), Path(out)
    topics_in_bag = list_topics(bag)  # BagError naming the file if it is not a readable bag
    if out.exists():
        raise FileExistsError(f'{out} already exists; choose a new output bag path')
    if image_topic not in topics_in_bag and f'{image_topic}/compressed' in topics_in_bag:
        image_topic = f'{image_topic}/compressed'
    if image_topic not in topics_in_bag:
        raise ValueError(f'{bag}: no image topic {image_topic!r} (--image-topic); the bag has '
                         f'{sorted(topics_in_bag)}')
    if instruction_topic not in topics_in_bag:
        raise ValueError(f'{bag}: no instruction topic {instruction_topic!r} (--instruction-topic); the bag has '
                         f'{sorted(topics_in_bag)}')
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', PYTHONUNBUFFERED='1')
    if domain_id is not None:
        env['ROS_DOMAIN_ID'] = str(domain_id)
    if 'action_chunk' in record_topics and not _publishes_chunks(policy, list(policy_dirs or []), extra_params):
        record_topics = tuple(t for t in record_topics if t != 'action_chunk')  # delta actions: not published
    record = [_absolute(t, namespace) for t in record_topics]
    log_dir = Path(tempfile.mkdtemp(prefix='blockvla_live_'))
    ready = log_dir / 'recorder.ready'
    procs: list[_Process] = []
    try:
        recorder = _Process('recorder', [sys.executable, '-m', 'blockvla_ros.ros.bag_recorder_node', '--out', str(out),
                                         '--storage', storage, '--ready-file', str(ready), *record,
                                         '--ros-args', '-p', 'use_sim_time:=true'], env, log_dir)
        procs.append(recorder)
        inputs = {'camera_topic': image_topic, 'instruction_topic': instruction_topic,
                  'joint_states_topic': state_topic,
                  'instruction_qos': recorded_instruction_qos(bag, instruction_topic)}
        node = _Process('policy_node', _node_cmd(policy, list(policy_dirs or []), engine, control_rate_hz, namespace,
                                                 decoder, inputs, extra_params), env, log_dir)
        procs.append(node)
        deadline = time.monotonic() + startup_timeout_s
        while not ready.exists():
            node.check_running()
            recorder.check_running()
            if 'configure failed' in node.log():  # the node stays up (diagnostics) but will never publish
                raise node.fail('could not configure its policy')
            if time.monotonic() > deadline:
                raise node.fail(f'its publishers {record} did not appear within {startup_timeout_s:g} s')
            time.sleep(0.1)
        player = _Process('player', [sys.executable, '-m', 'blockvla_ros.ros.bag_player_node', str(bag),
                                     '--rate', str(rate), '--wait-for-subscribers', image_topic, instruction_topic,
                                     '--wait-timeout', str(startup_timeout_s)], env, log_dir)
        procs.append(player)
        while player.proc.poll() is None:
            node.check_running()
            time.sleep(0.1)
        if player.proc.returncode != 0:
            raise player.fail(f'exited with code {player.proc.returncode}')
        time.sleep(settle_s)
        node.check_running()
        codes = {p.name: p.stop() for p in (node, recorder)}
        if codes['recorder'] != 0 or not out.exists():
            raise recorder.fail(f'exited with code {codes["recorder"]} without writing {out}')
        logs = {p.name: p.log() for p in procs}
        shutil.rmtree(log_dir, ignore_errors=True)  # kept (and named in the error) only on failure
        return LiveResult(out, _count_messages(out), logs)
    except LiveReplayError as err:
        for p in reversed(procs):
            p.stop(timeout_s=10.0)
        shutil.rmtree(out, ignore_errors=True)  # a failed run leaves no output (out did not exist before it)
        raise LiveReplayError(f'{err}\n(full logs in {log_dir})') from None
    finally:
        for p in reversed(procs):
            p.stop(timeout_s=10.0)


def _count_messages(path: Path) -> dict[str, int]:
    from rosbags.highlevel import AnyReader

    with AnyReader([path]) as reader:
        counts: dict[str, int] = {}
        for c in reader.connections:
            counts[c.topic] = counts.get(c.topic, 0) + c.msgcount
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='blockvla-live-replay', description=__doc__.split('\n\n')[0])
    p.add_argument('--bag', required=True, help='bag to play (rosbag2 directory or .mcap file)')
    p.add_argument('--policy', required=True, help='policy folder name (the node parameter `policy`)')
    p.add_argument('--policy-dir', action='append', default=None, help='policy directories (node `policy_dirs`)')
    p.add_argument('--out', required=True, help='output bag directory for the node outputs (must not exist)')
    p.add_argument('--engine', default='onnxruntime', help='inference engine (default onnxruntime)')
    p.add_argument('--decoder', default=None, help="decoder override (default: the policy's own)")
    p.add_argument('--control-rate-hz', type=float, default=None,
                   help="node control rate (default: the policy's trained rate)")
    p.add_argument('--rate', type=float, default=1.0, help='playback speed factor (default 1)')
    p.add_argument('--namespace', default='', help='namespace of the policy node')
    p.add_argument('--storage', choices=('mcap', 'sqlite3'), default='mcap', help='output bag storage')
    p.add_argument('--settle-s', type=float, default=2.0, help='seconds to run on after playback ends')
    p.add_argument('--image-topic', default='/camera/image_raw',
                   help="the bag's camera topic (Image, or CompressedImage when it ends in /compressed; "
                        "'<topic>/compressed' is used when only that is recorded)")
    p.add_argument('--instruction-topic', default='/instruction', help="the bag's std_msgs/String instruction topic")
    p.add_argument('--state-topic', default='/joint_states',
                   help="the bag's JointState topic (read by policies with a state)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        result = run_live(args.bag, args.policy, args.out, policy_dirs=args.policy_dir, engine=args.engine,
                          control_rate_hz=args.control_rate_hz, rate=args.rate, namespace=args.namespace,
                          decoder=args.decoder, storage=args.storage, settle_s=args.settle_s,
                          image_topic=args.image_topic, instruction_topic=args.instruction_topic,
                          state_topic=args.state_topic)
    except (LiveReplayError, ValueError, FileExistsError) as err:
        print(f'blockvla-live-replay: error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {result.output_bag}: ' + ', '.join(f'{t} {n}' for t, n in sorted(result.counts.items())))
    if not result.counts.get(_absolute('action', args.namespace)):
        reasons = hold_reasons(result.logs.get('policy_node', ''))
        print('blockvla-live-replay: error: the node published no action: it held for the whole bag ('
              + ('; '.join(reasons) if reasons else 'it logged no reason') + ')', file=sys.stderr)
        return 1
    return 0


def hold_reasons(node_log: str) -> list:
    """The node's last distinct hold reasons (it logs 'holding: <why>' at each change), oldest first."""
    found = [r.strip() for r in re.findall(r'\]: holding: (.*)$', node_log, flags=re.MULTILINE)
             if r.strip() != 'shutting down']  # the final hold when this harness stops the node (policy_node)
    last = list(dict.fromkeys(reversed(found)))[:3]  # most recent first, distinct
    return last[::-1]


if __name__ == '__main__':
    sys.exit(main())
