"""YAML parsing that remembers where each key came from, so errors can name the line.

The parser is also the first line of defence against a hostile file: it refuses nesting deeper
than MAX_DEPTH, aliases that stand for more than MAX_ALIAS_VALUES values in total (the "billion
laughs" bomb: a few hundred bytes that expand to billions of strings), and aliases that refer
to the node containing them. It counts while composing, before anything walks the expanded
tree, so a bomb is refused in the time it takes to read it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.resolver import Resolver

try:  # libyaml's event parser is ~5x faster than the pure-Python one for large configs
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


__all__ = ["MAX_ALIAS_VALUES", "MAX_DEPTH", "YamlDocument", "format_path", "parse_yaml"]

PathPart = str | int

# A site config nests 7 levels (devices → points → range → lo); 64 leaves room for anything
# sensible and stays far below Python's recursion limit in everything that walks the tree.
MAX_DEPTH = 64
# Values that aliases may add in total. Shared options or ranges across thousands of points
# stay well below it; a bomb passes it within a few of its lines.
MAX_ALIAS_VALUES = 100_000


class YamlDocument:
    """Parsed YAML data plus the node tree that knows each value's line."""

    def __init__(self, data: Any, root: yaml.Node | None) -> None:
        self.data = data
        self._root = root

    def line_of(self, path: Sequence[PathPart]) -> int | None:
        """Return the 1-based line of the deepest node the path reaches, or None."""
        node = self._root
        line = node.start_mark.line + 1 if node is not None else None
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            node = child
            line = node.start_mark.line + 1
        return line


def parse_yaml(text: str) -> YamlDocument:
    """Parse one YAML document; raise yaml.YAMLError (with a mark) on bad syntax or duplicates.

    Also refused, as a yaml.YAMLError with the line: nesting deeper than MAX_DEPTH, aliases
    expanding to more than MAX_ALIAS_VALUES values, self-referencing aliases, and scalars the
    YAML types cannot hold (an impossible date, a 5,000-digit integer).
    """
    loader = _BoundedLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            # libyaml stops at 1,000 levels on its own, while looking ahead for a key; the bound
            # the user must know is ours.
            if exc.problem == "exceeded maximum nesting depth":
                exc.problem = (
                    f"nesting deeper than {MAX_DEPTH} levels; a site config needs fewer than 10"
                )
            raise
        if root is None:
            return YamlDocument(None, None)
        _refuse_duplicate_keys(root)
        data = loader.construct_document(root)
    finally:
        loader.dispose()
    return YamlDocument(data, root)


def format_path(path: Sequence[PathPart]) -> str:
    """Render a key path the way a user reads it: `devices[2].points[5].address`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            # A key with spaces, dots or a line break in it: quoted, so the message stays on one
            # line and the path stays readable.
            out += f"[{part!r}]"
    return out or "(top level)"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


class _BoundedComposer(Composer):
    """PyYAML's composer, counting depth and alias expansion as it goes."""

    # Provided by the parser it is mixed with (libyaml's or PyYAML's).
    check_event: Callable[..., bool]
    peek_event: Callable[[], Any]

    def __init__(self) -> None:
        super().__init__()
        self._depth = 0
        # Per anchor: how many values the anchored node stands for once its own aliases are
        # expanded, and how deep it reaches below itself.
        self._values: dict[str, int] = {}
        self._heights: dict[str, int] = {}
        self._open: set[str] = set()  # anchors whose node is still being composed
        self._count = 0  # values composed so far, aliases counted as what they expand to
        self._alias_values = 0
        self._deepest_below = [0]  # per open node: the greatest height among its children

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(AliasEvent):
            self._count_alias()
            return super().compose_node(parent, index)  # PyYAML's own: the anchored node
        event = self.peek_event()
        if self._depth >= MAX_DEPTH:
            raise ComposerError(
                None,
                None,
                f"nesting deeper than {MAX_DEPTH} levels; a site config needs fewer than 10",
                event.start_mark,
            )
        anchor = event.anchor
        if anchor is not None:
            self._open.add(anchor)
        before = self._count
        self._depth += 1
        self._deepest_below.append(0)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            height = 1 + self._deepest_below.pop()
        self._count += 1
        self._deepest_below[-1] = max(self._deepest_below[-1], height)
        if anchor is not None:
            self._open.discard(anchor)
            self._values[anchor] = self._count - before
            self._heights[anchor] = height
        return node

    def _count_alias(self) -> None:
        event = self.peek_event()
        anchor = event.anchor
        if anchor in self._open:
            raise ComposerError(
                None,
                None,
                f"alias *{anchor} refers to the node that contains it (a value that contains "
                "itself never ends)",
                event.start_mark,
            )
        if anchor in self._values:
            values, height = self._values[anchor], self._heights[anchor]
            self._alias_values += values
            if self._alias_values > MAX_ALIAS_VALUES:
                raise ComposerError(
                    None,
                    None,
                    f"aliases expand to more than {MAX_ALIAS_VALUES:,} values (*{anchor} alone "
                    f"stands for {values:,}); write the shared settings out, or share fewer",
                    event.start_mark,
                )
            if self._depth + height > MAX_DEPTH:
                raise ComposerError(
                    None,
                    None,
                    f"alias *{anchor} nests deeper than {MAX_DEPTH} levels where it is used",
                    event.start_mark,
                )
            self._count += values
            self._deepest_below[-1] = max(self._deepest_below[-1], height)
        # An undefined alias: PyYAML's composer raises its own error for it.


class _MarkedConstructor(SafeConstructor):
    """SafeConstructor that names the line of a scalar it cannot turn into a value."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, KeyError, AttributeError, TypeError) as exc:
            # PyYAML lets these escape with no position: `2001-13-45` as a date, an integer
            # longer than Python converts, `!!int abc`; and, from a tag on text that is no such
            # value, a KeyError (`!!bool maybe`) or an AttributeError (`!!timestamp x`).
            raise ConstructorError(
                None, None, f"cannot read {_short(node)}: {exc}", node.start_mark
            ) from None


class _BoundedLoader(_BoundedComposer, _Parser, _MarkedConstructor, Resolver):
    """Events from libyaml, composition (bounded) and construction (safe) in Python."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        _BoundedComposer.__init__(self)
        _MarkedConstructor.__init__(self)
        Resolver.__init__(self)

    # CParser has its own C composer; ours, with the bounds, must be the one used.
    get_single_node = Composer.get_single_node
    compose_document = Composer.compose_document

    def dispose(self) -> None:
        """Drop parser state (libyaml's buffers, anchors)."""
        self.anchors = {}
        dispose = getattr(_Parser, "dispose", None)
        if dispose is not None:
            dispose(self)


def _short(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        value = node.value if len(node.value) <= 40 else node.value[:40] + "…"
        return f"{value!r}"
    return "a mapping" if isinstance(node, yaml.MappingNode) else "a sequence"


def _child(node: yaml.Node | None, part: PathPart) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return value
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        return node.value[part] if 0 <= part < len(node.value) else None
    return None


def _refuse_duplicate_keys(root: yaml.Node) -> None:
    # PyYAML keeps the last of two equal keys without a word; in a plant config that hides a
    # typo'd copy-paste, so it is an error here. Each node once: an alias shares its node.
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, yaml.Node] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        first = seen[key.value].start_mark.line + 1
                        raise ConstructorError(
                            None,
                            None,
                            f"duplicate key {key.value!r} (first defined on line {first})",
                            key.start_mark,
                        )
                    seen[key.value] = key
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
