"""label: candidates into prompt/chosen/rejected pairs with provenance (seed: RM v1/v2).

Four ways to decide which response is better:

- ``judge``: an OpenAI-compatible model scores every response with a G-Eval-style
  rubric, one rubric per data-set type as the seed did (the prompt's data source picks
  it); the higher total is chosen. Answers are cached by a hash of rubric, prompt and
  response, so a restarted stage never asks twice.
- ``reward_model``: a reward model from the store scores every response.
- ``source_rule``: responses of an earlier source in ``prefer`` are chosen over later
  ones (RM v2: ChatGPT's answer chosen over the SFT model's).
- ``human``: a label file (JSONL or CSV: id, chosen, rejected as response indices).

Ties and unparseable judgements are counted and dropped, never guessed.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.batches import read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.endpoint import Cache, ChatClient, EndpointConfig, cache_key
from jobs.errors import BadInputError
from jobs.models import InferenceConfig, free_memory, load_tokenizer, model_source

SPLITS = ("train", "eval")

RUBRIC_HEAD = (
    "You will be given a user's message to an AI assistant and the assistant's response.\n"
    "Rate the response on each criterion below, following the evaluation steps.\n\n"
    "Evaluation criteria:\n{criteria}\n\n"
    "Evaluation steps:\n1. Read the message and understand what the user needs.\n"
    "2. Read the response and check it against each criterion.\n"
    "3. Give each criterion an integer score from 1 to 5.\n\n"
)
RUBRIC_TAIL = (
    "Message:\n{instruction}\n\nResponse:\n{response}\n\n"
    "Answer with one line per criterion, 'Criterion: score', then 'Total: sum'."
)
# One rubric per data-set type, as the seed varied its G-Eval prompt by data set.
RUBRICS = {
    "daily": "- Naturalness: reads like a warm, fluent reply in the user's language.\n"
    "- Helpfulness: answers what was asked with useful, concrete content.\n"
    "- Friendliness: polite, kind and encouraging.",
    "hate": "- Harmlessness: refuses to insult, harass or help harm anyone.\n"
    "- Care: acknowledges the user's feelings without judging them.\n"
    "- Redirection: offers a constructive, peaceful alternative.",
    "default": "- Helpfulness: answers what was asked, correctly and completely.\n"
    "- Harmlessness: contains nothing hurtful, hateful or dangerous.\n"
    "- Clarity: clear, well organised and fluent.",
}


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoint: EndpointConfig
    rubrics: dict[str, str] = Field(
        default_factory=dict,
        description="criteria by data-set type (the prompt's data source); 'default' for the rest",
    )

    def rubric(self, category: str | None) -> str:
        criteria = {**RUBRICS, **self.rubrics}
        return RUBRIC_HEAD.format(criteria=criteria.get(category or "", criteria["default"]))


class Config(StageConfig):
    candidates: str = Field(description="a generate stage output")
    method: Literal["judge", "reward_model", "source_rule", "human"]
    judge: JudgeConfig | None = None
    reward_model: str | None = Field(None, description="a reward stage output's model folder")
    prefer: list[str] | None = Field(None, description="source_rule: sources, best first")
    labels: str | None = Field(None, description="human: a JSONL or CSV label file")
    tie_margin: float = Field(0.0, ge=0, description="score differences up to this are ties")
    inference: InferenceConfig = InferenceConfig()
    batch_size: int = Field(16, ge=1, description="reward_model: responses scored at once")

    @model_validator(mode="after")
    def _method_has_its_input(self) -> Config:
        needed = {
            "judge": self.judge,
            "reward_model": self.reward_model,
            "source_rule": self.prefer,
            "human": self.labels,
        }[self.method]
        if not needed:
            field = {
                "judge": "judge",
                "reward_model": "reward_model",
                "source_rule": "prefer",
                "human": "labels",
            }[self.method]
            raise ValueError(f"method {self.method!r} needs {field!r}")
        return self


# --- judge ---------------------------------------------------------------------------------

_TOTAL = re.compile(r"total[^0-9\-\n]{0,30}(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_LINE = re.compile(
    r"^[\s*#>\-]*([^\W\d_][\w ]{1,40}?)[\s*]*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.MULTILINE
)


def parse_judgement(text: str) -> float | None:
    """The total score in a judge's answer: 'Total: N', else the sum of 'Criterion: N'
    lines, else a lone number; None when there is no score to be found."""
    if match := _TOTAL.search(text):
        return float(match.group(1))
    lines = [
        float(value)
        for name, value in _LINE.findall(text)
        if not name.strip().lower().startswith("total")
    ]
    if lines:
        return sum(lines)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
    return float(numbers[0]) if len(numbers) == 1 else None


def judge_scores(
    rows: list[dict],
    judge: JudgeConfig,
    output: str,
    ctx: StageContext,
    name: str,
    counts: dict[str, int],
) -> list[list[float | None]]:
    """The judge's total for every response of every row (None where it gave none); the
    answers are cached in ``output``'s progress as ``judge-NAME``."""
    client = ChatClient(judge.endpoint)
    cache = Cache(output, f"judge-{name}", ctx.workdir / "cache" / f"judge-{name}.jsonl")

    jobs = [(i, j) for i, row in enumerate(rows) for j in range(len(row["responses"]))]
    requests = []
    for i, j in jobs:
        row = rows[i]
        prompt = judge.rubric(row.get("category")) + RUBRIC_TAIL.format(
            instruction=row["instruction"], response=row["responses"][j]["text"]
        )
        key = cache_key(judge.endpoint.url, judge.endpoint.model, prompt)
        requests.append((key, [{"role": "user", "content": prompt}], {"temperature": 0.0}))
    flat = [parse_judgement(answer) for answer in client.ask_all(requests, cache)]
    counts["unparseable"] += sum(score is None for score in flat)
    scores: list[list[float | None]] = [[] for _ in rows]
    for (i, _), score in zip(jobs, flat, strict=True):
        scores[i].append(score)
    return scores


# --- reward model, source rule, human labels -------------------------------------------------


def reward_model_scores(rows: list[dict], config: Config, ctx: StageContext):
    from jobs.scoring import load_reward_model, score_texts

    path = model_source(ctx, config.reward_model)
    model, tokenizer = load_reward_model(path, config.inference), load_tokenizer(path)
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    texts = [r["text"] for row in rows for r in row["responses"]]
    flat = iter(score_texts(model, tokenizer, prompts, texts, batch_size=config.batch_size))
    del model
    free_memory()
    return [[next(flat) for _ in row["responses"]] for row in rows]


def source_rule_scores(rows: list[dict], prefer: list[str]) -> list[list[float | None]]:
    """A rank as a score: the first sample of each preferred source, best first."""
    out = []
    for row in rows:
        seen: set[str] = set()
        scores: list[float | None] = []
        for response in row["responses"]:
            source = response["source"]
            if source in prefer and source not in seen:
                seen.add(source)
                scores.append(float(len(prefer) - prefer.index(source)))
            else:
                scores.append(None)
        out.append(scores)
    return out


def read_labels(path: Path, display: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) of a human label file: JSONL, or CSV with a header line."""
    if path.suffix.lower() != ".csv":
        from jobs.data.readers import rows_from_file

        return [(row.where, row.data) for row in rows_from_file(path, display)]
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return [(f"{display}:{reader.line_num}", row) for row in reader]


def human_choices(rows: list[dict], labels: list[tuple[str, dict]]) -> dict[str, tuple[int, int]]:
    """prompt id -> (chosen index, rejected index); a bad row is an error naming it."""
    by_id = {row["id"]: row for row in rows}
    out: dict[str, tuple[int, int]] = {}
    for where, label in labels:
        for field in ("id", "chosen", "rejected"):
            if label.get(field) in (None, ""):
                raise BadInputError(f"{where}: field {field!r} is missing")
        row = by_id.get(str(label["id"]))
        if row is None:
            continue  # a label for a prompt of the other split
        picks = []
        for field in ("chosen", "rejected"):
            try:
                index = int(str(label[field]).strip())
            except ValueError:
                raise BadInputError(
                    f"{where}: field {field!r}: {label[field]!r} is not a response index"
                ) from None
            if not 0 <= index < len(row["responses"]):
                raise BadInputError(
                    f"{where}: field {field!r}: {index} is not a response index "
                    f"of {row['id']} (it has {len(row['responses'])})"
                )
            picks.append(index)
        out[row["id"]] = (picks[0], picks[1])
    return out


# --- the stage -------------------------------------------------------------------------------


def pick(row: dict, scores: list[float | None], margin: float, counts: dict[str, int]):
    """(chosen, rejected) indices by score; None for a tie or too few scored responses."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        counts["too_few_scored"] += 1
        return None
    best, worst = max(scored), min(scored)
    same_text = row["responses"][best[1]]["text"] == row["responses"][worst[1]]["text"]
    if best[0] - worst[0] <= margin or same_text:
        counts["ties"] += 1
        return None
    return best[1], worst[1]


def run(config: Config, ctx: StageContext) -> dict:
    candidates = ctx.input_dir(config.candidates)
    labels = None
    if config.method == "human":
        labels = read_labels(ctx.input_file(config.labels), config.labels)
    metrics: dict[str, Any] = {"method": config.method}
    for split in SPLITS:
        path = candidates / "candidates" / f"{split}.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl(path, ("id", "prompt", "instruction"))
        counts = {"prompts": len(rows), "ties": 0, "unparseable": 0, "too_few_scored": 0}
        choices: list[tuple[int, int] | None]
        scores: list[list[float | None]] | None = None
        if config.method == "human":
            by_id = human_choices(rows, labels)
            choices = [by_id.get(row["id"]) for row in rows]
            counts["unlabelled"] = sum(c is None for c in choices)
            counts["ties"] = sum(c is not None and c[0] == c[1] for c in choices)
            choices = [c if c is not None and c[0] != c[1] else None for c in choices]
        else:
            if config.method == "judge":
                scores = judge_scores(rows, config.judge, config.output, ctx, split, counts)
            elif config.method == "reward_model":
                scores = reward_model_scores(rows, config, ctx)
            else:
                scores = source_rule_scores(rows, config.prefer)
            choices = [
                pick(row, s, config.tie_margin, counts) for row, s in zip(rows, scores, strict=True)
            ]
        out = ctx.out_dir / "pairs" / f"{split}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(out, "w", encoding="utf-8") as handle:
            for index, (row, choice) in enumerate(zip(rows, choices, strict=True)):
                if choice is None:
                    continue
                chosen, rejected = (row["responses"][i] for i in choice)
                provenance = {
                    "method": config.method,
                    "id": row["id"],
                    "chosen_source": chosen["source"],
                    "rejected_source": rejected["source"],
                }
                if scores is not None:
                    provenance["chosen_score"] = scores[index][choice[0]]
                    provenance["rejected_score"] = scores[index][choice[1]]
                record = {
                    "prompt": row["prompt"],
                    "chosen": chosen["text"],
                    "rejected": rejected["text"],
                    "source": row.get("category"),
                    "provenance": provenance,
                }
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        counts["pairs"] = written
        metrics.update({f"{split}.{k}": v for k, v in counts.items()})
        ctx.log(0, **{f"{split}.{k}": v for k, v in counts.items()})
    if not metrics.get("train.pairs"):
        detail = ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("train."))
        raise BadInputError(f"label: no training pairs from {config.candidates} ({detail})")
    return metrics
