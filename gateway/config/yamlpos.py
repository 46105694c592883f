"""YAML parsing that remembers where each key came from, so errors can name the line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

__all__ = ["YamlDocument", "format_path", "parse_yaml"]

PathPart = str | int


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
    """Parse one YAML document; raise yaml.YAMLError (with a mark) on bad syntax or duplicates."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        _refuse_duplicate_keys(root)
    data = yaml.safe_load(text)
    return YamlDocument(data, root)


def format_path(path: Sequence[PathPart]) -> str:
    """Render a key path the way a user reads it: `devices[2].points[5].address`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _child(node: yaml.Node | None, part: PathPart) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return value
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
        return node.value[part] if 0 <= part < len(node.value) else None
    return None


def _refuse_duplicate_keys(node: yaml.Node) -> None:
    # PyYAML keeps the last of two equal keys without a word; in a plant config that hides a
    # typo'd copy-paste, so it is an error here.
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, yaml.Node] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    first = seen[key.value].start_mark.line + 1
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key.value!r} (first defined on line {first})",
                        key.start_mark,
                    )
                seen[key.value] = key
            _refuse_duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item)
