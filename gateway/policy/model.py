"""A policy as pydantic models: what one YAML file in `policies/` declares (DESIGN.md §8).

A policy watches part of the plant (its `scope`), fires on a `trigger`, proposes one `action`
(a new setpoint computed by an expression), predicts its effect with a `simulation`, and lets
the gate decide from the predicted trajectory's `safety` constraints and `objective` and its
`thresholds`; below them a person with one of the `approval` roles decides.

Expressions (conditions, the action's value, interlocks, the objective, bound model
parameters) are parsed here, at load, by gateway.policy.expr: a policy that loads holds only
expressions that parse and give the right kind of result. Point references come in two forms,
in expressions and in keys alike: a point id as the site config writes it
(`line1/oven1/temperature`; in an expression `point("line1/oven1/temperature")`, since `/` and
`-` are operators there), or an alias the policy declares under `points:` (`temperature`).
Whether the points exist, and whether the action's point is writable and its bounds inside the
point's limits, needs the site config: gateway.policy.load checks that.

Every model forbids unknown keys and is frozen, as the site config's are.
"""

from __future__ import annotations

import string
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictInt,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from gateway.config.model import NAME_PATTERN, POINT_ID_PATTERN
from gateway.config.problems import short_repr
from gateway.policy.expr import Expr, ExprError, Name, parse
from gateway.sim.models import MAX_PATHS, Model, StateSpaceModel, WeibullModel

__all__ = [
    "ANOMALY_KINDS",
    "FAILURE_OUTPUT",
    "IDEMPOTENCY_FIELDS",
    "SCOPE_PATTERN",
    "AnomalyTrigger",
    "Approval",
    "Bounds",
    "ConditionTrigger",
    "FittedModel",
    "Objective",
    "Policy",
    "RateLimit",
    "SafetyConstraint",
    "SetParameter",
    "Simulation",
    "Thresholds",
    "Trigger",
]

# The anomaly detectors' kinds (issue 16): z-score, EWMA chart, rate of change, flatline (a stuck
# sensor), out of range, stale (no update).
ANOMALY_KINDS = ("zscore", "ewma", "rate_of_change", "flatline", "out_of_range", "stale")
AnomalyKind = Literal["zscore", "ewma", "rate_of_change", "flatline", "out_of_range", "stale"]

# The Weibull model's one output is no plant signal: 1 once the part has failed, else 0. Safety
# constraints and the objective name it so.
FAILURE_OUTPUT = "failure"

# What an idempotency key may be built from. `episode` is when the trigger's current episode
# began (whole Unix seconds): the default key executes at most once per episode.
IDEMPOTENCY_FIELDS = ("policy", "point", "episode", "value")

Role = Literal["supervisor", "admin"]  # the roles that may approve (DESIGN.md §8, RBAC)
_SUPERVISOR: list[Role] = ["supervisor"]

_MAX_EXPRESSIONS = 32  # interlocks or bound parameters a policy may list; far above any need
_WEEK_S = 7 * 24 * 3600.0


# -- expressions ---------------------------------------------------------------------------------


def _expression(value: Any, want: str) -> Expr:
    if not isinstance(value, str):
        raise ValueError(f"expected an expression (text), got {type(value).__name__}")
    try:
        expr = parse(value)
    except ExprError as exc:
        raise ValueError(_expression_error(value, exc)) from None
    if want == "boolean" and expr.kind == "number":
        raise ValueError(
            f"{short_repr(value)} gives a number; a condition must be true or false, "
            "e.g. `temperature > 183`"
        )
    if want == "number" and expr.kind == "boolean":
        raise ValueError(f"{short_repr(value)} gives true/false; a number is needed here")
    return expr


def _expression_error(text: str, exc: ExprError) -> str:
    """One line for an expression that does not parse: why, and where in the text."""
    if exc.position < 0:
        return exc.message
    pos = exc.position
    before = text[max(0, pos - 30) : pos]
    after = text[pos : pos + 30]
    shown = (
        ("…" if pos > 30 else "")
        + before
        + "⟪here⟫"
        + after
        + ("…" if pos + 30 < len(text) else "")
    )
    return f"{exc.message} (character {pos + 1}: {' '.join(shown.split())!r})"


def _condition(value: Any) -> Expr:
    return _expression(value, "boolean")


def _formula(value: Any) -> Expr:
    return _expression(value, "number")


def _text(expr: Expr) -> str:
    return expr.text


# True or false: a trigger, an interlock. Held parsed; written back as its text.
Condition = Annotated[
    Expr, PlainValidator(_condition), PlainSerializer(_text), WithJsonSchema({"type": "string"})
]
# A number: a setpoint, an objective, a model parameter.
Formula = Annotated[
    Expr, PlainValidator(_formula), PlainSerializer(_text), WithJsonSchema({"type": "string"})
]

# A point reference in a key: a point id, or an alias from the policy's `points:`.
PointRef = Annotated[str, Field(min_length=1, max_length=256)]


# -- trigger -------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # Non-finite numbers are refused: an `.inf` bound or a `.nan` step defeats every check.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ConditionTrigger(_Strict):
    """Fires when a condition over twin points has held for a duration."""

    when: Condition = Field(
        description="Condition over points, e.g. `temperature > 183` (an expression)."
    )
    for_s: float = Field(
        0.0,
        ge=0,
        le=_WEEK_S,
        description="Seconds the condition must hold without a break before the policy fires.",
    )


class AnomalyTrigger(_Strict):
    """Fires when an anomaly detector reports an anomaly of one kind."""

    anomaly: AnomalyKind = Field(
        description="Detector kind: " + ", ".join(f"`{k}`" for k in ANOMALY_KINDS) + "."
    )
    point: PointRef | None = Field(
        None, description="Point whose anomalies count; default: any point in the scope."
    )
    min_score: float = Field(
        0.5, ge=0, le=1, description="Lowest anomaly score (0..1) that fires the policy."
    )

    @model_validator(mode="before")
    @classmethod
    def _not_both(cls, data: Any) -> Any:
        if isinstance(data, dict) and "when" in data:
            raise ValueError(
                "a trigger is either a condition (`when`, `for_s`) or an anomaly "
                "(`anomaly`, `point`, `min_score`), not both"
            )
        return data


def _trigger_kind(value: Any) -> str:
    # Chosen by the key present, so YAML reads `trigger: {when: ...}` with no `kind:` line. The
    # tags are no keys a user writes: they must not be mistaken for a key path.
    if isinstance(value, dict) and "anomaly" in value:
        return "anomaly trigger"
    if isinstance(value, AnomalyTrigger):
        return "anomaly trigger"
    return "condition trigger"


Trigger = Annotated[
    Annotated[ConditionTrigger, Tag("condition trigger")]
    | Annotated[AnomalyTrigger, Tag("anomaly trigger")],
    Discriminator(_trigger_kind),
]


# -- action --------------------------------------------------------------------------------------


class Bounds(_Strict):
    """Hard bounds of the action's value; the point's own configured range still applies."""

    lo: float = Field(description="Lowest value the policy may write.")
    hi: float = Field(description="Highest value the policy may write.")

    @model_validator(mode="after")
    def _order(self) -> Bounds:
        if not self.lo < self.hi:
            raise ValueError(f"lo must be below hi, got lo={self.lo:g} hi={self.hi:g}")
        return self


class RateLimit(_Strict):
    """At most `max_writes` writes by this policy in any window of `per_s` seconds."""

    max_writes: StrictInt = Field(1, ge=1, le=1000, description="Writes allowed per window.")
    per_s: float = Field(gt=0, le=_WEEK_S, description="Window length in seconds.")


def _idempotency_template(value: str) -> str:
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as exc:  # a lone `{` or `}`
        raise ValueError(f"{exc}; write {{{{ and }}}} for literal braces") from None
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in IDEMPOTENCY_FIELDS:
            allowed = ", ".join(f"{{{f}}}" for f in IDEMPOTENCY_FIELDS)
            raise ValueError(f"unknown placeholder {{{name}}}; the placeholders are {allowed}")
        if spec or conversion:
            # A format spec fails only when the key is rendered, in the middle of a decision.
            raise ValueError(f"{{{name}}} takes no format (`!r`, `:.1f`): write it bare")
    return value


class SetParameter(_Strict):
    """Write a new value to one writable point."""

    type: Literal["set_parameter"] = Field(description="Action type: `set_parameter`.")
    point: PointRef = Field(description="The writable point (a point id or an alias).")
    value: Formula = Field(
        description="The value to write, an expression over points, e.g. "
        "`setpoint - (temperature - 180)`."
    )
    bounds: Bounds = Field(
        description="Hard bounds `{lo, hi}`: a value outside is rejected, never clamped. They "
        "must lie within the point's configured range: a policy narrows, never widens."
    )
    max_step: float = Field(
        gt=0, description="Largest change from the point's current value in one write."
    )
    rate_limit: RateLimit = Field(description="How often this policy may write.")
    interlocks: list[Condition] = Field(
        default_factory=list,
        max_length=_MAX_EXPRESSIONS,
        description="Conditions that must all hold for the write, e.g. `running`.",
    )
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        "{policy}:{episode}",
        description="A proposal whose key was executed before is never executed again; "
        "placeholders " + ", ".join(f"`{{{f}}}`" for f in IDEMPOTENCY_FIELDS) + ".",
    )

    @field_validator("idempotency_key")
    @classmethod
    def _key_template(cls, value: str) -> str:
        return _idempotency_template(value)


# -- simulation ----------------------------------------------------------------------------------


class FittedModel(_Strict):
    """An FOPDT model fitted to the twin's recent history of the action's point and the output."""

    history_minutes: float = Field(
        60.0, gt=0, le=7 * 24 * 60, description="History window fitted, in minutes."
    )
    dt_s: float = Field(1.0, gt=0, le=3600, description="Resampling step of the fit, in seconds.")


class Simulation(_Strict):
    """How the action's effect is predicted: a model, horizon and paths."""

    model: Model | None = Field(
        None,
        description="A model from the what-if vocabulary (`fopdt`, `tank`, `weibull`, "
        "`state_space`); its input is the action's point. Exactly one of `model` and `fitted`.",
    )
    fitted: FittedModel | None = Field(
        None, description="Fit an FOPDT model from the twin's history instead of `model`."
    )
    output: PointRef | list[PointRef] | None = Field(
        None,
        description="The point the model predicts (its current value starts the prediction); "
        "a list for a state-space model's outputs; none for `weibull` (output `failure`).",
    )
    bind: dict[str, Formula] = Field(
        default_factory=dict,
        max_length=_MAX_EXPRESSIONS,
        description="Model parameters computed from points when the policy fires, "
        "e.g. `{a0: heater_wear * 2000000}`.",
    )
    horizon_s: float = Field(gt=0, description="Prediction horizon in seconds.")
    dt_s: float = Field(gt=0, description="Prediction step in seconds.")
    paths: StrictInt = Field(1000, gt=0, le=MAX_PATHS, description="Monte Carlo paths.")

    @model_validator(mode="after")
    def _one_model(self) -> Simulation:
        if (self.model is None) == (self.fitted is None):
            raise ValueError(
                "give exactly one of `model` (a model) and `fitted` (fit from history)"
            )
        return self

    @property
    def model_input_free(self) -> bool:
        """Whether the model ignores the action's value (weibull wear: only its age counts)."""
        return isinstance(self.model, WeibullModel)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The model's outputs in order, as written (point ids, aliases or `failure`)."""
        if isinstance(self.model, WeibullModel):
            return (FAILURE_OUTPUT,)
        if self.output is None:
            return ()
        return tuple(self.output) if isinstance(self.output, list) else (self.output,)


class SafetyConstraint(_Strict):
    """A limit the predicted trajectory of one output must keep over the whole horizon."""

    output: PointRef = Field(
        description="A simulated output: the simulation's `output` (or `failure` for weibull)."
    )
    upper: float | None = Field(None, description="Violated when the output goes above this.")
    lower: float | None = Field(None, description="Violated when the output goes below this.")

    @model_validator(mode="after")
    def _a_limit(self) -> SafetyConstraint:
        if self.upper is None and self.lower is None:
            raise ValueError("give `upper`, `lower` or both")
        if self.upper is not None and self.lower is not None and not self.lower < self.upper:
            raise ValueError(
                f"lower must be below upper, got lower={self.lower:g} upper={self.upper:g}"
            )
        return self


class Objective(_Strict):
    """What the action should improve, judged on each simulated path against doing nothing."""

    minimize: Formula | None = Field(
        None, description="Expression to make smaller, e.g. `abs(temperature - 180)`."
    )
    maximize: Formula | None = Field(None, description="Expression to make larger.")
    at: Literal["final", "mean", "max", "min"] = Field(
        "final",
        description="Which per-path statistic of a simulated output the expression sees; "
        "other points keep their current value.",
    )

    @model_validator(mode="after")
    def _one(self) -> Objective:
        if (self.minimize is None) == (self.maximize is None):
            raise ValueError("give exactly one of `minimize` and `maximize`")
        return self

    @property
    def expression(self) -> Expr:
        """The expression, whichever direction."""
        expr = self.minimize if self.minimize is not None else self.maximize
        assert expr is not None  # the validator saw to it
        return expr


class Thresholds(_Strict):
    """Confidence needed for each decision."""

    auto_execute_min: float = Field(
        0.90, ge=0, le=1, description="Confidence at or above which the action executes alone."
    )
    approve_min: float = Field(
        0.70,
        ge=0,
        le=1,
        description="Confidence at or above which the action waits for approval; below it, "
        "for analysis.",
    )

    @model_validator(mode="after")
    def _order(self) -> Thresholds:
        if not self.approve_min <= self.auto_execute_min:
            raise ValueError(
                f"approve_min ({self.approve_min:g}) must not exceed auto_execute_min "
                f"({self.auto_execute_min:g})"
            )
        return self


class Approval(_Strict):
    """Who may approve an action that waits, and for how long it waits."""

    roles: list[Role] = Field(
        default_factory=lambda: list(_SUPERVISOR),
        min_length=1,
        description="Roles that may approve: `supervisor`, `admin`.",
    )
    expiry_s: float = Field(
        900.0,
        gt=0,
        le=_WEEK_S,
        description="Seconds after which an unapproved action is rejected.",
    )


# -- the policy ----------------------------------------------------------------------------------


def _alias(alias: str) -> str:
    if alias == FAILURE_OUTPUT:
        raise ValueError(f"alias {alias!r} is reserved for the weibull model's output")
    try:
        expr = parse(alias)
    except ExprError as exc:
        raise ValueError(
            f"alias {alias!r} cannot be used in an expression: {exc.message}"
        ) from None
    if not isinstance(expr.tree, Name):
        raise ValueError(
            f"alias {alias!r} is not a name (a letter, then letters, digits and `_`; "
            "`.` between parts)"
        )
    return alias


Alias = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_alias)]
SCOPE_PATTERN = r"^[a-z0-9_.\-/*?\[\]!]+$"
ScopeGlob = Annotated[str, Field(min_length=1, max_length=256, pattern=SCOPE_PATTERN)]


class Policy(_Strict):
    """One policy file."""

    id: Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)] = Field(
        description="Unique policy id (letters, digits, `_ . -`, up to 64 characters)."
    )
    description: str = Field("", max_length=2000, description="Free text shown to operators.")
    enabled: bool = Field(True, description="A disabled policy is loaded and checked, never run.")
    scope: ScopeGlob = Field(
        description="Asset glob the policy acts in, e.g. `line1/oven1/*` (`*`, `?`, `[...]`); "
        "the action's point must match it, and approvers' grants are matched against it."
    )
    points: dict[Alias, Annotated[str, Field(pattern=POINT_ID_PATTERN, max_length=256)]] = Field(
        default_factory=dict,
        max_length=256,
        description="Aliases for point ids, usable in expressions and keys: "
        "`{temperature: line1/oven1/temperature}`.",
    )
    trigger: Trigger = Field(
        description="When the policy fires: `{when, for_s}` or `{anomaly, point, min_score}`."
    )
    action: SetParameter = Field(description="What the policy proposes.")
    simulation: Simulation = Field(description="How the proposal's effect is predicted.")
    safety: list[SafetyConstraint] = Field(
        min_length=1,
        max_length=_MAX_EXPRESSIONS,
        description="Limits the predicted trajectory must keep; at least one.",
    )
    objective: Objective | None = Field(
        None, description="What the action should improve; none: safety alone decides."
    )
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Decision thresholds.")
    approval: Approval = Field(default_factory=Approval, description="Approval roles and expiry.")

    def point_id(self, ref: str) -> str:
        """The point id a reference stands for: an alias's point, or the id itself."""
        return self.points.get(ref, ref)


def is_point_id(ref: str) -> bool:
    """Tell a point id (`area/asset/signal`) from an alias (no `/`)."""
    return "/" in ref


def model_inputs(model: Any) -> int:
    """How many inputs a what-if model takes (the action drives one)."""
    if isinstance(model, StateSpaceModel):
        return model.n_inputs
    return 0 if isinstance(model, WeibullModel) else 1
