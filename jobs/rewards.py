"""Rewards for RL on prompts: verifiable functions (a program checks the answer), a reward
model, or a weighted sum of several.

Built in: ``answer_match`` (the extracted answer equals the example's, as text),
``numeric_match`` (as numbers, within a tolerance), ``format`` (a regular expression matches
the whole answer), ``json`` (the answer parses as JSON), ``reward_model`` (a reward stage's
model scores prompt and answer). ``function`` imports a user's ``module:function`` called as
``fn(prompt, completion, example) -> float`` (as TRL's and verl's reward functions are
given the prompt, the completion and the data set's other fields).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.errors import BadInputError

NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


class RewardFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["answer_match", "numeric_match", "format", "json", "reward_model", "function"]
    name: str | None = Field(None, description="its metric's name; default: the kind")
    weight: float = 1.0
    extract: str | None = Field(
        None,
        description="regular expression whose first group (or whole match) is the answer; "
        "default: the stripped completion (answer_match), its first number (numeric_match)",
    )
    answer_field: str = Field("answer", description="the example's field with the answer")
    answer_extract: str | None = Field(
        None,
        description="regular expression for the answer inside that field (GSM8K: '#### (.+)')",
    )
    tolerance: float = Field(1e-6, ge=0, description="numeric_match: absolute tolerance")
    pattern: str | None = Field(None, description="format: the regular expression")
    model: str | None = Field(None, description="reward_model: a reward stage's model folder")
    function: str | None = Field(None, description="function: module:function to import")

    @model_validator(mode="after")
    def _has_its_input(self) -> RewardFunction:
        needs = {"format": "pattern", "reward_model": "model", "function": "function"}
        field = needs.get(self.kind)
        if field and getattr(self, field) is None:
            raise ValueError(f"a {self.kind} reward needs {field!r}")
        for expression in (self.extract, self.pattern, self.answer_extract):
            if expression is not None:
                try:
                    re.compile(expression)
                except re.error as exc:
                    raise ValueError(f"{expression!r} is not a regular expression: {exc}") from None
        return self

    @property
    def label(self) -> str:
        return self.name or self.function or self.kind


def extracted(completion: str, extract: str | None, default: str | None) -> str | None:
    """The answer in a completion: the first group (or match) of ``extract`` or of
    ``default``; the stripped completion when neither is given."""
    expression = extract or default
    if expression is None:
        return completion.strip()
    found = re.search(expression, completion)
    if found is None:
        return None
    return found.group(1) if found.groups() else found.group(0)


def reference(spec: RewardFunction, example: dict, default: str | None) -> str | None:
    """The example's answer: its field, or what ``answer_extract`` finds in it."""
    return extracted(str(example[spec.answer_field]), spec.answer_extract, default)


def answer_match(spec: RewardFunction) -> Callable[[str, str, dict], float]:
    def check(prompt: str, completion: str, example: dict) -> float:
        answer, expected = extracted(completion, spec.extract, None), reference(spec, example, None)
        if answer is None or expected is None:
            return 0.0
        return float(answer.strip() == expected.strip())

    return check


def as_number(text: str | None) -> float | None:
    try:
        return float(text.replace(",", "")) if text is not None else None
    except ValueError:
        return None


def numeric_match(spec: RewardFunction) -> Callable[[str, str, dict], float]:
    def check(prompt: str, completion: str, example: dict) -> float:
        answer = as_number(extracted(completion, spec.extract, NUMBER))
        expected = as_number(reference(spec, example, NUMBER))
        if answer is None or expected is None:
            return 0.0
        return float(abs(answer - expected) <= spec.tolerance)

    return check


def format_match(spec: RewardFunction) -> Callable[[str, str, dict], float]:
    pattern = re.compile(spec.pattern, re.DOTALL)

    def check(prompt: str, completion: str, example: dict) -> float:
        return float(pattern.fullmatch(completion.strip()) is not None)

    return check


def json_valid(spec: RewardFunction) -> Callable[[str, str, dict], float]:
    def check(prompt: str, completion: str, example: dict) -> float:
        try:
            json.loads(completion)
        except (ValueError, RecursionError):  # deep nesting is the policy's output, not a bug
            return 0.0
        return 1.0

    return check


def imported(spec: RewardFunction) -> Callable[[str, str, dict], float]:
    module_name, _, attribute = spec.function.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise BadInputError(
            f"reward function {spec.function!r}: cannot import it ({exc}); "
            "give module:function of a module on the PYTHONPATH"
        ) from None
    if not callable(fn):
        raise BadInputError(f"reward function {spec.function!r}: not a function")
    return fn


BUILT_IN = {
    "answer_match": answer_match,
    "numeric_match": numeric_match,
    "format": format_match,
    "json": json_valid,
    "function": imported,
}


class Rewards:
    """Every configured reward of a batch of completions, and their weighted sum."""

    def __init__(self, specs: list[RewardFunction], score_model=None) -> None:
        """``score_model(prompts, completions) -> list[float]`` scores ``reward_model``s."""
        labels = [spec.label for spec in specs]
        if len(set(labels)) != len(labels):
            raise BadInputError(f"rewards: names must differ, got {labels}; set 'name'")
        self.specs, self.score_model = specs, score_model
        self.checks = {
            spec.label: BUILT_IN[spec.kind](spec) for spec in specs if spec.kind != "reward_model"
        }

    def __call__(
        self, prompts: list[str], completions: list[str], examples: list[dict], where: list[str]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(total per completion, each reward per completion); ``where`` names each example
        (file and row) for error messages."""
        each: dict[str, list[float]] = {}
        for spec in self.specs:
            if spec.kind == "reward_model":
                each[spec.label] = [float(x) for x in self.score_model(spec, prompts, completions)]
                continue
            check, values = self.checks[spec.label], []
            for prompt, completion, example, place in zip(
                prompts, completions, examples, where, strict=True
            ):
                try:
                    value = check(prompt, completion, example)
                except KeyError as exc:
                    raise BadInputError(
                        f"{place}: reward {spec.label!r}: the example has no field {exc}"
                    ) from None
                except Exception as exc:
                    raise BadInputError(
                        f"{place}: reward {spec.label!r} raised {type(exc).__name__}: {exc}"
                    ) from None
                if not isinstance(value, int | float) or not math.isfinite(value):
                    raise BadInputError(
                        f"{place}: reward {spec.label!r} returned {value!r}, not a finite number"
                    )
                values.append(float(value))
            each[spec.label] = values
        totals = [
            sum(spec.weight * each[spec.label][i] for spec in self.specs)
            for i in range(len(completions))
        ]
        return totals, each
