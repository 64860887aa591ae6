"""Parameter handling of the policy node: validation in the set-callback, the background swap after it.

The set-callback only validates (values, configure-time parameters, and for ``policy``: resolve inside the policy
directories, verify the manifest, compare the action space with the running policy). The post-set callback starts
the background load; a load that fails reverts the parameter to the running policy (on the executor, through a
guard condition) and says why in the log and /diagnostics.
"""
from __future__ import annotations

from typing import Optional

from rcl_interfaces.msg import SetParametersResult
from rclpy.parameter import Parameter

from . import params as P


class PolicyParameters:
    """Mixin for PolicyNode (uses its policies, logger, ``_live_from``, ``_fail`` and ``_revert_guard``)."""

    _revert_policy: Optional[str] = None
    _running_policy_param: Optional[str] = None

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Validation only: values, configure-time parameters, and a policy swap's folder and action space."""
        configured = self.policies is not None
        for param in parameters:
            reason = P.check_value(param.name, param.value)
            spec = P.SPEC_BY_NAME.get(param.name)
            if reason is None and spec is not None and not spec.live and configured:
                reason = f'{param.name} is read at configure: deactivate and clean up the node first'
            if reason is None and param.name == 'policy' and configured and not self.policies.is_running(param.value):
                try:
                    self.policies.validate(param.value)
                except (ValueError, OSError) as e:
                    reason = f'policy {param.value!r} refused: {e}'
            if reason:
                self.get_logger().warning(f'parameter {param.name} refused: {reason}')
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, parameters) -> None:
        for param in parameters:
            if param.name in ('max_image_age_s', 'chunk_threshold', 'real_time_chunking'):
                self._live_from(P.read(self))
            elif param.name == 'policy' and self.policies is not None:
                if self.policies.is_running(param.value):
                    self._running_policy_param = param.value
                    continue
                try:
                    self.policies.start_swap(param.value)
                    self.get_logger().info(f'loading policy {param.value!r} in the background')
                except ValueError as e:
                    self._fail('policy swap', e)

    def _on_swap_done(self, name: str, error: Optional[str]) -> None:
        """Loader thread: success keeps the new name; failure reverts the parameter on the executor."""
        if error is None:
            self._running_policy_param = name
            self.get_logger().info(f'policy {name!r} loaded; it takes over at the next chunk')
            return
        self.last_error = f'policy swap to {name!r} failed, still running {self._running_policy_param!r}: {error}'
        self.get_logger().error(self.last_error)
        self._revert_policy = self._running_policy_param
        self._revert_guard.trigger()

    def _apply_revert(self) -> None:
        name, self._revert_policy = self._revert_policy, None
        if name is not None:
            self.set_parameters([Parameter('policy', value=name)])
