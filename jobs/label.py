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

import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from jobs.batches import literals, placement, read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.errors import BadInputError
from jobs.judge import JudgeConfig, judge_scores
from jobs.models import InferenceConfig, free_memory, load_tokenizer, model_source

SPLITS = ("train", "eval")


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


# --- reward model, source rule, human labels -------------------------------------------------


def check_responses(row: dict, where: str) -> None:
    """A candidates row's answers: a list of objects with text and source (the generate
    stage's output, or a user's in its shape)."""
    responses = row.get("responses")
    if not isinstance(responses, list):
        raise BadInputError(f"{where}: field 'responses' missing or not a list of answers")
    for index, response in enumerate(responses):
        for name in ("text", "source"):
            if not isinstance(response, dict) or not isinstance(response.get(name), str):
                raise BadInputError(
                    f"{where}: field 'responses[{index}].{name}' missing or not text"
                )


def reward_model_scores(rows: list[dict], config: Config, ctx: StageContext):
    from jobs.scoring import load_reward_model, score_texts

    path = model_source(ctx, config.reward_model)
    model, tokenizer = load_reward_model(path, config.inference), load_tokenizer(path)
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    placed = [literals(row) for row in rows for _ in row["responses"]]
    texts = [r["text"] for row in rows for r in row["responses"]]
    # an answer cut at the token limit is read as cut, not as finished (it would otherwise
    # get the EOS of a finished one and, often, the score): the reward PPO would give it
    finished = [r.get("finish_reason") != "length" for row in rows for r in row["responses"]]
    flat = iter(
        score_texts(
            model,
            tokenizer,
            prompts,
            texts,
            batch_size=config.batch_size,
            finished=finished,
            literals=placed,
        )
    )
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
    """(where, row) of a human label file: JSONL, JSON, CSV with a header line (a
    spreadsheet's export: its byte-order mark and CRLF too) or Parquet."""
    from jobs.data.readers import rows_from_file

    return [(row.where, row.data) for row in rows_from_file(path, display)]


def human_choices(rows: list[dict], labels: list[tuple[str, dict]]) -> dict[str, tuple[int, int]]:
    """prompt id -> (chosen index, rejected index); a bad row is an error naming it."""
    by_id = {row["id"]: row for row in rows}
    out: dict[str, tuple[int, int]] = {}
    first: dict[str, str] = {}
    for where, label in labels:
        for field in ("id", "chosen", "rejected"):
            if label.get(field) in (None, ""):
                raise BadInputError(f"{where}: field {field!r} is missing")
        if str(label["id"]) in first:  # which of two labels holds is not ours to guess
            raise BadInputError(
                f"{where}: field 'id': {label['id']} is labelled already at "
                f"{first[str(label['id'])]}"
            )
        first[str(label["id"])] = where
        row = by_id.get(str(label["id"]))
        if row is None:
            continue  # a label for a prompt of the other split
        picks = []
        for field in ("chosen", "rejected"):
            try:  # 1.0 too: a spreadsheet's or pandas' export of a number column
                number: float | None = float(str(label[field]).strip())
            except ValueError:
                number = None
            if number is None or not number.is_integer():
                raise BadInputError(
                    f"{where}: field {field!r}: {label[field]!r} is not a response index"
                )
            index = int(number)
            if not 0 <= index < len(row["responses"]):
                raise BadInputError(
                    f"{where}: field {field!r}: {index} is not a response index "
                    f"of {row['id']} (it has {len(row['responses'])})"
                )
            picks.append(index)
        out[row["id"]] = (picks[0], picks[1])
    return out


# --- the stage -------------------------------------------------------------------------------


def pick(
    row: dict, scores: list[float | None], margin: float, counts: dict[str, int], seed: int = 0
):
    """(chosen, rejected) indices by score; None for a tie or too few scored responses.
    Among responses tied for best (or worst), one drawn by a generator seeded with the
    prompt: judges give whole numbers, so ties are common, and taking the first or last
    would favour the source listed first or last."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        counts["too_few_scored"] += 1
        return None
    rng = random.Random(f"{seed}:{row['id']}")
    top, bottom = max(scored)[0], min(scored)[0]
    best = rng.choice([x for x in scored if x[0] == top])
    worst = rng.choice([x for x in scored if x[0] == bottom])
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
    known: set[str] = set()  # the prompt ids of every split
    for split in SPLITS:
        path = candidates / "candidates" / f"{split}.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl(path, ("id", "prompt", "instruction"), check_responses)
        known |= {row["id"] for row in rows}
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
                pick(row, s, config.tie_margin, counts, config.seed)
                for row, s in zip(rows, scores, strict=True)
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
                    **placement(row),
                }
                if "end" in row:  # for DPO, as the data stage's pairs carry it
                    record["end"] = row["end"]
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        counts["pairs"] = written
        metrics.update({f"{split}.{k}": v for k, v in counts.items()})
        ctx.log(0, **{f"{split}.{k}": v for k, v in counts.items()})
    if labels is not None:  # a typo'd id would otherwise only show as an unlabelled prompt
        for where, row in labels:
            if str(row["id"]) not in known:
                like = f" (its ids look like {min(known)!r})" if known else ""
                raise BadInputError(
                    f"{where}: field 'id': {row['id']!r} is no prompt of {config.candidates}{like}"
                )
    if not metrics.get("train.pairs"):
        detail = ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("train."))
        raise BadInputError(f"label: no training pairs from {config.candidates} ({detail})")
    return metrics
