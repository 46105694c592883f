"""The policy engine (DESIGN.md §8): policies, the decision gate, execution, RBAC and audit."""
