"""Reading a config's YAML file safely: PyYAML's safe loader, bounded against hostile files.

:func:`read_yaml_mapping` refuses, with a ConfigError naming the file: a missing file, one over
:data:`MAX_YAML_BYTES`, invalid YAML, a key given twice in one mapping, aliases that expand beyond
:data:`MAX_YAML_NODES` values (an alias bomb) or refer to themselves, and a document that is not
a mapping. Exponent numbers without a dot (``1e-2``) are read as numbers, as YAML 1.2 reads them.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from ..errors import ConfigError
from .config_values import quote

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_NODES", "read_yaml_mapping"]

#: A kd2m config is a few hundred bytes and nodes; these bounds are far above any real one.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand it beyond
    :data:`MAX_YAML_NODES` nodes, or that refers to itself, before constructing anything.

    An alias (``*a``) is a reference to an anchored node, so a 444-byte file of nested aliases
    (``a: &a [x, x, ...]``, ``b: &b [*a, *a, ...]``, …) composes to a small graph that expands
    to billions of nodes: cheap to load, but any walk over it (a deep copy, an error message's
    ``repr``) runs out of memory. The size is counted on the composed graph, each shared node
    once (memoised): O(graph size), not O(expansion).
    """

    def construct_document(self, node):
        _check_expansion(node, MAX_YAML_NODES)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        """Refuses a key given twice in one mapping (YAML would keep the last silently), naming it
        and both lines; keys brought in by a merge (``<<: *base``) may be overridden, as YAML says."""
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(f"key {quote(key)} is given twice in one mapping (lines {lines[key]} and "
                                      f"{line}); YAML would keep only the last: keep one")
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e-2 and 5e+3 as strings: its float needs a dot. Every other YAML
# parser (1.2) reads them as numbers, and so does the command line's --lr 1e-2; so does this one.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root, limit: int) -> int:
    """Number of nodes of ``root`` with every alias expanded; a ConfigError beyond ``limit`` or on
    a cycle. Iterative depth-first walk (no recursion limit), each distinct node sized once."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > limit:
                raise ConfigError(f"the YAML's aliases (*name) expand it to more than {limit} values "
                                  f"(at line {node.start_mark.line + 1}); a kd2m config needs far fewer: "
                                  "write the values out")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigError(f"a YAML alias at line {node.start_mark.line + 1} refers to a value that contains "
                              "it (a recursive structure); write the values out")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]



def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping in the YAML file ``path``, with the refusals above (its keys not checked:
    :func:`kd2m.harness.config.from_mapping` checks them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size} bytes is not a kd2m config (the limit is {MAX_YAML_BYTES} bytes)")
    try:
        data = yaml.load(path.read_bytes(), Loader=_BoundedLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0][:200]})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: nested too deeply to be a kd2m config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data
