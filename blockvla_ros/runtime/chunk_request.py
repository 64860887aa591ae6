"""One inference of the policy node, ROS-free: plan it on the ActionQueue, predict, keep the known prefix exact.

    plan = queue.plan_request(obs_stamp, asked, expected_delay_s, max_known)
    pred = runner.predict(image, instruction, state, known_actions=plan.known)   # k = len(plan.known)
    actions[:k] = plan.known     # exactly what was planned for those ticks (tokenizing rounds to bin centres)

The caller then applies the robot's limits to ``actions[k:]`` and calls ``queue.push_chunk(actions, obs_stamp,
arrived)``. Action i of the chunk is planned for ``plan.start_time + i * dt`` (the observation's tick), so the k
known actions are the ones the old plan holds for the observation's tick onwards: those executed since the image
was taken and those that will run before the new chunk can arrive.

Real-time chunking (``max_known > 0``) conditions the decoder on that prefix as if the policy had chosen it for
this observation. A policy trained on demonstrations (every prefix it saw was the demonstrator's own, consistent
with the image) takes a stale plan at its word and may continue it instead of reacting to the camera: see the
README ("Real-time chunking") before turning it on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .action_queue import ActionQueue


@dataclass(frozen=True)
class ChunkRequest:
    """A predicted chunk ready for post-processing and ``push_chunk``."""

    actions: np.ndarray  # [H, D] float32; rows < known are the old plan's actions, bit for bit
    known: int  # k: actions given to the decoder as already decided (0 without real-time chunking)
    start_time: float  # planned time of actions[0] (the observation's tick)
    prediction: Any  # the runner's Prediction (nfe, timings)


def request_chunk(runner, queue: ActionQueue, image: np.ndarray, instruction: str, state: Optional[np.ndarray],
                  obs_stamp: float, asked: float, expected_delay_s: float, max_known: int) -> ChunkRequest:
    """Predict the chunk for an observation stamped ``obs_stamp``, asked at ``asked`` on the queue's clock.

    ``max_known`` caps the real-time-chunking prefix (0: none, the chunk is decoded from the observation alone).
    """
    plan = queue.plan_request(obs_stamp, asked, expected_delay_s, max_known)
    k = len(plan.known)
    pred = runner.predict(image, instruction, state=state, known_actions=plan.known if k else None)
    actions = np.array(pred.actions, dtype=np.float32)  # [H, D]
    actions[:k] = plan.known
    return ChunkRequest(actions, k, plan.start_time, pred)
