"""One expert episode as one rosbag2 recording: the tick loop and the ending both recorders share.

A tick is (instruction, image, state, action), all written with the stamp RECORDING_START_NS + k * step_ns; the
instruction at the first tick and then once per INSTRUCTION_PERIOD_NS. After the last tick the episode's metadata
goes into the bag's custom_data as `blockvla.<key>`; the bag appears at its path only if the episode succeeded
(anything raised, or a failed episode, leaves nothing behind: RecordingWriter writes into a temp dir).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from blockvla_ros.io.bag_writer import RecordingWriter

RECORDING_START_NS = 1_700_000_000 * 1_000_000_000   # every bag starts here: deterministic stamps
INSTRUCTION_PERIOD_NS = 1_000_000_000                # the instruction is re-published every second

Tick = tuple[str, np.ndarray, np.ndarray, np.ndarray]   # instruction, image [H, W, 3] uint8, state, action


def bag_name(task: str, seed: int, episode: int) -> str:
    """Deterministic bag directory name of one recorded episode."""
    return f'{task}_seed{seed}_ep{episode:04d}'


def record_episode(writer: RecordingWriter, ticks: Iterable[Tick], step_ns: int, state_names, action_names,
                   metadata: Callable[[], dict], succeeded: Callable[[], bool]) -> Path | None:
    """Write `ticks` into the (unopened) `writer`, then `metadata()` (read after the last tick, when the episode's
    outcome is known); returns the bag's path, or None (nothing written) when `succeeded()` is false."""
    writer.open()
    try:
        last_instruction = None
        for k, (instruction, image, state, action) in enumerate(ticks):
            t = RECORDING_START_NS + k * step_ns
            if last_instruction is None or t - last_instruction >= INSTRUCTION_PERIOD_NS:
                writer.write_instruction(t, instruction)
                last_instruction = t
            writer.write_image(t, image)
            writer.write_state(t, state, state_names)
            writer.write_action(t, action, action_names)
        for key, value in metadata().items():
            writer.set_metadata(f'blockvla.{key}', str(value))
    except BaseException:
        writer.abort()
        raise
    if not succeeded():
        writer.abort()
        return None
    return writer.close()
