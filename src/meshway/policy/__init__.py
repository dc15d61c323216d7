"""Policy decisions as pure functions: the node proxy's L4 authorization."""

from meshway.policy.authorization import (
    DEFAULT_ROOT_NAMESPACE,
    CompiledPolicy,
    Connection,
    Decision,
    IpAddress,
    PolicyIndex,
    PolicySet,
    applicable_policies,
    compile_policy,
    evaluate_authorization,
)

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "CompiledPolicy",
    "Connection",
    "Decision",
    "IpAddress",
    "PolicyIndex",
    "PolicySet",
    "applicable_policies",
    "compile_policy",
    "evaluate_authorization",
]
