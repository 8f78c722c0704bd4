"""Authorization policy (issue 5): Cedar RBAC + ABAC decisions for the authorize stage.

- `config.PolicyConfig`: the ``policy:`` config section.
- `mapping.RequestMapper`: request facts -> Cedar `DecisionInput` (the operator contract).
- `engine.PolicyEngine`: load + validate + decide (cached, fail closed) + atomic reload.
- `owners`: owner sources for object-level authorization (BOLA).
- `testing`: ``portcullis policy test`` and ``explain``.
"""

from portcullis.policy.config import PolicyConfig
from portcullis.policy.engine import Decision, PolicyEngine, PolicyError, PolicyProblem, ReloadOutcome
from portcullis.policy.mapping import DecisionInput, RequestMapper, generate_schema
from portcullis.policy.owners import Owner, OwnerLookupError, OwnerSource, build_owner_source

__all__ = [
    "Decision", "DecisionInput", "Owner", "OwnerLookupError", "OwnerSource", "PolicyConfig", "PolicyEngine",
    "PolicyError", "PolicyProblem", "ReloadOutcome", "RequestMapper", "build_owner_source", "generate_schema",
]
