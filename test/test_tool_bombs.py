"""Issue 13 item 2, offline tools: blockvla-replay and blockvla-train on a bag holding a decompression-bomb frame
refuse that frame (an error naming topic, stamp and size) with bounded memory (peak RSS of the tool's process)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from image_corpus import jpeg_bomb_junk_after_app0
from test_bag_reader import MS, T, T0, lockstep_records, write_bag
from test_training import make_config

ROOT = Path(__file__).resolve().parents[1]
PEAK_LIMIT_MB = 1500  # torch + a tiny model stay well below; the bomb alone decodes to ~2,700 MB
WRAPPER = ('import atexit, importlib, resource, sys; '
           "atexit.register(lambda: print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "
           'file=sys.stderr)); mod, fn = sys.argv.pop(1).split(":"); sys.argv[0] = mod; '
           'sys.exit(getattr(importlib.import_module(mod), fn)())')


@pytest.fixture(scope='module')
def bomb_bag(tmp_path_factory):
    records = lockstep_records('jpeg')
    index = next(i for i, r in enumerate(records) if r[0].endswith('/compressed')
                 and r[3].header.stamp.sec * 10**9 + r[3].header.stamp.nanosec == T0 + 200 * MS)
    topic, msgtype, bag_ns, msg = records[index]
    bomb = T['sensor_msgs/msg/CompressedImage'](header=msg.header, format=msg.format,
                                                data=np.frombuffer(jpeg_bomb_junk_after_app0(), np.uint8))
    records[index] = (topic, msgtype, bag_ns, bomb)
    return write_bag(tmp_path_factory.mktemp('bombs') / 'bomb_bag', 'mcap', records)


def run_tool(entry: str, *args: str) -> tuple[int, str, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / 'test'), os.environ.get('PYTHONPATH', '')]))
    out = subprocess.run([sys.executable, '-c', WRAPPER, entry, *args], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    peak = [int(line.split()[1]) for line in out.stderr.splitlines() if line.startswith('PEAK_RSS_MB')]
    return out.returncode, out.stderr, peak[-1]


def test_replay_refuses_the_bomb_frame_with_bounded_memory(bomb_bag, tmp_path):
    code, err, peak = run_tool('blockvla_ros.evaluation.cli:main', '--bag', str(bomb_bag), '--policy', 'demo',
                               '--policy-dir', str(ROOT / 'models'), '--out', str(tmp_path / 'out'), '--quiet',
                               '--state-topic', '/joint_states', '--warmup', '0')
    assert code != 0, err[-2000:]
    assert f'image on /camera/image_raw/compressed at stamp {T0 + 200 * MS} ns' in err and 'too large: 30000x30000' \
        in err, err[-2000:]
    assert peak < PEAK_LIMIT_MB, f'peak RSS {peak} MB'


def test_train_refuses_the_bomb_frame_with_bounded_memory(bomb_bag, tmp_path):
    cfg = tmp_path / 'train.yaml'
    make_config(tmp_path / 'run', [bomb_bag], data={'on_bad_bag': 'error'}).save(cfg)
    code, err, peak = run_tool('blockvla_ros.training.cli:main', '--config', str(cfg), '--no-progress')
    assert code == 2, err[-2000:]
    assert 'too large: 30000x30000' in err, err[-2000:]
    assert peak < PEAK_LIMIT_MB, f'peak RSS {peak} MB'
