"""Rewards for RL on prompts: verifiable functions (a program checks the answer), a reward
model, or a weighted sum of several.

Built in: ``answer_match`` (the extracted answer equals the example's, as text),
``numeric_match`` (as numbers, within a tolerance), ``format`` (a regular expression matches
the whole answer), ``json`` (the answer parses as JSON), ``overlong`` (DAPO's soft overlong
punishment of answers near the token limit), ``reward_model`` (a reward stage's model
scores prompt and answer). ``function`` imports a user's ``module:function`` called as
``fn(prompt, completion, example) -> float`` (as TRL's and verl's reward functions are
given the prompt, the completion and the data set's other fields).
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Literal, SupportsFloat

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.batches import literals
from jobs.errors import BadInputError

# A number as answers write it: a sign (ASCII or U+2212), thousands in groups of three
# ("1,000"), a decimal part (".5" too), a fraction ("3/4"), an exponent ("1e3").
# Not inside a word or after a digit ("GPT-4" is 4, "5-7" ends on 7, not -7).
NUMBER = (
    r"(?<![\w.])[-\u2212]?(?=\.?\d)(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)?(?:\.\d+)?"
    r"(?:[eE][-+]?\d+)?(?:/\d+)?"
)


class RewardFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal[
        "answer_match", "numeric_match", "format", "json", "overlong", "reward_model", "function"
    ]
    name: str | None = Field(None, description="its metric's name; default: the kind")
    weight: float = 1.0
    extract: str | None = Field(
        None,
        description="regular expression whose first group (or whole match) is the answer, "
        "its last match in the completion; default: the stripped completion (answer_match), "
        "its last number (numeric_match)",
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
    overlong_buffer: int | None = Field(
        None,
        ge=1,
        description="overlong: the last tokens before the stage's max_new_tokens, over which "
        "the reward falls from 0 to -1 (DAPO's L_cache; verl's overlong_buffer.len, TRL's "
        "soft_punish_cache; the weight is verl's penalty_factor)",
    )

    @model_validator(mode="after")
    def _has_its_input(self) -> RewardFunction:
        needs = {
            "format": "pattern",
            "reward_model": "model",
            "function": "function",
            "overlong": "overlong_buffer",
        }
        field = needs.get(self.kind)
        if field and getattr(self, field) is None:
            raise ValueError(f"kind {self.kind} needs {field!r}")
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
    """The answer in a completion: the first group (or match) of the last match of
    ``extract`` or of ``default`` (a worked answer ends on its result: "12+30=42. Answer:
    42", as verl's GSM8K scorer reads it); the stripped completion when neither is given."""
    expression = extract or default
    if expression is None:
        return completion.strip()
    found = None
    for found in re.finditer(expression, completion):  # noqa: B007 - the last one is kept
        pass
    if found is None:
        return None
    return found.group(1) if found.groups() else found.group(0)


def reference(spec: RewardFunction, example: dict, default: str | None, where: str) -> str:
    """The example's answer: its field, or what ``answer_extract`` finds in it. One that
    cannot be read is the data's fault (or the pattern's), named: otherwise every answer
    would score 0 and the run train on nothing; so is an example without the field."""
    if spec.answer_field not in example:
        raise BadInputError(
            f"{where}: reward {spec.label!r}: the example has no field {spec.answer_field!r}"
        )
    expected = extracted(str(example[spec.answer_field]), spec.answer_extract, default)
    if expected is None:
        how = f"answer_extract {spec.answer_extract!r}" if spec.answer_extract else "a number"
        raise BadInputError(
            f"{where}: reward {spec.label!r}: field {spec.answer_field!r} "
            f"({str(example[spec.answer_field])[:80]!r}) has no answer by {how}"
        )
    return expected


def answer_match(spec: RewardFunction) -> Callable[[str, str, dict, str], float]:
    def check(prompt: str, completion: str, example: dict, where: str) -> float:
        answer = extracted(completion, spec.extract, None)
        expected = reference(spec, example, None, where)
        if answer is None:
            return 0.0
        return float(answer.strip() == expected.strip())

    return check


def as_number(text: str | None) -> float | None:
    """A number as :data:`NUMBER` finds them ("1,000", "−3", "3/4", "$18." once
    extracted); None for anything else."""
    if text is None:
        return None
    match = re.search(NUMBER, text.replace("\u2212", "-"))
    if match is None:
        return None
    number = match.group().replace(",", "")
    try:
        if "/" in number:
            top, bottom = number.split("/")
            return float(Fraction(Fraction(top), Fraction(bottom)))
        return float(number)
    except (ValueError, ZeroDivisionError):
        return None


def numeric_match(spec: RewardFunction) -> Callable[[str, str, dict, str], float]:
    def check(prompt: str, completion: str, example: dict, where: str) -> float:
        answer = as_number(extracted(completion, spec.extract, NUMBER))
        expected = as_number(reference(spec, example, NUMBER, where))
        if expected is None:
            raise BadInputError(
                f"{where}: reward {spec.label!r}: field {spec.answer_field!r} "
                f"({str(example[spec.answer_field])[:80]!r}) holds no number"
            )
        if answer is None:
            return 0.0
        return float(abs(answer - expected) <= spec.tolerance)

    return check


def format_match(spec: RewardFunction) -> Callable[[str, str, dict, str], float]:
    pattern = re.compile(spec.pattern, re.DOTALL)

    def check(prompt: str, completion: str, example: dict, where: str) -> float:
        return float(pattern.fullmatch(completion.strip()) is not None)

    return check


def json_valid(spec: RewardFunction) -> Callable[[str, str, dict, str], float]:
    def check(prompt: str, completion: str, example: dict, where: str) -> float:
        try:
            json.loads(completion)
        except (ValueError, RecursionError):  # deep nesting is the policy's output, not a bug
            return 0.0
        return 1.0

    return check


def imported(spec: RewardFunction) -> Callable[[str, str, dict, str], float]:
    module_name, _, attribute = spec.function.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # noqa: BLE001 - a user's module may fail in any way on import
        raise BadInputError(
            f"reward function {spec.function!r}: cannot import it ({type(exc).__name__}: "
            f"{exc}); give module:function of a module on the PYTHONPATH"
        ) from None
    if not callable(fn):
        raise BadInputError(f"reward function {spec.function!r}: not a function")

    def check(prompt: str, completion: str, example: dict, where: str) -> float:
        return fn(prompt, completion, example)

    return check


def soft_overlong(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's
    get_soft_overlong_punishment, verl's DAPO reward manager): 0 up to ``max_length -
    buffer`` tokens, then falling linearly to -1 at ``max_length`` (an answer cut there),
    so that a long answer is told apart from a cut one before it is cut. ``length``
    counts the answer's tokens with its EOS, as TRL's completion_ids and verl's
    valid_response_length do."""
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return (max_length - buffer - length) / buffer
    return -1.0


BUILT_IN = {
    "answer_match": answer_match,
    "numeric_match": numeric_match,
    "format": format_match,
    "json": json_valid,
    "function": imported,
}


def finite(value, where: str) -> float:
    """A reward as a float: any real number (numpy's and torch's scalars too, as TRL takes
    them); anything else, or NaN or infinity, is an error naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | SupportsFloat):
        raise BadInputError(f"{where} returned {value!r}, not a finite number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{where} returned {value!r}, not a finite number") from None
    if not math.isfinite(number):
        raise BadInputError(f"{where} returned {value!r}, not a finite number")
    return number


class Rewards:
    """Every configured reward of a batch of completions, and their weighted sum."""

    def __init__(
        self, specs: list[RewardFunction], score_model=None, max_length: int | None = None
    ) -> None:
        """``score_model(spec, prompts, completions, finished, placed) -> list[float]``
        scores ``reward_model``s (``placed``: where each prompt's messages lie);
        ``max_length``: the answers' token limit, which ``overlong`` reads."""
        labels = [spec.label for spec in specs]
        if len(set(labels)) != len(labels):
            raise BadInputError(f"rewards: names must differ, got {labels}; set 'name'")
        self.specs, self.score_model, self.max_length = specs, score_model, max_length
        self.checks = {
            spec.label: BUILT_IN[spec.kind](spec)
            for spec in specs
            if spec.kind not in ("reward_model", "overlong")
        }

    def check_examples(self, examples: list[dict], where: list[str]) -> None:
        """Every example's reference answer readable, checked before the first rollout: a
        row without one stops the stage at once, not when it is first drawn hours in."""
        for spec in self.specs:
            if spec.kind not in ("answer_match", "numeric_match"):
                continue
            check = self.checks[spec.label]
            for example, place in zip(examples, where, strict=True):
                check("", "", example, place)  # reads the reference, raising where it has none

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        examples: list[dict],
        where: list[str],
        finished: list[bool] | None = None,
        lengths: list[int] | None = None,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """(total per completion, each reward per completion); ``where`` names each example
        (file and row) for error messages; ``finished``: which completions ended rather than
        being cut at the token limit (a reward model reads a cut one as cut); ``lengths``:
        their tokens, EOS included (what ``overlong`` reads)."""
        each: dict[str, list[float]] = {}
        # where each prompt's messages lie, once for all the reward models
        scored_by_model = any(spec.kind == "reward_model" for spec in self.specs)
        placed = [literals(example) for example in examples] if scored_by_model else []
        for spec in self.specs:
            if spec.kind == "reward_model":
                scored = self.score_model(spec, prompts, completions, finished, placed)
                each[spec.label] = [
                    finite(x, f"{place}: reward {spec.label!r}")
                    for x, place in zip(scored, where, strict=True)
                ]
                continue
            if spec.kind == "overlong":
                if lengths is None or self.max_length is None or len(lengths) != len(completions):
                    raise ValueError("an overlong reward reads each answer's length and the limit")
                limit, buffer = self.max_length, spec.overlong_buffer
                each[spec.label] = [soft_overlong(n, limit, buffer) for n in lengths]
                continue
            check, values = self.checks[spec.label], []
            for prompt, completion, example, place in zip(
                prompts, completions, examples, where, strict=True
            ):
                try:
                    value = check(prompt, completion, example, place)
                except BadInputError:
                    raise
                except Exception as exc:
                    raise BadInputError(
                        f"{place}: reward {spec.label!r} raised {type(exc).__name__}: {exc}"
                    ) from None
                values.append(finite(value, f"{place}: reward {spec.label!r}"))
            each[spec.label] = values
        totals = [
            sum(spec.weight * each[spec.label][i] for spec in self.specs)
            for i in range(len(completions))
        ]
        return totals, each
