"""The safe expression evaluator for policies: text → checked tree → closures, never `eval`.

Policies compute setpoints and conditions from twin points (a trigger's condition, an action's
value, interlocks). The text comes from YAML files that people edit, so it is read by the small
tokenizer and Pratt parser below into frozen dataclasses, checked for the type errors the text
already shows, and compiled into nested closures. Nothing here uses Python's `eval`, `compile`
or `ast`; there are no attributes, imports, indexing or builtins, only the functions listed.

The language
------------
- Numbers: `12`, `0.5`, `.5`, `1e-3`, `2.5E+4`, decimal only and finite. Every number is a
  float (evaluate returns `12.0` for `12`).
- Booleans `true` and `false`; strings `'auto'` or `"auto"` on one line, at most 128 characters,
  no escapes. Strings only meet `==` and `!=` (a string point such as an oven's mode).
- Point references, two forms:
  - a bare name: letter first, then letters, digits and `_`, in segments joined by `.`
    (`temperature`, `oven1.temperature`);
  - `point("line1/oven1/temperature")`: a point id as the site config writes it. Ids contain
    `/` and `-`, which are operators here (`a-b` is a subtraction), so a real id always takes
    this quoted form; it must satisfy the config's id rules, or parse() refuses it.
  `Expr.names` holds each reference as written (the id itself for `point(...)`); the caller
  decides what a bare name means (an alias the policy declares, say) and keys `env` the same way.
- Operators, loosest first (as in Python):

      a if cond else b          right-associative: a if c else b if d else e
      or
      and
      not                       `a == not b` needs brackets: a == (not b)
      < <= > >= == !=           never chained: write a < b and b < c
      + -
      * / %                     % takes the divisor's sign, as Python: -7 % 3 == 2
      -x                        unary minus (binds tighter than *, as in Python)
      (...)  f(...)  atoms

  `**` is refused (multiply instead: no policy needs a power, and a bounded one is still a
  way to reach overflow); unary `+` is refused as noise.
- Functions: `min(a, b, ...)` and `max(a, b, ...)` (two or more), `abs(x)`, `clamp(x, lo, hi)`
  (lo <= hi, or an error), `round(x)` / `round(x, ndigits)` (Python's: halves to even,
  `round(2.5) == 2`, and binary floats, `round(2.675, 2) == 2.67`; ndigits a whole number in
  -15..15). Arguments are positional only.

Types are strict, because a silent conversion in a setpoint formula is a bug found on the plant:
arithmetic, ordering and functions take numbers only (a boolean is not 1); `and`, `or`, `not`
and `if` take booleans only (a number is not "truthy"); `==` and `!=` need both sides of one
type (`mode == 1` is an error, not false). parse() refuses what the text shows (`true + 1`,
`"a" < "b"`); evaluate() refuses what the point values show. `and`, `or` and `if` evaluate only
the side they need, so `x / y if y != 0 else 0` is safe. evaluate() also refuses a missing name,
a point whose value is None or not finite, division or modulo by zero, and any intermediate
result that is not finite (an overflow), each as an ExprError pointing at the name or operator.

Bounds against hostile text: 1,000 characters, 256 tokens, 32 levels of nesting (brackets,
calls, unary operators, conditionals). Evaluation then needs at most one Python frame per tree
level, which those bounds keep far from the recursion limit.
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Final, Literal, TypeAlias

from gateway.errors import GatewayError

__all__ = [
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_TOKENS",
    "POINT_ID_PATTERN",
    "Binary",
    "Bool",
    "Call",
    "Cond",
    "Env",
    "Expr",
    "ExprError",
    "Name",
    "Node",
    "Num",
    "Str",
    "Unary",
    "parse",
]

MAX_LENGTH = 1_000
MAX_TOKENS = 256
MAX_DEPTH = 32
MAX_STRING = 128
MAX_NAME = 256
MAX_NDIGITS = 15

# A copy of gateway.config.model.POINT_ID_PATTERN (a test keeps them equal): importing the
# config package would load pydantic and both drivers (~0.7 s) into a module that is pure text.
POINT_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)+$"

Env: TypeAlias = Mapping[str, float | int | bool | str | None]
Value: TypeAlias = float | bool | str
Kind: TypeAlias = Literal["number", "boolean", "unknown"]


class ExprError(GatewayError):
    """An expression that cannot be parsed or evaluated; str() shows where, under a caret."""

    def __init__(self, message: str, position: int = -1, text: str = "") -> None:
        super().__init__(message, position, text)
        self.message = message
        self.position = position
        self.text = text

    def __str__(self) -> str:
        if self.position < 0:
            return self.message
        where, shown, column = _locate(self.text, self.position)
        return f"{self.message} ({where})\n  {shown}\n  {' ' * column}^"


def parse(text: str) -> Expr:
    """Parse, type-check and compile `text`; raise ExprError for anything outside the language."""
    if not isinstance(text, str):
        raise ExprError(f"an expression must be text, got {type(text).__name__}: quote it")
    parser = _Parser(text)
    tree = parser.parse()
    compiled = _Compiler(text).compile(tree)
    if compiled.type == _STR:
        raise ExprError(
            "the expression gives a string, not a number or a condition: "
            'compare it instead, e.g. mode == "auto"',
            _start(tree),
            text,
        )
    return Expr(text, frozenset(parser.names), compiled.type, tree, compiled.run)


@dataclass(frozen=True, slots=True)
class Expr:
    """A parsed expression: its text, the points it reads, and a fast pure `evaluate`.

    `kind` is what the text shows the result to be ("unknown" when it depends on a point's
    type, as a bare `x` does): a policy loader can refuse a numeric trigger condition at load.
    Make one with parse(); a pickled Expr is parsed again from its text.
    """

    text: str
    names: frozenset[str]
    kind: Kind
    tree: Node = field(repr=False)
    _run: Callable[[Env], Value] = field(repr=False, compare=False)

    def evaluate(self, env: Env) -> float | bool:
        """Evaluate against point values; raise ExprError on a missing name, type or math error."""
        value = self._run(env)
        if isinstance(value, str):
            raise ExprError(
                f"the expression gives the string {value!r}, not a number or a condition: "
                'compare it instead, e.g. mode == "auto"',
                _start(self.tree),
                self.text,
            )
        return value

    def __reduce__(self) -> tuple[Callable[[str], Expr], tuple[str]]:
        # Closures do not pickle; the text is the whole definition.
        return (parse, (self.text,))


# -- the tree ---------------------------------------------------------------------------------
# `pos` is the 0-based offset in the text of the token that made the node (the operator for
# operators, the function name for calls): where an error about the node points.


@dataclass(frozen=True, slots=True)
class Num:
    """A number literal."""

    value: float
    pos: int


@dataclass(frozen=True, slots=True)
class Str:
    """A string literal."""

    value: str
    pos: int


@dataclass(frozen=True, slots=True)
class Bool:
    """`true` or `false`."""

    value: bool
    pos: int


@dataclass(frozen=True, slots=True)
class Name:
    """A point reference: a bare name, or the id of `point("...")`."""

    name: str
    pos: int


@dataclass(frozen=True, slots=True)
class Unary:
    """`-x` or `not x`."""

    op: str
    operand: Node
    pos: int


@dataclass(frozen=True, slots=True)
class Binary:
    """An arithmetic, comparison or boolean (`and`, `or`) operator."""

    op: str
    left: Node
    right: Node
    pos: int


@dataclass(frozen=True, slots=True)
class Cond:
    """`then if cond else orelse`; `pos` is that of `if`."""

    then: Node
    cond: Node
    orelse: Node
    pos: int


@dataclass(frozen=True, slots=True)
class Call:
    """A call of one of the whitelisted functions."""

    func: str
    args: tuple[Node, ...]
    pos: int


Node: TypeAlias = Num | Str | Bool | Name | Unary | Binary | Cond | Call


def _start(node: Node) -> int:
    """Return where the text of `node` begins (its leftmost token)."""
    while isinstance(node, Binary | Cond):
        node = node.left if isinstance(node, Binary) else node.then
    return node.pos


# -- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: Literal["num", "str", "name", "op", "end"]
    value: str  # the source text (the body, for a string)
    pos: int
    number: float = 0.0


_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
_POINT_ID = re.compile(POINT_ID_PATTERN)
_SPACE = frozenset(" \t\r\n")
# Explicit ASCII sets: str.isdigit() and isalpha() accept other scripts' digits and letters.
_DIGITS = frozenset("0123456789")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Longest first, so that `<=` is not read as `<` then `=`.
_OPERATORS = ("<=", ">=", "==", "!=", "(", ")", ",", "+", "-", "*", "/", "%", "<", ">")
_KEYWORDS = frozenset({"and", "or", "not", "if", "else", "true", "false"})
_FUNCTIONS = ("abs", "clamp", "max", "min", "round")
_CALLABLE = frozenset({*_FUNCTIONS, "point"})
_SIGNATURES = {
    "abs": ("abs(x)", 1, 1),
    "clamp": ("clamp(x, lo, hi)", 3, 3),
    "max": ("max(a, b, ...)", 2, None),
    "min": ("min(a, b, ...)", 2, None),
    "round": ("round(x) or round(x, ndigits)", 1, 2),
    "point": ('point("area/asset/signal")', 1, 1),
}
_LANGUAGE = (
    'numbers, true/false, quoted strings, names, point("id"), + - * / %, '
    "< <= > >= == !=, and/or/not, a if c else b, brackets and " + ", ".join(_FUNCTIONS)
)
# Things people bring from Python, C or spreadsheets, with what to write instead.
_REFUSED_SYMBOLS = {
    "**": "'**' (power) is not supported: multiply instead (x * x)",
    "//": "'//' (floor division) is not supported: use round(a / b) or %",
    "=": "'=' is not an operator: compare with '=='; functions take positional arguments only",
    "!": "'!' is not an operator: write 'not' (or '!=' to compare)",
    "&": "'&' is not an operator: write 'and'",
    "|": "'|' is not an operator: write 'or'",
    "^": "'^' is not an operator: there is no power or xor (multiply: x * x)",
    "~": "'~' is not an operator: write '-' or 'not'",
    "[": "'[' is not supported: there are no lists, indexing or comprehensions",
    "]": "']' is not supported: there are no lists, indexing or comprehensions",
    "{": "'{' is not supported: there are no sets, dicts or f-string fields",
    "}": "'}' is not supported: there are no sets, dicts or f-string fields",
    ":": "':' is not supported: there are no lambdas, slices or dicts",
    ";": "';' is not supported: write one expression",
    "#": "'#' is not supported: expressions have no comments",
    ".": "'.' belongs in a number (0.5) or a name (oven1.temperature): there are no attributes",
    "_": "'_' cannot start a name: names start with a letter",
    "\\": "'\\' is not supported: write the expression on one or more plain lines",
}
_PYTHON_WORDS = {
    "True": "write true",
    "False": "write false",
    "None": "there is no null: a point without a value makes evaluation fail",
    "null": "there is no null: a point without a value makes evaluation fail",
}


def _tokenize(text: str) -> list[_Token]:
    """Split `text` into tokens, ending with an "end" token; raise ExprError on anything else."""
    if len(text) > MAX_LENGTH:
        raise ExprError(
            f"the expression is {len(text)} characters long; the limit is {MAX_LENGTH}: "
            "split it, or move parts into the policy's other fields",
            MAX_LENGTH,
            text,
        )
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _SPACE:
            i += 1
            continue
        if len(tokens) >= MAX_TOKENS:
            raise ExprError(
                f"the expression has more than {MAX_TOKENS} tokens: simplify or split it", i, text
            )
        if ch in _DIGITS or (ch == "." and text[i + 1 : i + 2] in _DIGITS):
            token, i = _number(text, i)
        elif ch in "\"'":
            token, i = _string(text, i)
        elif ch in _LETTERS:
            token, i = _name(text, i)
        else:
            op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
            refused = next((s for s in ("**", "//") if text.startswith(s, i)), None)
            if refused is not None or op is None:
                symbol = refused or ch
                raise ExprError(_REFUSED_SYMBOLS.get(symbol) or _unexpected(ch), i, text)
            token, i = _Token("op", op, i), i + len(op)
        tokens.append(token)
    tokens.append(_Token("end", "", n))
    return tokens


def _unexpected(ch: str) -> str:
    code = f" (U+{ord(ch):04X})" if not ch.isascii() or not ch.isprintable() else ""
    return f"unexpected character {ch!r}{code}: expressions are made of {_LANGUAGE}"


def _number(text: str, i: int) -> tuple[_Token, int]:
    match = _NUMBER.match(text, i)
    assert match is not None  # the caller saw a digit, or a dot and a digit
    source, end = match.group(), match.end()
    if end < len(text) and (text[end].isalnum() or text[end] in "_."):
        raise ExprError(
            f"malformed number {_clip(text[i : end + 1])}: write decimal numbers like "
            "12, 0.5 or 1e-3 (no hex, no underscores, one dot)",
            i,
            text,
        )
    value = float(source)
    if not math.isfinite(value):
        raise ExprError(
            f"the number {_clip(source)} is too large: numbers must be finite (below 1.8e308)",
            i,
            text,
        )
    return _Token("num", source, i, value), end


def _string(text: str, i: int) -> tuple[_Token, int]:
    quote = text[i]
    end = text.find(quote, i + 1)
    line_end = text.find("\n", i + 1)
    if end < 0 or 0 <= line_end < end:
        raise ExprError(f"unterminated string: close it with {quote} on the same line", i, text)
    body = text[i + 1 : end]
    for k, c in enumerate(body, start=i + 1):
        if c == "\\":
            raise ExprError("strings have no escapes: remove the backslash", k, text)
        if not c.isprintable():
            raise ExprError(f"strings may not contain the control character {c!r}", k, text)
    if len(body) > MAX_STRING:
        raise ExprError(
            f"the string is {len(body)} characters long; the limit is {MAX_STRING}", i, text
        )
    return _Token("str", body, i), end + 1


def _name(text: str, i: int) -> tuple[_Token, int]:
    match = _NAME.match(text, i)
    assert match is not None  # the caller saw a letter
    name, end = match.group(), match.end()
    if (
        end < len(text)
        and text[end] in "\"'"
        and len(name) <= 2
        and set(name.lower()) <= set("fbru")
    ):
        raise ExprError(
            f"{name}{text[end]}...{text[end]} strings are not supported: write a plain quoted "
            "string",
            i,
            text,
        )
    if end < len(text) and text[end] == ".":
        raise ExprError(_REFUSED_SYMBOLS["."], end, text)
    if "__" in name:
        raise ExprError(f"the name {_clip(name)} contains '__': names may not", i, text)
    if len(name) > MAX_NAME:
        raise ExprError(
            f"the name is {len(name)} characters long; the limit is {MAX_NAME}", i, text
        )
    head = name.partition(".")[0]
    if head in _PYTHON_WORDS:
        raise ExprError(f"{head!r} is not part of the language: {_PYTHON_WORDS[head]}", i, text)
    if head.lower() in ("nan", "inf", "infinity"):
        raise ExprError(f"{head!r} is not a number here: numbers must be finite", i, text)
    if name in _KEYWORDS:
        return _Token("op", name, i), end
    if head in _KEYWORDS or keyword.iskeyword(head):
        raise ExprError(
            f"{head!r} is not part of the language, which is made of {_LANGUAGE}", i, text
        )
    return _Token("name", name, i), end


def _clip(s: str, limit: int = 24) -> str:
    return repr(_shorten(s, limit))


def _shorten(s: str, limit: int = 24) -> str:
    return s if len(s) <= limit else s[:limit] + "..."


# -- the parser -------------------------------------------------------------------------------
# Binding powers, loosest first; an operator binds its right operand at its own power + 1
# (left-associative), except `if` (right-associative) and comparisons (not chained).

_COND, _OR, _AND, _NOT, _CMP, _SUM, _PRODUCT, _NEG = range(1, 9)
_COMPARISONS = frozenset({"<", "<=", ">", ">=", "==", "!="})
_INFIX = {
    "or": _OR,
    "and": _AND,
    **dict.fromkeys(_COMPARISONS, _CMP),
    "+": _SUM,
    "-": _SUM,
    "*": _PRODUCT,
    "/": _PRODUCT,
    "%": _PRODUCT,
}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.names: set[str] = set()

    def parse(self) -> Node:
        if self.tokens[0].kind == "end":
            raise self.fail("empty expression: write a number, a point or a condition", 0)
        tree = self.expression(0)
        tok = self.peek()
        if tok.kind != "end":
            raise self.fail(
                f"{_show(tok)} follows a complete expression: is an operator missing?",
                tok.pos,
            )
        return tree

    def expression(self, min_bp: int) -> Node:
        left = self.prefix(min_bp)
        while True:
            tok = self.peek()
            if tok.kind != "op":
                return left
            if tok.value == "if":
                if min_bp > _COND:
                    return left
                self.take()
                self.enter(tok)
                cond = self.expression(_OR)
                self.expect("else", f"after the condition of the 'if' at column {tok.pos + 1}")
                orelse = self.expression(_COND)
                self.depth -= 1
                left = Cond(left, cond, orelse, tok.pos)
                continue
            bp = _INFIX.get(tok.value)
            if bp is None or bp < min_bp:
                return left
            self.take()
            left = Binary(tok.value, left, self.expression(bp + 1), tok.pos)
            following = self.peek()
            if bp == _CMP and following.kind == "op" and following.value in _COMPARISONS:
                raise self.fail(
                    "comparisons cannot be chained: write a < b and b < c",
                    following.pos,
                )

    def prefix(self, min_bp: int) -> Node:
        tok = self.take()
        if tok.kind == "num":
            return Num(tok.number, tok.pos)
        if tok.kind == "str":
            return Str(tok.value, tok.pos)
        if tok.kind == "name":
            following = self.peek()
            if following.kind == "op" and following.value == "(":
                return self.call(tok)
            if tok.value in _CALLABLE:
                usage = _SIGNATURES[tok.value][0]
                raise self.fail(f"{tok.value!r} is a function: call it, as {usage}", tok.pos)
            self.names.add(tok.value)
            return Name(tok.value, tok.pos)
        if tok.kind == "op":
            if tok.value in ("true", "false"):
                return Bool(tok.value == "true", tok.pos)
            if tok.value == "(":
                self.enter(tok)
                inner = self.expression(0)
                self.expect(")", f"to close the '(' at column {tok.pos + 1}")
                self.depth -= 1
                return inner
            if tok.value == "-":
                self.enter(tok)
                operand = self.expression(_NEG)
                self.depth -= 1
                return Unary("-", operand, tok.pos)
            if tok.value == "not":
                if min_bp > _NOT:
                    raise self.fail("put 'not ...' in brackets here: a == (not b)", tok.pos)
                self.enter(tok)
                operand = self.expression(_NOT)
                self.depth -= 1
                return Unary("not", operand, tok.pos)
            if tok.value == "+":
                raise self.fail("unary '+' is not supported: drop it", tok.pos)
        raise self.fail(
            f"expected a value (a number, a point, true/false, a function call or '('), "
            f"got {_show(tok)}",
            tok.pos,
        )

    def call(self, name: _Token) -> Node:
        func = name.value
        if func not in _CALLABLE:
            raise self.fail(
                f"unknown function {_clip(func)}: the functions are {', '.join(_FUNCTIONS)}, "
                'and point("id") for a point id',
                name.pos,
            )
        opening = self.take()
        self.enter(opening)
        args: list[Node] = []
        if not self.at(")"):
            args.append(self.expression(0))
            while self.at(","):
                self.take()
                args.append(self.expression(0))
        self.expect(")", f"to close the '(' of {func} at column {opening.pos + 1}")
        self.depth -= 1
        usage, least, most = _SIGNATURES[func]
        if len(args) < least or (most is not None and len(args) > most):
            raise self.fail(f"{func} takes {usage}, got {len(args)} argument(s)", name.pos)
        if func == "point":
            return self.point(name, args[0])
        return Call(func, tuple(args), name.pos)

    def point(self, name: _Token, arg: Node) -> Node:
        if not isinstance(arg, Str):
            raise self.fail(
                'point() takes a quoted point id, e.g. point("line1/oven1/temperature")',
                name.pos,
            )
        if len(arg.value) > MAX_NAME or not _POINT_ID.fullmatch(arg.value):
            raise self.fail(
                f"{arg.value!r} is not a point id: ids are lower-case segments of letters, "
                "digits, '_', '.' and '-' joined by '/', e.g. line1/oven1/temperature",
                arg.pos,
            )
        self.names.add(arg.value)
        return Name(arg.value, name.pos)

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def at(self, op: str) -> bool:
        tok = self.tokens[self.i]
        return tok.kind == "op" and tok.value == op

    def expect(self, op: str, why: str) -> None:
        tok = self.take()
        if tok.kind != "op" or tok.value != op:
            raise self.fail(f"expected '{op}' {why}, got {_show(tok)}", tok.pos)

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(
                f"nested deeper than {MAX_DEPTH} levels (brackets, calls, unary operators, "
                "conditionals): simplify the expression",
                tok.pos,
            )

    def fail(self, message: str, pos: int) -> ExprError:
        return ExprError(message, pos, self.text)


def _show(tok: _Token) -> str:
    if tok.kind == "end":
        return "the end of the expression"
    if tok.kind == "num":
        return f"the number {_clip(tok.value)}"
    if tok.kind == "str":
        return f"the string {_clip(tok.value)}"
    if tok.kind == "name":
        return f"the name {_clip(tok.value)}"
    return f"'{tok.value}'"


# -- the compiler: tree → closures ------------------------------------------------------------
# A closure per node, each calling its children's, so evaluation does no dispatch on node types:
# a policy evaluates its expressions on every relevant sample. Measured with timeit on this
# 2-core machine: `clamp(sp - 0.5 * (temp - 180), 150, 220)` (10 nodes) takes 1.5 µs per
# evaluate() (2.8 µs while the machine was busy); parse() takes ~90 µs, once per policy load.
# Runtime values are exactly float, bool or str (ints become floats on lookup), so the checks
# are `type(x) is float` identity tests.

_Type: TypeAlias = Literal["number", "boolean", "string", "unknown"]
_NUM: Final = "number"
_BOOL: Final = "boolean"
_STR: Final = "string"
_ANY: Final = "unknown"
_Run: TypeAlias = Callable[[Env], Value]


@dataclass(frozen=True, slots=True)
class _Compiled:
    run: _Run
    type: _Type  # what the text shows: _NUM, _BOOL, _STR, or _ANY when a point decides
    const: bool  # no point under it: folded into one value when it evaluates cleanly


_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "%": operator.mod,
}
_ORDER: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_MINMAX: dict[str, Callable[[list[float]], float]] = {"min": min, "max": max}


class _Compiler:
    def __init__(self, text: str) -> None:
        self.text = text

    def compile(self, node: Node) -> _Compiled:
        if isinstance(node, Num | Str | Bool):
            return _constant(node.value)
        if isinstance(node, Name):
            return _Compiled(self.name(node), _ANY, False)
        if isinstance(node, Unary):
            parts = [self.compile(node.operand)]
            result = self.unary(node, parts[0])
        elif isinstance(node, Binary):
            parts = [self.compile(node.left), self.compile(node.right)]
            result = self.binary(node, parts[0], parts[1])
        elif isinstance(node, Cond):
            parts = [self.compile(node.then), self.compile(node.cond), self.compile(node.orelse)]
            result = self.cond(node, *parts)
        else:
            parts = [self.compile(arg) for arg in node.args]
            result = self.call(node, parts)
        if all(part.const for part in parts):
            try:
                return _constant(result.run({}))
            except ExprError:
                pass  # `1/0` stays an operation: it fails only if evaluation reaches it
        return result

    def name(self, node: Name) -> _Run:
        name, pos, text = node.name, node.pos, self.text

        def run(env: Env) -> Value:
            try:
                value = env[name]
            except KeyError:
                raise ExprError(
                    f"no value for {name!r}: the evaluation was given no such point",
                    pos,
                    text,
                ) from None
            if type(value) is float:
                if value - value == 0.0:  # finite: inf - inf and nan - nan are nan
                    return value
            elif type(value) is bool or type(value) is str:
                return value
            return _coerce(value, name, pos, text)

        return run

    def unary(self, node: Unary, operand: _Compiled) -> _Compiled:
        pos, text, f = node.pos, self.text, operand.run
        if node.op == "-":
            self.static(node, "'-' needs a number", [("its operand", operand)], _NUM)

            def neg(env: Env) -> Value:
                a = f(env)
                if type(a) is float:
                    return -a
                raise _type_error(
                    "'-' needs a number", [("its operand", node.operand, a)], float, pos, text
                )

            return _Compiled(neg, _NUM, False)
        self.static(node, "'not' needs a condition", [("its operand", operand)], _BOOL)

        def not_(env: Env) -> Value:
            a = f(env)
            if a is True:
                return False
            if a is False:
                return True
            raise _type_error(
                "'not' needs a condition", [("its operand", node.operand, a)], bool, pos, text
            )

        return _Compiled(not_, _BOOL, False)

    def binary(self, node: Binary, left: _Compiled, right: _Compiled) -> _Compiled:
        op, pos, text, lf, rf = node.op, node.pos, self.text, left.run, right.run
        sides = [("its left side", left), ("its right side", right)]
        if op in _ARITH:
            what = f"'{op}' needs numbers"
            self.static(node, what, sides, _NUM)
            return _Compiled(_arith(op, lf, rf, node, text), _NUM, False)
        if op in _ORDER:
            what = f"'{op}' compares numbers"
            self.static(node, what, sides, _NUM)
            compare = _ORDER[op]

            def order(env: Env) -> Value:
                a, b = lf(env), rf(env)
                if type(a) is float and type(b) is float:
                    return compare(a, b)
                raise _type_error(
                    what,
                    [("its left side", node.left, a), ("its right side", node.right, b)],
                    float,
                    pos,
                    text,
                )

            return _Compiled(order, _BOOL, False)
        if op in ("==", "!="):
            if _ANY not in (left.type, right.type) and left.type != right.type:
                raise ExprError(
                    f"'{op}' compares values of one type, but its left side is "
                    f"{_a(left.type)} and its right side {_a(right.type)}",
                    pos,
                    text,
                )
            negate = op == "!="

            def equal(env: Env) -> Value:
                a, b = lf(env), rf(env)
                if type(a) is type(b):
                    return (a == b) is not negate
                raise _type_error(
                    f"'{op}' compares values of one type",
                    [("its left side", node.left, a), ("its right side", node.right, b)],
                    None,
                    pos,
                    text,
                )

            return _Compiled(equal, _BOOL, False)
        # and / or: the right side only when it decides the result.
        what = f"'{op}' needs conditions"
        self.static(node, what, sides, _BOOL)
        decides = op == "or"  # the left value that is the result without the right side
        defers = not decides

        def logic(env: Env) -> Value:
            a = lf(env)
            if a is decides:
                return a
            if a is not defers:
                raise _type_error(what, [("its left side", node.left, a)], bool, pos, text)
            b = rf(env)
            if type(b) is bool:
                return b
            raise _type_error(what, [("its right side", node.right, b)], bool, pos, text)

        return _Compiled(logic, _BOOL, False)

    def cond(self, node: Cond, then: _Compiled, cond: _Compiled, orelse: _Compiled) -> _Compiled:
        pos, text, tf, cf, ef = node.pos, self.text, then.run, cond.run, orelse.run
        self.static(node, "'if' needs a condition", [("its condition", cond)], _BOOL)
        if _ANY not in (then.type, orelse.type) and then.type != orelse.type:
            raise ExprError(
                f"both branches of 'if' must give one type, but one gives {_a(then.type)} "
                f"and the other {_a(orelse.type)}",
                pos,
                text,
            )

        def choose(env: Env) -> Value:
            c = cf(env)
            if c is True:
                return tf(env)
            if c is False:
                return ef(env)
            raise _type_error(
                "'if' needs a condition", [("its condition", node.cond, c)], bool, pos, text
            )

        return _Compiled(choose, then.type if then.type == orelse.type else _ANY, False)

    def call(self, node: Call, args: list[_Compiled]) -> _Compiled:
        func, pos, text = node.func, node.pos, self.text
        what = f"{func}() needs numbers"
        self.static(node, what, [(f"argument {i + 1}", a) for i, a in enumerate(args)], _NUM)
        fns = [a.run for a in args]

        def numbers(env: Env) -> list[float]:
            values = [f(env) for f in fns]
            for value in values:
                if type(value) is not float:
                    operands = [
                        (f"argument {i + 1}", arg, v)
                        for i, (arg, v) in enumerate(zip(node.args, values, strict=True))
                    ]
                    raise _type_error(what, operands, float, pos, text)
            return values  # type: ignore[return-value]  # each checked above

        if func in _MINMAX:
            pick = _MINMAX[func]
            return _Compiled(lambda env: pick(numbers(env)), _NUM, False)
        if func == "abs":
            return _Compiled(lambda env: abs(numbers(env)[0]), _NUM, False)
        if func == "clamp":

            def clamp(env: Env) -> Value:
                x, lo, hi = numbers(env)
                if lo > hi:
                    raise ExprError(
                        f"clamp(x, lo, hi) needs lo <= hi, got lo = {lo!r} and hi = {hi!r}",
                        pos,
                        text,
                    )
                return lo if x < lo else hi if x > hi else x

            return _Compiled(clamp, _NUM, False)

        def round_(env: Env) -> Value:
            x, *rest = numbers(env)
            ndigits = rest[0] if rest else 0.0
            if ndigits != int(ndigits) or abs(ndigits) > MAX_NDIGITS:
                raise ExprError(
                    f"round(x, ndigits) needs a whole ndigits from -{MAX_NDIGITS} to "
                    f"{MAX_NDIGITS}, got {ndigits!r}",
                    pos,
                    text,
                )
            # No overflow check: near the top of the float range the spacing of floats
            # (~1e292) dwarfs 10**15, so rounding there leaves the value as it is.
            return round(x, int(ndigits))

        return _Compiled(round_, _NUM, False)

    def static(
        self, node: Node, what: str, sides: list[tuple[str, _Compiled]], wanted: str
    ) -> None:
        """Refuse an operand whose type the text already shows to be wrong."""
        for label, part in sides:
            if part.type not in (wanted, _ANY):
                hint = " (write `1 if c else 0` for a number from a condition)" * (
                    part.type == _BOOL and wanted == _NUM
                )
                raise ExprError(
                    f"{what}, but {label} is {_a(part.type)}{hint}", node.pos, self.text
                )


def _constant(value: Value) -> _Compiled:
    kind: _Type = _BOOL if type(value) is bool else _STR if type(value) is str else _NUM
    return _Compiled(lambda env: value, kind, True)


def _arith(op: str, lf: _Run, rf: _Run, node: Binary, text: str) -> _Run:
    pos, apply, what = node.pos, _ARITH[op], f"'{op}' needs numbers"

    def run(env: Env) -> Value:
        a, b = lf(env), rf(env)
        if type(a) is float and type(b) is float:
            result = apply(a, b)
            if result - result == 0.0:  # finite
                return result
            raise _not_finite(f"{a!r} {op} {b!r}", pos, text)
        raise _type_error(
            what,
            [("its left side", node.left, a), ("its right side", node.right, b)],
            float,
            pos,
            text,
        )

    def divide(env: Env) -> Value:
        a, b = lf(env), rf(env)
        if type(a) is float and type(b) is float:
            if b == 0.0:
                raise ExprError(
                    f"{'division' if op == '/' else 'modulo'} by zero in {a!r} {op} 0: "
                    f"guard it, e.g. a {op} b if b != 0 else 0",
                    pos,
                    text,
                )
            result = apply(a, b)
            if result - result == 0.0:
                return result
            raise _not_finite(f"{a!r} {op} {b!r}", pos, text)
        raise _type_error(
            what,
            [("its left side", node.left, a), ("its right side", node.right, b)],
            float,
            pos,
            text,
        )

    return divide if op in ("/", "%") else run


def _coerce(value: object, name: str, pos: int, text: str) -> Value:
    """Turn a point value of another type (int, numpy number, None) into a float or refuse it."""
    if value is None:
        raise ExprError(f"{name!r} has no value yet (None)", pos, text)
    if isinstance(value, Real):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isfinite(number):
            return number
        raise ExprError(f"{name!r} is not a finite number ({_shorten(repr(value))})", pos, text)
    raise ExprError(
        f"{name!r} has a value of type {type(value).__name__}; expected a number, a boolean or "
        "a string",
        pos,
        text,
    )


def _type_error(
    what: str,
    operands: list[tuple[str, Node, Value]],
    expected: type | None,
    pos: int,
    text: str,
) -> ExprError:
    """Say which operands are not of the `expected` type (None: all), naming the points."""
    said = ", ".join(
        f"{node.name if isinstance(node, Name) else label} is {_describe(value)}"
        for label, node, value in operands
        if type(value) is not expected
    )
    return ExprError(f"{what}, but {said}", pos, text)


def _not_finite(computed: str, pos: int, text: str) -> ExprError:
    return ExprError(
        f"{computed} is not a finite number (overflow): check the values it is given", pos, text
    )


def _describe(value: Value) -> str:
    if type(value) is bool:
        return f"the boolean {'true' if value else 'false'}"
    if type(value) is str:
        return f"the string {_clip(value)}"
    return f"the number {value!r}"


def _a(kind: str) -> str:
    return {_NUM: "a number", _BOOL: "a condition (true/false)", _STR: "a string"}.get(kind, kind)


def _locate(text: str, pos: int) -> tuple[str, str, int]:
    """Return where `pos` is in words, the line around it made printable, and its column there."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start : end if end >= 0 else len(text)]
    column = pos - start
    where = f"column {column + 1}"
    if "\n" in text:
        where = f"line {text.count(chr(10), 0, start) + 1}, {where}"
    # A long line shows a window around the column, so the caret stays on the screen.
    width = 76
    lo = max(0, min(column - width // 2, len(line) - width))
    shown = line[lo : lo + width]
    prefix = "..." if lo > 0 else ""
    suffix = "..." if lo + width < len(line) else ""
    # Control characters would garble a log line or a terminal: one '?' each keeps the caret true.
    printable = "".join(c if c.isprintable() else " " if c == "\t" else "?" for c in shown)
    return where, prefix + printable + suffix, column - lo + len(prefix)
