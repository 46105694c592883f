"""Load the policy files of a folder, validate them, and report every problem of every file at once.

Each `*.yaml` / `*.yml` file in the folder holds one policy (gateway.policy.model). Files are
read with the site config's reader (no FIFOs, devices, binary or non-UTF-8 text) and parsed with
its YAML parser (no alias bombs, deep nesting or duplicate keys), so a problem is named the same
way: file, key path and line. A set with any problem is refused whole, and the error lists all
of them: the gateway keeps the policies it runs until the folder is right.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from gateway.config.load import read_config_text
from gateway.config.model import NAME_PATTERN, POINT_ID_PATTERN, SiteConfig
from gateway.config.problems import (
    MAX_PROBLEMS_SHOWN,
    PathParts,
    Problem,
    problem_from_pydantic,
    short_repr,
    yaml_error_message,
)
from gateway.config.yamlpos import YamlDocument, format_path, parse_yaml
from gateway.errors import ConfigError
from gateway.policy.model import (
    FAILURE_OUTPUT,
    SCOPE_PATTERN,
    Policy,
    is_point_id,
    model_inputs,
)
from gateway.sim.models import (
    Constraint,
    Distribution,
    FopdtModel,
    HoldInput,
    Model,
    Scenario,
    StateSpaceModel,
    TankModel,
    WeibullModel,
)

__all__ = [
    "MAX_POLICY_BYTES",
    "MAX_POLICY_FILES",
    "PolicyError",
    "PolicyProblem",
    "PolicySet",
    "check_policy",
    "check_policy_against_site",
    "load_policies",
    "parse_policy",
]

# A policy is a page of YAML (~2 KB); a megabyte is a mistake (a log, a dump), not a policy.
MAX_POLICY_BYTES = 1024 * 1024
# Far more policies than a site writes by hand; a folder with more is the wrong folder.
MAX_POLICY_FILES = 1000
SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One problem in one policy file: the file, the key path and line when known, and why."""

    file: str
    message: str
    key: str | None = None
    line: int | None = None
    column: int | None = None  # only where the YAML itself is wrong

    def __str__(self) -> str:
        if self.key is not None:
            at = f" (line {self.line})" if self.line else ""
            return f"{self.file}: {self.key}{at}: {self.message}"
        at = f", line {self.line}" if self.line else ""
        at += f" column {self.column}" if self.line and self.column else ""
        return f"{self.file}{at}: {self.message}"


class PolicyError(ConfigError):
    """Policies that cannot be used; the message lists every problem, one line each."""

    def __init__(self, message: str, problems: Sequence[PolicyProblem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


@dataclass(frozen=True)
class PolicySet:
    """The policies of one folder, in file-name order, each with the file it came from."""

    folder: Path
    policies: tuple[Policy, ...] = ()
    files: Mapping[str, Path] = field(default_factory=dict)  # policy id -> its file

    def __iter__(self) -> Iterator[Policy]:
        """Iterate over the policies in file-name order."""
        return iter(self.policies)

    def __len__(self) -> int:
        """Count the policies."""
        return len(self.policies)

    def get(self, policy_id: str) -> Policy | None:
        """The policy with this id, or None."""
        return next((p for p in self.policies if p.id == policy_id), None)

    @property
    def enabled(self) -> tuple[Policy, ...]:
        """The policies that run (`enabled: true`)."""
        return tuple(p for p in self.policies if p.enabled)


def load_policies(folder: Path, site: SiteConfig | None = None) -> PolicySet:
    """Load every policy file in `folder`; raise PolicyError listing every problem of every file.

    With `site`, the policies are also checked against it: points exist, the action's point is
    writable and its bounds lie within the point's range.
    """
    folder = Path(folder)
    files = _policy_files(folder)
    problems: list[PolicyProblem] = []
    loaded: list[tuple[Policy, Path, YamlDocument]] = []
    for path in files:
        source = str(path)
        if path.is_dir():
            problems.append(
                PolicyProblem(
                    source, "a folder, not a policy file; rename it or move it out of the folder"
                )
            )
            continue
        try:
            text = read_config_text(path, what="policy", max_bytes=MAX_POLICY_BYTES)
        except ConfigError as exc:
            problems.append(_from_message(source, str(exc)))
            continue
        policy, doc, found = _parse(text, source, site)
        problems += found
        if policy is not None and doc is not None:
            loaded.append((policy, path, doc))
    problems += _duplicate_ids(loaded)
    if problems:
        raise _error(f"{folder}", len(files), problems)
    return PolicySet(
        folder=folder,
        policies=tuple(p for p, _, _ in loaded),
        files=MappingProxyType({p.id: path for p, path, _ in loaded}),
    )


def parse_policy(text: str, *, source: str = "<policy>", site: SiteConfig | None = None) -> Policy:
    """Validate one policy's YAML text; raise PolicyError listing each problem."""
    policy, _, problems = _parse(text, source, site)
    if problems or policy is None:
        raise _error(source, 1, problems)
    return policy


def check_policy(policy: Policy) -> list[Problem]:
    """Checks across a policy's keys that need no site config; pure, so tests need no files."""
    return [*_references(policy), *_scope(policy), *_simulation(policy), *_safety(policy)]


def check_policy_against_site(policy: Policy, site: SiteConfig) -> list[Problem]:
    """Check a policy against the site config: its points exist, its action may write."""
    points = {p.id: p for device in site.devices for p in device.points}
    problems: list[Problem] = []
    for alias, point_id in policy.points.items():
        if point_id not in points:
            problems.append(Problem(("points", alias), _unknown_point(point_id, points)))
    for where, ref, _ in _point_refs(policy):
        if is_point_id(ref) and ref not in points:
            problems.append(Problem(where, _unknown_point(ref, points)))
    action = policy.action
    point = points.get(policy.point_id(action.point))
    if point is not None:
        problems += _writable(point, policy)
    for where, ref in _simulated_points(policy):
        sim_point = points.get(policy.point_id(ref))
        if sim_point is not None and sim_point.datatype in ("bool", "string"):
            problems.append(
                Problem(
                    where,
                    f"{sim_point.id} is a {sim_point.datatype} point; a simulated output is a "
                    "number (its current value starts the prediction)",
                )
            )
    return problems


# -- reading -----------------------------------------------------------------------------------


def _policy_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        raise PolicyError(
            f"{folder}: no such folder; create it (it may stay empty) or name the folder that "
            "holds the policy files"
        ) from None
    except NotADirectoryError:
        raise PolicyError(
            f"{folder}: not a folder; name the folder that holds the policy files"
        ) from None
    except OSError as exc:
        raise PolicyError(
            f"{folder}: cannot list the policy folder: {exc.strerror or exc}"
        ) from None
    # Dot files are editors' lock and backup files (emacs's `.#oven.yaml`), never policies.
    files = [
        folder / e.name
        for e in entries
        if e.name.lower().endswith(SUFFIXES) and not e.name.startswith(".")
    ]
    if len(files) > MAX_POLICY_FILES:
        raise PolicyError(
            f"{folder}: {len(files)} policy files, more than the {MAX_POLICY_FILES} a folder may "
            "hold; is this the policy folder?"
        )
    return files


def _parse(
    text: str, source: str, site: SiteConfig | None
) -> tuple[Policy | None, YamlDocument | None, list[PolicyProblem]]:
    if len(text) > MAX_POLICY_BYTES:
        limit = f"{MAX_POLICY_BYTES // (1024 * 1024)} MiB"
        return None, None, [PolicyProblem(source, f"larger than the {limit} a policy may be")]
    try:
        doc = parse_yaml(text)
    except yaml.YAMLError as exc:
        return None, None, [_from_message(source, yaml_error_message(source, text, exc))]
    except UnicodeEncodeError as exc:  # only from a str handed in: a file is decoded strictly
        line = text.count("\n", 0, exc.start) + 1
        return (
            None,
            None,
            [PolicyProblem(source, f"not valid Unicode text ({exc.reason})", None, line)],
        )
    if not isinstance(doc.data, dict):
        kind = "empty" if doc.data is None else f"a {type(doc.data).__name__}"
        message = f"expected a policy (a mapping of keys: id, scope, trigger, ...), got {kind}"
        return None, doc, [PolicyProblem(source, message)]
    try:
        # Strict, as the site config: a `"5"` step or a `yes` bound is a mistake to point out.
        policy = Policy.model_validate(doc.data, strict=True)
    except ValidationError as exc:
        return None, doc, _placed(source, doc, _from_validation(exc, doc.data))
    problems = check_policy(policy)
    if site is not None:
        problems += check_policy_against_site(policy, site)
    return policy, doc, _placed(source, doc, problems)


def _placed(source: str, doc: YamlDocument, problems: Sequence[Problem]) -> list[PolicyProblem]:
    return [
        PolicyProblem(source, " ".join(p.message.split()), format_path(p.path), doc.line_of(p.path))
        for p in problems
    ]


_WHERE = re.compile(r"(?:, line (\d+)(?: column (\d+))?)?: (.*)", re.DOTALL)


def _from_message(source: str, message: str) -> PolicyProblem:
    # The reader and the YAML parser say `FILE, line N column M: why` in one string; keep the
    # line and column as fields, so the problem renders like every other.
    rest = message.removeprefix(source)
    match = _WHERE.fullmatch(rest) if rest != message else None
    if match is None:
        return PolicyProblem(source, " ".join(message.split()))
    line, column, why = match.groups()
    return PolicyProblem(
        source,
        " ".join(why.split()),
        line=int(line) if line else None,
        column=int(column) if column else None,
    )


def _error(what: str, files: int, problems: Sequence[PolicyProblem]) -> PolicyError:
    bad = len({p.file for p in problems})
    n = len(problems)
    head = (
        f"{what}: {n} problem{'s' if n != 1 else ''} in {bad} of {files} policy "
        f"file{'s' if files != 1 else ''}; no policy was loaded:"
    )
    lines = [head, *(f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN])]
    if n > MAX_PROBLEMS_SHOWN:
        lines.append(f"  … and {n - MAX_PROBLEMS_SHOWN} more")
    return PolicyError("\n".join(lines), problems)


def _duplicate_ids(loaded: Sequence[tuple[Policy, Path, YamlDocument]]) -> Iterator[PolicyProblem]:
    first: dict[str, Path] = {}
    for policy, path, doc in loaded:
        if policy.id in first:
            yield PolicyProblem(
                str(path),
                f"policy id {policy.id!r} is already used by {first[policy.id]}; ids name "
                "policies in approvals and the audit log, so each must be unique",
                "id",
                doc.line_of(("id",)),
            )
        first.setdefault(policy.id, path)


# -- pydantic's errors, as a user reads them ---------------------------------------------------


def _tags(union: Any, key: str) -> tuple[str, ...]:
    """The values of a discriminated union's tag key: `Annotated[A | B, Field(...)]`."""
    return tuple(member.model_fields[key].default for member in get_args(get_args(union)[0]))


# pydantic does not list the allowed values when the tag key is missing; the simulator's
# unions do, so the list never falls behind a new model or distribution.
_TAG_CHOICES = {"kind": _tags(Model, "kind"), "dist": _tags(Distribution, "dist")}
_SCALAR_TYPES = frozenset({"float_type", "int_type", "string_type", "bool_type"})
_CONTAINER_TYPES = frozenset({"model_attributes_type", "model_type", "dict_type", "list_type"})


def _from_validation(exc: ValidationError, data: Any) -> list[Problem]:
    errors = [(err, _user_path(err, data)) for err in exc.errors()]
    kept = [(err, loc) for err, loc in errors if not _other_branch(err, loc, errors)]
    problems: list[Problem] = []
    for err, loc in kept:
        problem = problem_from_pydantic(err, loc=loc, tag_choices=_TAG_CHOICES)
        problem = Problem(problem.path, _hint(err, problem.message))
        if problem not in problems:
            problems.append(problem)
    return problems


def _user_path(err: Mapping[str, Any], data: Any) -> PathParts:
    """The error's location as keys the user wrote: pydantic adds the union member it tried
    (`model.fopdt.tau`, `gain.float`); walking the data drops what is no key in it."""
    loc = tuple(err["loc"])
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if _has(node, part):
            node = node[part]
        elif not (i == len(loc) - 1 and err["type"] == "missing"):
            continue
        out.append(part)
    return tuple(out)


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _other_branch(
    err: Mapping[str, Any], loc: PathParts, errors: Sequence[tuple[Mapping[str, Any], PathParts]]
) -> bool:
    """Whether this error is a union member the user plainly did not mean, beside one they did.

    `gain: {dist: normal}` also fails as a number, and `output: 5` also fails as a list: the
    mapping (or the scalar) the user wrote says which member they meant.
    """
    given = err.get("input")
    others = [o_loc for o, o_loc in errors if o is not err]
    if err["type"] in _SCALAR_TYPES and isinstance(given, (dict, list)):
        return any(o_loc[: len(loc)] == loc for o_loc in others)
    if err["type"] in _CONTAINER_TYPES and not isinstance(given, (dict, list)):
        return any(o_loc == loc for o_loc in others)
    return False


def _hint(err: Mapping[str, Any], message: str) -> str:
    given = err.get("input")
    if err["type"] == "too_short" and tuple(err["loc"]) == ("safety",):
        return "give at least one constraint: the gate acts only on a prediction it can check"
    if err["type"] == "float_type" and isinstance(given, str) and _NUMBER_TEXT.fullmatch(given):
        # YAML 1.1 wants a dot and a signed exponent: `1.8e6` is text, `1.8e+6` a number.
        return f"{message}: YAML reads it as text; write {_yaml_float(given)}"
    if err["type"] == "string_pattern_mismatch":
        # A regular expression is no help to a user: say what the key takes.
        wanted = _PATTERN_WORDS.get(str(err.get("ctx", {}).get("pattern")), "")
        shown = f", got {short_repr(given)}" if isinstance(given, str) else ""
        return f"expected {wanted}{shown}" if wanted else message
    return message


def _yaml_float(text: str) -> str:
    mantissa, _, exponent = text.lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if exponent[0] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}"


_PATTERN_WORDS = {
    POINT_ID_PATTERN: "a point id like area/asset/signal (lower case, digits, _ . -)",
    NAME_PATTERN: "letters, digits and _ . - (a letter or digit first)",
    SCOPE_PATTERN: "an asset glob of point id characters and * ? [ ] !, e.g. line1/oven1/*",
}
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# -- checks within a policy ---------------------------------------------------------------------


def _expressions(policy: Policy) -> Iterator[tuple[PathParts, Any]]:
    trigger = policy.trigger
    if hasattr(trigger, "when"):
        yield ("trigger", "when"), trigger.when
    action = policy.action
    yield ("action", "value"), action.value
    for i, interlock in enumerate(action.interlocks):
        yield ("action", "interlocks", i), interlock
    for name, expr in policy.simulation.bind.items():
        yield ("simulation", "bind", name), expr
    objective = policy.objective
    if objective is not None:
        key = "minimize" if objective.minimize is not None else "maximize"
        yield ("objective", key), objective.expression


def _point_refs(policy: Policy) -> Iterator[tuple[PathParts, str, bool]]:
    """Every point reference, where it is written, and whether in an expression."""
    yield ("action", "point"), policy.action.point, False
    point = getattr(policy.trigger, "point", None)
    if point is not None:
        yield ("trigger", "point"), point, False
    for where, ref in _simulated_points(policy):
        yield where, ref, False
    for i, constraint in enumerate(policy.safety):
        yield ("safety", i, "output"), constraint.output, False
    for where, expr in _expressions(policy):
        for name in sorted(expr.names):
            yield where, name, True


def _simulated_points(policy: Policy) -> Iterator[tuple[PathParts, str]]:
    output = policy.simulation.output
    if isinstance(output, list):
        yield from ((("simulation", "output", i), ref) for i, ref in enumerate(output))
    elif output is not None:
        yield ("simulation", "output"), output


def _references(policy: Policy) -> Iterator[Problem]:
    weibull = isinstance(policy.simulation.model, WeibullModel)
    for where, ref, in_expression in _point_refs(policy):
        if is_point_id(ref) or ref in policy.points:
            continue
        if ref == FAILURE_OUTPUT and weibull and where[0] in ("safety", "objective"):
            continue
        # In an expression an id needs its quoted form: `/` and `-` are operators there.
        spelled = 'point("area/asset/signal")' if in_expression else "area/asset/signal"
        yield Problem(
            where,
            f"unknown name {ref!r}: declare it under `points:` ({ref}: area/asset/signal) "
            f"or write the point id, {spelled}",
        )


def _scope(policy: Policy) -> Iterator[Problem]:
    point = policy.point_id(policy.action.point)
    if is_point_id(point) and not fnmatchcase(point, policy.scope):
        yield Problem(
            ("action", "point"),
            f"{point} lies outside the policy's scope {policy.scope!r}; a policy acts only "
            "inside its scope (approvers' grants are matched against it): widen the scope or "
            "act on a point inside it",
        )


def _simulation(policy: Policy) -> Iterator[Problem]:
    sim = policy.simulation
    model = sim.model
    outputs = sim.outputs
    if isinstance(model, WeibullModel):
        if sim.output is not None:
            yield Problem(
                ("simulation", "output"),
                f"the weibull model's output is `{FAILURE_OUTPUT}` (1 once failed), no point: "
                "remove `output`",
            )
    else:
        wanted = model.n_outputs if isinstance(model, StateSpaceModel) else 1
        if len(outputs) != wanted:
            what = "the point it predicts" if wanted == 1 else f"a list of {wanted} points"
            yield Problem(
                ("simulation", "output"),
                f"the model has {wanted} output{'s' if wanted != 1 else ''}; give {what}"
                if outputs
                else f"required key is missing: {what}, whose current value starts the prediction",
            )
    if model is not None and model_inputs(model) > 1:
        yield Problem(
            ("simulation", "model"),
            f"the model takes {model_inputs(model)} inputs; the action drives one "
            "(give B one column)",
        )
    yield from _bind(policy)
    yield from _scenario_bounds(policy)


def _bind(policy: Policy) -> Iterator[Problem]:
    sim = policy.simulation
    model = sim.model
    if isinstance(model, (FopdtModel, TankModel, WeibullModel)):
        allowed = tuple(model.DOMAINS)
    else:
        allowed = ()
    for name in sim.bind:
        if name in allowed:
            continue
        if sim.fitted is not None:
            why = "a fitted model takes its parameters from the fit; remove `bind`"
        elif not allowed:
            why = "a state-space model's matrices are fixed; remove `bind`"
        else:
            why = f"the {model.kind} model's parameters are {', '.join(allowed)}"  # type: ignore[union-attr]
        yield Problem(("simulation", "bind", name), f"cannot bind {name!r}: {why}")


def _scenario_bounds(policy: Policy) -> Iterator[Problem]:
    """Let the simulator's own checks (steps, memory) judge the horizon, step and paths now,
    rather than when the policy first fires."""
    sim = policy.simulation
    model = sim.model if sim.model is not None else FopdtModel(gain=1.0, tau=1.0)
    try:
        Scenario(
            model=model,
            y0=0.0,
            h0=0.0,
            input=HoldInput(u0=0.0),
            horizon_s=sim.horizon_s,
            dt_s=sim.dt_s,
            paths=sim.paths,
            constraints=[Constraint(kind="upper", limit=0.0)],
        )
    except ValidationError as exc:
        for err in exc.errors():
            yield Problem(("simulation",), str(err["msg"]).removeprefix("Value error, "))


def _safety(policy: Policy) -> Iterator[Problem]:
    simulated = {policy.point_id(o) for o in policy.simulation.outputs}
    if not simulated:
        return  # already a problem of the simulation
    shown = ", ".join(sorted(policy.simulation.outputs))
    for i, constraint in enumerate(policy.safety):
        if policy.point_id(constraint.output) not in simulated:
            yield Problem(
                ("safety", i, "output"),
                f"{constraint.output!r} is not simulated; the simulation predicts {shown}",
            )


# -- checks against the site --------------------------------------------------------------------


def _writable(point: Any, policy: Policy) -> Iterator[Problem]:
    action = policy.action
    where: PathParts = ("action", "point")
    if not point.writable:
        yield Problem(
            where,
            f"{point.id} is not writable; a policy writes only points the site config marks "
            "`writable: true`",
        )
        return
    if point.datatype in ("bool", "string"):
        yield Problem(
            where, f"{point.id} is a {point.datatype} point; set_parameter writes numbers"
        )
        return
    limits = point.range
    if limits is None:  # the site config refuses a writable numeric point without one
        return
    bounds = action.bounds
    if bounds.lo < limits.lo or bounds.hi > limits.hi:
        unit = f" {point.unit}" if point.unit else ""
        yield Problem(
            ("action", "bounds"),
            f"{bounds.lo:g}..{bounds.hi:g} reaches outside {point.id}'s configured range "
            f"{limits.lo:g}..{limits.hi:g}{unit}: a policy may narrow a point's limits, never "
            "widen them",
        )


def _unknown_point(point_id: str, points: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(point_id, list(points), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]!r}?" if close else "; the site config declares no such point"
    return f"unknown point {point_id!r}{hint}"
