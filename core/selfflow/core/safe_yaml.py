"""Reading untrusted YAML (config files, ``--set`` values, a checkpoint's stored config) with bounds.

``yaml.safe_load`` runs no code but shares an aliased node wherever it is used, so a 1 KB "billion laughs"
document (nine anchors, each aliasing the previous one nine times) is a structure of 9⁹ nodes once anything
walks it — validation, error messages, ``yaml.safe_dump``. :func:`parse_yaml` composes the node graph first
and refuses it when its expanded size exceeds :data:`MAX_NODES`, it nests deeper than :data:`MAX_DEPTH`, or
an alias refers to itself (a cycle); only then are Python objects built.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

# Far above any real config (the largest shipped one expands to a few hundred nodes).
MAX_NODES = 100_000
MAX_DEPTH = 50


class YamlError(ValueError):
    """A YAML text is invalid or too large; the message names its source and says why, in one line."""


def _expanded_size(node: Node, depth: int, sizes: dict[int, int], open_: set[int], source: str) -> int:
    """Nodes in ``node``'s tree with every alias expanded (memoised per node, so linear in the graph)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if depth > MAX_DEPTH:
        raise YamlError(f"{source} nests deeper than {MAX_DEPTH} levels")
    if id(node) in open_:
        raise YamlError(f"{source} holds an alias that refers to itself (line {node.start_mark.line + 1})")
    children: list[Node] = []
    if isinstance(node, SequenceNode):
        children = node.value
    elif isinstance(node, MappingNode):
        children = [n for pair in node.value for n in pair]
    open_.add(id(node))
    total = 1
    for child in children:
        total += _expanded_size(child, depth + 1, sizes, open_, source)
        if total > MAX_NODES:
            raise YamlError(f"{source} expands to more than {MAX_NODES} values (aliases of aliases?); refused")
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def _one_line(e: yaml.YAMLError) -> str:
    """``problem (line L, column C)`` instead of PyYAML's multi-line report with a snippet."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{e.context + ', ' if e.context else ''}{e.problem}{where}"
    return " ".join(str(e).split())[:200]


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document ``text`` as Python objects (``safe_load`` semantics); :class:`YamlError` naming
    ``source`` (e.g. ``config file run.yaml``) for invalid, cyclic, too deep or too large input."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, 0, {}, set(), source)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise YamlError(f"{source} is not valid YAML: {_one_line(e)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise YamlError(f"{source} nests too deeply") from None
    finally:
        loader.dispose()
