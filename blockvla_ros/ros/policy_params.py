"""Parameter handling of the policy node: validation in the set-callback, the background swap after it.

The set-callback only validates (values; for ``policy``: resolve inside the policy directories, verify the folder,
compare the action space with the running policy). Everything but ``policy`` and the live knobs is read-only after
start-up (rclpy refuses those sets from the descriptor; the set-callback refuses rclpy's own ``use_sim_time``). The
post-set callback hands the new ``policy`` to the PolicyManager's swap state machine; a load that fails sets the
parameter back to the running policy (on the executor, through a guard condition, unless a newer set was accepted
meanwhile) and says why in the log and /diagnostics.

No exception may leave these callbacks: one escaping a parameter callback ends rclpy's executor (the node dies and
the caller never gets an answer), so each callback catches everything at its boundary, counts it and answers.
"""
from __future__ import annotations

from typing import Optional

from rcl_interfaces.msg import SetParametersResult
from rclpy.parameter import Parameter

from . import params as P


class PolicyParameters:
    """Mixin for PolicyNode (uses its policies, status, logger, ``_apply_live``, ``_fail`` and ``_revert_guard``)."""

    _revert_policy: Optional[str] = None

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        try:
            reason = self._refusal(parameters)
        except Exception as e:  # a bug in validation must still answer the caller and keep the node up
            self.status.add('callback_errors')
            reason = f'could not be checked ({type(e).__name__}: {e})'
        if reason:
            self.get_logger().warning(f'parameter set refused: {reason}')
            return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _refusal(self, parameters) -> Optional[str]:
        """Why this set is refused (None: accepted)."""
        policies = self.policies
        for param in parameters:
            spec = P.SPEC_BY_NAME.get(param.name)
            # rclpy refuses our read-only ones from the descriptor (this is the fallback); not its own use_sim_time,
            # which set live would freeze the node's clock and hand the tick rate to whoever publishes /clock
            if spec is None or not spec.live:
                return f'{param.name} is read-only after start-up (restart the node to change it)'
            reason = P.check_value(param.name, param.value)
            if reason:
                return reason
            if param.name == 'policy' and policies is not None and not policies.is_running(param.value):
                try:
                    policies.validate(param.value)
                except Exception as e:  # PolicyFolderError, or whatever a malformed folder makes a reader raise
                    detail = str(e) if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'
                    return f'policy {param.value!r} refused: {detail}'
        return None

    def _after_set_parameters(self, parameters) -> None:
        try:
            for param in parameters:
                if param.name == 'policy' and self.policies is not None:
                    what = self.policies.request(param.value)
                    if what != 'running':
                        self.get_logger().info(f'policy {param.value!r}: {what} in the background')
                elif param.name in P.SPEC_BY_NAME and P.SPEC_BY_NAME[param.name].live:
                    self._apply_live(P.live_values(self))
        except Exception as e:
            self.status.add('callback_errors')
            self._fail('applying a parameter', e)

    def _on_swap_done(self, name: str, error: Optional[str], restore: Optional[str]) -> None:
        """Loader thread: a failure is reported; if the parameter still named the failed policy, it goes back."""
        if error is None:
            return
        self.status.set(last_error=f'policy swap to {name!r} failed, still running '
                                   f'{self.policies.current_name if self.policies else None!r}: {error}')
        self.get_logger().error(self.status.get('last_error'))
        if restore is not None:
            self._revert_policy = restore
            self._revert_guard.trigger()

    def _apply_revert(self) -> None:
        try:
            name, self._revert_policy = self._revert_policy, None
            policies = self.policies
            # only while the manager still asks for it: a set accepted since the failure (validated while the load
            # failed) is the operator's newer choice, and is loading now
            if name is not None and (policies is None or policies.requested == name):
                self.set_parameters([Parameter('policy', value=name)])
        except Exception as e:
            self.status.add('callback_errors')
            self._fail('restoring the policy parameter', e)
