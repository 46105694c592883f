"""When a policy fires: a condition held for a duration, or an anomaly of one kind. Pure.

A condition trigger fires once per episode: the condition must hold without a break for
`for_s` seconds; it fires then, and not again until the condition has stopped holding and held
again (a new episode). An episode is named by when it began, which the default idempotency key
uses, so a policy executes at most once per episode even across re-evaluations.

A condition that cannot be evaluated (a point with no value yet, a division by zero) does not
hold: it breaks the episode, as a false one does, and the reason is kept for the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.policy.expr import Env, ExprError
from gateway.policy.model import AnomalyTrigger, ConditionTrigger, Policy

__all__ = ["HoldTracker", "anomaly_fires"]


@dataclass(slots=True)
class HoldTracker:
    """The episode state of one policy's condition trigger."""

    trigger: ConditionTrigger
    since: float | None = None  # when the current episode began
    fired: bool = False
    last_error: str | None = None

    def update(self, env: Env, now: float) -> float | None:
        """Evaluate the condition at `now`; return the episode's start when the policy fires."""
        try:
            holds = self.trigger.when.evaluate(env) is True
            self.last_error = None
        except ExprError as exc:
            holds = False
            self.last_error = exc.message
        if not holds:
            self.since = None
            self.fired = False
            return None
        if self.since is None:
            self.since = now
        if not self.fired and now - self.since >= self.trigger.for_s:
            self.fired = True
            return self.since
        return None

    def due_at(self) -> float | None:
        """When a holding, unfired episode is due to fire (for a timer), or None."""
        if self.since is None or self.fired:
            return None
        return self.since + self.trigger.for_s


def anomaly_fires(policy: Policy, point_id: str, kind: str, score: float) -> bool:
    """Whether an anomaly of `kind` with `score` on `point_id` fires `policy`."""
    trigger = policy.trigger
    if not isinstance(trigger, AnomalyTrigger) or trigger.anomaly != kind:
        return False
    if score < trigger.min_score:
        return False
    if trigger.point is not None:
        return policy.point_id(trigger.point) == point_id
    return fnmatchcase(point_id, policy.scope)
