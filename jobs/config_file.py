"""Reading a stage config from a path or URI, with errors that name the file and field."""

from __future__ import annotations

import json

import yaml
from pydantic import BaseModel, ValidationError

from jobs import store
from jobs.errors import BadInputError


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last one silently: a second ``sft:`` stage, or ``train:`` block, would replace the
    first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys it may override
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice")
        out[key] = value
    return out


def load_mapping(uri: str) -> dict:
    """A YAML or JSON mapping from a local path or store URI."""
    try:
        text = store.read_text(uri).removeprefix("\ufeff")  # a byte-order mark (Windows)
    except FileNotFoundError:
        raise BadInputError(f"{uri}: no such config file") from None
    try:
        if uri.endswith(".json"):
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            data = yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader
    except ValueError as exc:  # JSONDecodeError, or a key given twice
        line = getattr(exc, "lineno", None)
        where = f"line {line}: " if line else ""
        reason = getattr(exc, "msg", str(exc))
        raise BadInputError(f"{uri}: {where}not valid YAML/JSON ({reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else f"line {getattr(exc, 'lineno', '?')}"
        reason = getattr(exc, "problem", None) or getattr(exc, "msg", str(exc))
        raise BadInputError(f"{uri}: {where}: not valid YAML/JSON ({reason})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{uri}: expected a mapping of config fields at the top level")
    return data


def describe_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    """One line: the file, the dotted path of the first bad field, and what is wrong."""
    first = exc.errors()[0]
    path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(first["loc"]))
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {path or '<top>'}: {first['msg']}{tail}"


def validate(model: type[BaseModel], data: dict, source: str, prefix: str = "") -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadInputError(describe_validation_error(exc, source, prefix)) from None
