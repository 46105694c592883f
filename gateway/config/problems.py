"""Problems in a YAML file a user wrote: where (key path and line) and what to do instead.

Shared by every loader of a user's YAML (the site config, policies): the same pydantic errors
become the same one-line messages, and every file reports its problems the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from gateway.config.yamlpos import YamlDocument, format_path

__all__ = [
    "MAX_PROBLEMS_SHOWN",
    "PathParts",
    "Problem",
    "problem_from_pydantic",
    "problem_line",
    "render_problems",
    "short_repr",
    "yaml_error_message",
]

PathParts = tuple[str | int, ...]

# More problems than anyone reads in one go; the rest are summarised in one line.
MAX_PROBLEMS_SHOWN = 50


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config: where, and what is expected instead."""

    path: PathParts
    message: str


def problem_from_pydantic(
    err: Mapping[str, Any],
    *,
    loc: PathParts | None = None,
    tag_choices: Mapping[str, Sequence[str]] | None = None,
) -> Problem:
    """Turn one pydantic error into a Problem a user can act on.

    `loc` replaces the error's own location (a caller that rewrote it); `tag_choices` names the
    allowed values of each discriminator key (`driver`, `kind`), since pydantic does not say
    them when the key is missing.
    """
    loc = tuple(err["loc"]) if loc is None else loc
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'")
        choices = list((tag_choices or {}).get(key, ()))
        if not choices and "expected_tags" in ctx:
            choices = [t.strip().strip("'") for t in str(ctx["expected_tags"]).split(",")]
        if kind == "union_tag_invalid":
            return Problem(
                (*loc, key), f"expected one of {', '.join(choices)}, got {ctx.get('tag')!r}"
            )
        listed = f" ({', '.join(choices)})" if choices else ""
        return Problem((*loc, key), f"required key is missing{listed}")
    if kind == "invalid_key":  # `1: x` or `null: x`: the location ends in the key itself
        return Problem(loc[:-1], f"key {short_repr(err.get('input'))} is not text (a key name)")
    if kind == "extra_forbidden":
        return Problem(loc, "unknown key (check its spelling and where it is indented)")
    if kind == "missing":
        return Problem(loc, "required key is missing")
    message = err["msg"]
    if kind == "value_error":
        # Our validators' own words; they quote what they need to.
        message = message.removeprefix("Value error, ")
    elif _echoable(loc, err.get("input")):
        message = f"{message}, got {short_repr(err['input'])}"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "id":
        message = "expected a path like area/line/asset/signal (lower case, digits, _ . -)" + (
            f", got {short_repr(err['input'])}" if "input" in err else ""
        )
    return Problem(loc, message)


def short_repr(value: Any) -> str:
    """repr() of a value, cut to 80 characters."""
    # A 10 MB string pasted into a key must not become a 10 MB error message.
    text = repr(value)
    return text if len(text) <= 80 else text[:72] + "…" + text[-6:]


def _echoable(loc: PathParts, value: Any) -> bool:
    # Echo a scalar back so the user sees what was read; never a whole section (it may hold
    # password hashes) and never anything under a password key (a plain password pasted by
    # mistake must not reach a terminal log).
    if any(isinstance(part, str) and "password" in part for part in loc):
        return False
    return isinstance(value, (str, int, float, bool))


def problem_line(doc: YamlDocument, problem: Problem) -> str:
    """One line: `key.path (line N): message`, whatever the message quotes."""
    line = doc.line_of(problem.path)
    at = f" (line {line})" if line else ""
    return f"{format_path(problem.path)}{at}: {' '.join(problem.message.split())}"


def render_problems(source: str, doc: YamlDocument, problems: Sequence[Problem]) -> str:
    """A header naming the file and the count, then one indented line per problem."""
    lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:"]
    lines += [f"  {problem_line(doc, problem)}" for problem in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  … and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    return "\n".join(lines)


def yaml_error_message(source: str, text: str, exc: yaml.YAMLError) -> str:
    """One line: the file, the line and column, and what PyYAML (or our bounds) refused."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        where = f", line {mark.line + 1} column {mark.column + 1}"
    elif isinstance(exc, yaml.reader.ReaderError):  # a control character: it has a position
        where = f", line {text.count(chr(10), 0, exc.position) + 1}"
    else:
        where = ""
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        code = char if isinstance(char, int) else ord(char) if len(char) == 1 else None
        what = f"U+{code:04X}" if code is not None else repr(char)
        problem = f"character {what} is not allowed in YAML ({exc.reason})"
    else:
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        if context and getattr(exc, "problem", None):
            problem = f"{context}, {problem}"  # "while parsing a block mapping, expected …"
    return f"{source}{where}: invalid YAML: {' '.join(str(problem).split())}"
