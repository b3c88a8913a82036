"""Reading a stage config from a path or URI, with errors that name the file and field."""

from __future__ import annotations

import json

import yaml
from pydantic import BaseModel, ValidationError

from jobs import store
from jobs.errors import BadInputError


def load_mapping(uri: str) -> dict:
    """A YAML or JSON mapping from a local path or store URI."""
    try:
        text = store.read_text(uri).removeprefix("\ufeff")  # a byte-order mark (Windows)
    except FileNotFoundError:
        raise BadInputError(f"{uri}: no such config file") from None
    try:
        data = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
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
