"""What the policy node reports in /diagnostics: one status with level, summary and key/values (no rclpy)."""
from __future__ import annotations

from typing import Any


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def collect(node: Any) -> tuple:
    """(level 'ok'|'warn'|'error', message, values dict) from a PolicyNode's state (read-only, thread-safe)."""
    values: dict = {'lifecycle_state': node.lifecycle_state}
    runner = node.policies.current if node.policies is not None else None
    if runner is not None:
        values['policy'] = runner.name
        values['policy_folder'] = str(runner.folder)
        describe = {}
        try:
            describe = dict(runner.describe())
        except Exception as e:  # a describe() bug must not take the diagnostics down
            describe = {'describe_error': str(e)}
        values['backend'] = describe.get('engine', node.params['engine'] if node.params else '')
        for key, value in describe.items():
            values[f'runtime.{key}'] = value
        values['chunk_len'] = runner.config.chunk_len
        values['action_dim'] = runner.config.action_dim
    if node.policies is not None:
        values['pending_policy'] = node.policies.loading or ''
        values['policy_swaps'] = node.policies.swaps
        values['last_swap_error'] = node.policies.last_swap_error
    values['control_rate_hz'] = node.params['control_rate_hz'] if node.params else None
    if node.ticks is not None:
        values['measured_rate_hz'] = node.ticks.rate_hz()
        values.update(node.ticks.summary_ms())
        values['missed_ticks'] = node.ticks.missed
        values['ticks'] = node.ticks.ticks
    loop = getattr(node, '_loop', None)
    if loop is not None and loop.priority_error:
        values['control_thread_priority_error'] = loop.priority_error
    values['inference_latency_last_ms'] = _ms(node.inference_s.last)
    values['inference_latency_p50_ms'] = _ms(node.inference_s.percentile(50))
    values['inference_latency_p99_ms'] = _ms(node.inference_s.percentile(99))
    values['expected_delay_ms'] = _ms(node.delay.expected())
    values['e2e_latency_p50_ms'] = _ms(node.e2e_s.percentile(50))
    values['e2e_latency_p99_ms'] = _ms(node.e2e_s.percentile(99))
    values['e2e_latency_samples'] = node.e2e_s.count
    now = node.now_seconds()
    if node.queue is not None:
        q = node.queue.stats
        values['queue_depth'] = node.queue.depth()
        values['chunks'] = q.chunks_pushed
        values['chunks_rejected_late'] = q.chunks_rejected
        values['actions_dropped_overdue'] = q.dropped_overdue
        values['actions_dropped_late'] = q.dropped_late
        values['seam_jump_last'] = q.seam_last
        values['seam_jump_max'] = q.seam_max
        values['seam_jump_mean'] = q.seam_mean
    values['actions_clipped'] = node.clipped_values
    values['known_actions_last'] = node.known_last
    values['nfe_last'] = node.nfe_last
    if node.inputs is not None:
        c = node.inputs.counters
        age = node.inputs.image_age(now)
        values['image_age_s'] = age
        values['max_image_age_s'] = node.max_image_age_s
        values['images'] = c.images
        values['images_rejected'] = c.images_rejected
        values['images_unstamped'] = c.images_unstamped
        values['last_image_error'] = c.last_image_error
        values['instruction'] = (node.inputs.instruction or '')[:200]
        values['instructions_rejected'] = c.instructions_rejected
        values['last_instruction_error'] = c.last_instruction_error
        values['joint_states_rejected'] = c.joint_states_rejected
        values['last_joint_state_error'] = c.last_joint_state_error
    values['qos_incompatible_events'] = node.qos_incompatible
    values['inference_errors'] = node.inference_errors
    values['last_inference_error'] = node.last_inference_error
    values['last_error'] = node.last_error
    hold = node.hold_reason
    values['holding'] = bool(hold)
    values['hold_reason'] = hold or ''

    state = node.lifecycle_state
    if runner is None:
        level = 'error' if node.last_error else 'warn'
        message = f'{state}: {node.last_error}' if node.last_error else f'{state}: no policy loaded'
    elif state != 'active':
        level, message = 'ok', f'{state}: {runner.name} loaded on {values.get("backend")}'
    elif hold:
        level, message = 'warn', f'holding: {hold}'
    else:
        level, message = 'ok', f'running {runner.name} on {values.get("backend")}'
    if node.policies is not None and node.policies.last_swap_error and level == 'ok':
        level, message = 'warn', f'{message}; last swap failed: {node.policies.last_swap_error}'
    return level, message, values
