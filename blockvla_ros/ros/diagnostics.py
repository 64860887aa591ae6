"""What the policy node reports in /diagnostics: one status with level, summary and key/values (no rclpy).

Each part reports itself: the node's :class:`~blockvla_ros.ros.node_status.StatusValues` snapshot, the
PolicyManager's ``diagnostics()``, the InputStore, the ActionQueue's statistics, the tick monitor and the latency
windows. ``collect`` only arranges them and decides the level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


@dataclass
class Sources:
    """Everything /diagnostics reads, handed over explicitly (None where the node is not configured)."""

    status: Any  # StatusValues snapshot
    now: float
    engine: str = ''
    control_rate_hz: Optional[float] = None
    max_image_age_s: Optional[float] = None
    policies: Any = None  # PolicyManager
    queue: Any = None  # ActionQueue
    inputs: Any = None  # InputStore
    ticks: Any = None  # TickMonitor
    priority_error: str = ''
    inference_s: Any = None  # RollingWindow
    e2e_s: Any = None  # RollingWindow
    delay: Any = None  # DelayEstimator
    real_time_chunking: bool = False  # the live knob: chunks continue the old plan's actions (known_actions_last)


def _timing(src: Sources, values: dict) -> None:
    values['control_rate_hz'] = src.control_rate_hz
    if src.ticks is not None:
        values['measured_rate_hz'] = src.ticks.rate_hz()
        values.update(src.ticks.summary_ms())
        values['missed_ticks'] = src.ticks.missed
        values['ticks'] = src.ticks.ticks
    if src.priority_error:
        values['control_thread_priority_error'] = src.priority_error
    if src.inference_s is not None:
        values['inference_latency_last_ms'] = _ms(src.inference_s.last)
        values['inference_latency_p50_ms'] = _ms(src.inference_s.percentile(50))
        values['inference_latency_p99_ms'] = _ms(src.inference_s.percentile(99))
    if src.delay is not None:
        values['expected_delay_ms'] = _ms(src.delay.expected())
    if src.e2e_s is not None:
        values['e2e_latency_p50_ms'] = _ms(src.e2e_s.percentile(50))
        values['e2e_latency_p99_ms'] = _ms(src.e2e_s.percentile(99))
        values['e2e_latency_samples'] = src.e2e_s.count


def _queue(queue, values: dict) -> None:
    q = queue.stats
    values['queue_depth'] = queue.depth()
    values['chunks'] = q.chunks_pushed
    values['chunks_rejected_late'] = q.chunks_rejected
    values['actions_dropped_overdue'] = q.dropped_overdue
    values['actions_dropped_late'] = q.dropped_late
    values['seam_jump_last'] = q.seam_last
    values['seam_jump_max'] = q.seam_max
    values['seam_jump_mean'] = q.seam_mean


def _inputs(inputs, now: float, max_age: Optional[float], values: dict) -> None:
    c = inputs.counters
    values['image_age_s'] = inputs.image_age(now)
    values['max_image_age_s'] = max_age
    values['images'] = c.images
    values['images_rejected'] = c.images_rejected
    values['images_unstamped'] = c.images_unstamped
    values['last_image_error'] = c.last_image_error
    values['instruction'] = (inputs.instruction or '')[:200]
    values['instructions_rejected'] = c.instructions_rejected
    values['last_instruction_error'] = c.last_instruction_error
    values['joint_states'] = c.joint_states
    values['joint_states_rejected'] = c.joint_states_rejected
    values['joint_state_age_s'] = inputs.joint_state_age(now)
    values['last_joint_state_error'] = c.last_joint_state_error


def collect(src: Sources) -> tuple:
    """(level 'ok'|'warn'|'error', message, values dict)."""
    st = src.status
    values: dict = {'lifecycle_state': st.lifecycle_state}
    policy = src.policies.diagnostics() if src.policies is not None else {}
    values.update(policy)
    values.update(st.extra)
    _timing(src, values)
    if src.queue is not None:
        _queue(src.queue, values)
    values['actions_clipped'] = st.clipped_values
    values['real_time_chunking'] = src.real_time_chunking
    values['known_actions_last'] = st.known_last
    values['fresh_chunks_new_instruction'] = st.fresh_chunks
    values['chunks_dropped_instruction_changed'] = st.stale_chunks_dropped
    values['nfe_last'] = st.nfe_last
    if src.inputs is not None:
        _inputs(src.inputs, src.now, src.max_image_age_s, values)
    values['qos_incompatible_events'] = st.qos_incompatible
    values['inference_errors'] = st.inference_errors
    values['last_inference_error'] = st.last_inference_error
    values['callback_errors'] = st.callback_errors
    values['rate_warning'] = st.rate_warning
    values['last_error'] = st.last_error
    values['holding'] = bool(st.hold_reason)
    values['hold_reason'] = st.hold_reason or ''
    return (*_level(st, policy), values)


def _level(st, policy: dict) -> tuple:
    state, hold, name = st.lifecycle_state, st.hold_reason, policy.get('policy')
    if name is None:
        if st.last_error:
            return 'error', f'{state}: {st.last_error}'
        return 'warn', f'{state}: no policy loaded'
    if state != 'active':
        level, message = 'ok', f'{state}: {name} loaded on {policy.get("backend")}'
    elif hold:
        level, message = 'warn', f'holding: {hold}'
    else:
        level, message = 'ok', f'running {name} on {policy.get("backend")}'
    for problem in (policy.get('last_swap_error') and f'last swap failed: {policy["last_swap_error"]}',
                    st.rate_warning):
        if problem and level == 'ok':
            level, message = 'warn', f'{message}; {problem}'
    return level, message
