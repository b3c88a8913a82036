"""data: build the stage-specific data sets (seed: VAIV Task 1).

Read every source, drop short examples and near-duplicates, mix by ratio,
apply the prompt template, split train/eval by prompt (all examples of one prompt, from
any source, on one side; optionally a third, ``judge`` share for a held-out judge), and
write:

- ``sft/{train,eval}.jsonl``: prompt (templated) and response, the whole conversation as
  ``messages``, and under the ``chat`` template its ``segments`` (every assistant turn
  trained), for SFT and C-RLFT;
- ``pairs/{train,eval}.jsonl``: prompt, chosen and rejected, for reward models and DPO;
- ``prompts/{train,eval}.jsonl``: each distinct prompt once, for PPO and GRPO rollouts and
  evaluation: templated (``prompt``), as one text (``instruction``, for judges) and as
  its turns (``messages``, for chat endpoints and chat templates), with the reference
  ``answer`` where the source has one, for verifiable rewards.

Rows also carry ``message_spans`` (unless the template rewrote a message): where their
messages' own texts lie in the prompt (or the segments), in which a training stage reads a
special token's text as text (:func:`jobs.data.templates.message_spans`).

The manifest counts, per source, what was read, kept and dropped by each filter, and the
prompts shared between sources (``cross_source_prompts``; each source's ``shared_prompts``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from collections.abc import Iterator
from itertools import islice
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jobs import dist
from jobs.contract import StageConfig, StageContext
from jobs.data.filters import near_duplicates
from jobs.data.readers import READERS, Example, Row, read_examples, rows_from_file, rows_from_hub
from jobs.data.templates import (
    answer_end,
    chat_segments,
    check_template,
    conversation,
    conversation_spans,
    flatten,
    prompt_spans,
    prompt_turns,
    render_prompt,
)
from jobs.errors import BadInputError
from jobs.models import load_tokenizer, model_source

Output = Literal["sft", "pairs", "prompts"]
DEFAULT_OUTPUTS: dict[str, list[Output]] = {
    "alpaca": ["sft", "prompts"],
    "sharegpt": ["sft", "prompts"],
    "pairs": ["pairs", "prompts"],
    "hh": ["pairs", "prompts"],
}


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a label for counts and for the example's source")
    format: Literal["alpaca", "pairs", "hh", "sharegpt"]
    uri: str | None = Field(
        None,
        description="JSONL/JSON/Parquet file: a path, s3:// URI, or a "
        "file inside a finished stage output",
    )
    hub: str | None = Field(None, description="a Hugging Face data set id, instead of uri")
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    ratio: float | None = Field(None, gt=0, description="mixing weight among sources with one")
    max_rows: int | None = Field(None, ge=1)
    label: str | None = Field(None, description="class of every example (C-RLFT)")
    label_field: str | None = Field(None, description="ShareGPT: the row field naming the class")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="the format's field -> this data set's column, e.g. {output: response}",
    )
    outputs: list[Output] | None = None

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if (self.uri is None) == (self.hub is None):
            raise ValueError("give exactly one of 'uri' and 'hub'")
        if self.label_field and self.format != "sharegpt":
            raise ValueError("'label_field' applies to the sharegpt format only")
        if "pairs" in (self.outputs or []) and self.format in ("alpaca", "sharegpt"):
            raise ValueError(
                f"the {self.format} format has one answer per prompt, and 'pairs' needs a "
                "chosen and a rejected one: use the pairs or hh format"
            )
        return self

    def wanted_outputs(self) -> list[Output]:
        return self.outputs or DEFAULT_OUTPUTS[self.format]


class Config(StageConfig):
    sources: list[SourceConfig] = Field(min_length=1)
    template: str = Field(
        "kullm", description="kullm | alpaca | chat | raw | a string with {prompt}"
    )
    tokenizer: str | None = Field(
        None, description="model dir or Hub id whose tokenizer counts tokens (and chat template)"
    )
    min_tokens: int = Field(15, ge=0, description="drop examples of this many tokens or fewer")
    dedup_threshold: float | None = Field(
        0.5, gt=0, le=1, description="drop near-duplicates at cosine >= this"
    )
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    judge_fraction: float = Field(
        0,
        ge=0,
        lt=1,
        description="share of prompts held out of train and eval, written as */judge.jsonl: "
        "the pairs on which a judge reward model is trained (evaluate's held-out judge)",
    )
    max_examples: int | None = Field(
        None,
        ge=1,
        description="cap on the total of the sources mixed by ratio (sources without a ratio "
        "are taken whole)",
    )

    _known_template = field_validator("template")(check_template)

    @model_validator(mode="after")
    def _cap_needs_a_mix(self) -> Config:
        if self.max_examples is not None and all(s.ratio is None for s in self.sources):
            raise ValueError(
                "max_examples caps the mix of the sources that have a ratio, and none has "
                "one: give the sources ratios (e.g. ratio: 1 each)"
            )
        return self


def read_source(source: SourceConfig, ctx: StageContext) -> Iterator[Example]:
    options = {"label_field": source.label_field} if source.format == "sharegpt" else {}
    if source.hub is not None:
        ctx.input_hub(source.hub, source.revision)
        rows = rows_from_hub(
            source.hub, source.subset, source.split, source.revision, source.max_rows is not None
        )
    else:
        rows = rows_from_file(ctx.input_file(source.uri), source.uri)
    if source.columns:
        rows = (
            Row(
                row.where,
                {
                    **row.data,
                    **{ours: row.data.get(theirs) for ours, theirs in source.columns.items()},
                },
                source.columns,
            )
            for row in rows
        )
    # the cap stops the reading itself: not one row past it is read (or, streamed, fetched)
    examples = islice(read_examples(rows, source.format, source.name, **options), source.max_rows)
    for example in examples:
        if source.label is not None and example.label is None:
            example.label = source.label
        yield example


def token_counter(config: Config, ctx: StageContext):
    if config.tokenizer is None:
        return None, lambda text: len(text.split())
    tokenizer = load_tokenizer(model_source(ctx, config.tokenizer))
    return tokenizer, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


# What the manifest counts per source, from what was read to what each filter dropped.
COUNTS = (
    "read",
    "dropped_empty",
    "dropped_short",
    "dropped_same_pair",
    "dropped_duplicate",
    "dropped_mix",
)


def mix(
    groups: dict[str, list[Example]],
    sources: list[SourceConfig],
    rng: random.Random,
    max_examples: int | None,
) -> dict[str, list[Example]]:
    """Sample the sources that have a ratio in exactly those proportions, as many as they allow."""
    weighted = {s.name: s.ratio for s in sources if s.ratio is not None}
    chosen = {name: rows for name, rows in groups.items() if name not in weighted}
    if weighted:
        if empty := [name for name in weighted if not groups[name]]:
            raise BadInputError(
                f"data: source {empty[0]!r} has a ratio and no examples left after filtering, "
                "so the mix would take none of any source with a ratio; check its rows, "
                "min_tokens and dedup_threshold, or remove its ratio"
            )
        total_weight = sum(weighted.values())
        shares = {name: weight / total_weight for name, weight in weighted.items()}
        total = min(len(groups[name]) / share for name, share in shares.items())
        if max_examples is not None:
            total = min(total, max_examples)
        for name, share in shares.items():
            rows = list(groups[name])
            rng.shuffle(rows)
            chosen[name] = rows[: int(round(share * total))]
    return chosen


def record(
    example: Example,
    output: Output,
    prompt: str,
    spans: list[list[int]] | None,
    tokenizer,
    template: str,
) -> dict | None:
    """The example's row for ``output``; ``spans``: where its messages lie in ``prompt``
    (:func:`prompt_spans`, once per example whatever its outputs)."""
    chat = template == "chat"
    base = {"prompt": prompt, "source": example.source}
    if example.label is not None:
        base["label"] = example.label
    if output == "sft":
        response = example.response if example.response is not None else example.chosen
        if response is None:
            return None
        turns = conversation(example.messages, response, example.context)
        row = {**base, "response": response, "messages": turns}
        if chat:  # spans in the whole conversation's segments, not in the prompt
            row["segments"] = chat_segments(tokenizer, turns)
            spans = conversation_spans(row["segments"], turns, tokenizer)
        return placed(row, spans)
    base = placed(base, spans)
    if output == "pairs":
        if example.chosen is None or example.rejected is None:
            return None
        row = {**base, "chosen": example.chosen, "rejected": example.rejected}
        if chat:  # how the template closes an answer, for DPO to end the pair's answers with
            row["end"] = answer_end(tokenizer, prompt_turns(example.messages, example.context))
        return row
    if example.response is not None:  # the reference answer, for verifiable rewards (grpo)
        base["answer"] = example.response
    # the whole question for a judge: an Alpaca input belongs to it
    instruction = flatten(example.messages)
    if example.context:
        instruction = f"{instruction}\n\n{example.context}"
    # and its turns, for a chat endpoint or a model asked in its own chat template
    turns = prompt_turns(example.messages, example.context)
    row = {**base, "instruction": instruction, "messages": turns}
    if chat:  # how the template closes an answer: pairs labelled from answers to it keep it
        row["end"] = answer_end(tokenizer, turns)
    return row


def placed(row: dict, spans: list[list[int]] | None) -> dict:
    """The row with where its messages' own texts lie in its text (its segments', else its
    prompt's): a training stage reads special-token text there as text."""
    return row if spans is None else {**row, "message_spans": spans}


def asked_text(example: Example) -> str:
    """What was asked: the conversation before the answer and the input, without a system
    prompt (one source's "You are a helpful assistant." does not make its question another,
    nor does a long system prompt shared by every row make the rows alike)."""
    asked = [m for m in example.messages if m.role != "system"]
    return flatten(asked) + "\n" + (example.context or "")


def prompt_key(example: Example) -> str:
    """What makes two examples the same prompt: what was asked, compared without case and
    spacing differences."""
    return " ".join(asked_text(example).casefold().split())


def opening_key(example: Example) -> str:
    """What the split keeps on one side: a conversation's opening (its first turn after
    any system prompt, and the input), compared as :func:`prompt_key` compares. Two
    conversations that open alike and go on differently share their first exchange, and
    under a chat template every assistant turn is trained: split apart, the eval one's
    first answer would be trained on the train side. A one-turn example's opening is its
    prompt."""
    asked = [m for m in example.messages if m.role != "system"][:1]
    opening = flatten(asked) + "\n" + (example.context or "")
    return " ".join(opening.casefold().split())


def split_point(seed: int, key: str) -> float:
    """A prompt's place in [0, 1) for the split: a hash of the prompt alone, so its side
    does not move when rows are reordered or other rows come and go (a re-run on a grown
    data set keeps the earlier eval prompts out of training)."""
    return int(hashlib.sha256(f"{seed}\n{key}".encode()).hexdigest()[:15], 16) / 16**15


def split_prompts(keys: list[str], config: Config) -> dict[str, list[str]]:
    """Each prompt's side by where its point falls: below eval_fraction eval, then
    judge_fraction judge, the rest train. The shares are the fractions up to chance (a
    binomial count); a share asked for is at least one prompt (5% of 9 is not none)."""
    placed = sorted((split_point(config.seed, key), key) for key in keys)
    points, ranked = [point for point, _ in placed], [key for _, key in placed]
    eval_end = bisect.bisect_left(points, config.eval_fraction)
    judge_end = bisect.bisect_left(points, config.eval_fraction + config.judge_fraction)
    eval_end = max(eval_end, int(config.eval_fraction > 0))
    judge_end = max(judge_end, eval_end + int(config.judge_fraction > 0))
    if judge_end >= len(ranked):
        raise BadInputError(
            f"data: eval_fraction {config.eval_fraction} and judge_fraction "
            f"{config.judge_fraction} leave none of the {len(keys)} prompts for training"
        )
    return {
        "eval": ranked[:eval_end],
        "judge": ranked[eval_end:judge_end],
        "train": ranked[judge_end:],
    }


def run(config: Config, ctx: StageContext) -> dict:
    rng = random.Random(config.seed)
    tokenizer, n_tokens = token_counter(config, ctx)
    counts: dict[str, dict[str, int]] = {}
    groups: dict[str, list[Example]] = {}
    names = [s.name for s in config.sources]
    if len(set(names)) != len(names):
        raise BadInputError("data: sources: every source needs a distinct 'name'")

    # Read and drop the short ones.
    for source in config.sources:
        kept, c = [], dict.fromkeys(COUNTS, 0)
        for example in read_source(source, ctx):
            c["read"] += 1
            if any(not output.strip() for output in example.outputs):
                # an answer left empty (HH dialogues that end on "Assistant:", a ShareGPT
                # turn with no text): nothing to train towards
                c["dropped_empty"] += 1
                continue
            if example.chosen is not None and example.chosen == example.rejected:
                # no preference to learn (HH-RLHF has such pairs): a reward model's accuracy
                # on them is a coin's
                c["dropped_same_pair"] += 1
                continue
            shortest = min(example.outputs, key=len, default="")
            if n_tokens(asked_text(example) + "\n" + shortest) <= config.min_tokens:
                c["dropped_short"] += 1
                continue
            kept.append(example)
        if c["read"] == 0:
            raise BadInputError(
                f"data: source {source.name!r} ({source.uri or source.hub}) has no rows"
            )
        groups[source.name], counts[source.name] = kept, c
        ctx.log(0, **{f"{source.name}.read": c["read"], f"{source.name}.short": c["dropped_short"]})

    # Near-duplicates, greedy in source order, among sources that feed the same outputs (a
    # preference pair that shares its prompt with an SFT example is no duplicate of it).
    if config.dedup_threshold is not None:
        families: dict[tuple[str, ...], list[str]] = {}
        for source in config.sources:
            families.setdefault(tuple(sorted(source.wanted_outputs())), []).append(source.name)
        for family in families.values():
            flat = [(name, ex) for name in family for ex in groups[name]]
            texts = [
                asked_text(ex) + "\n" + (ex.outputs[0] if ex.outputs else "") for _, ex in flat
            ]
            dropped = near_duplicates(texts, config.dedup_threshold, seed=config.seed)
            for name in family:
                groups[name] = []
            for (name, example), is_dup in zip(flat, dropped, strict=True):
                if is_dup:
                    counts[name]["dropped_duplicate"] += 1
                else:
                    groups[name].append(example)

    mixed = mix(groups, config.sources, rng, config.max_examples)
    for name, rows in mixed.items():
        counts[name]["dropped_mix"] = len(groups[name]) - len(rows)
        counts[name]["kept"] = len(rows)
    total = sum(len(rows) for rows in mixed.values())
    if total == 0:
        detail = "; ".join(
            f"{n}: read {c['read']}, short {c['dropped_short']}, duplicate {c['dropped_duplicate']}"
            for n, c in counts.items()
        )
        raise BadInputError(
            f"data: no examples left after filtering ({detail}); "
            "check min_tokens and dedup_threshold"
        )

    # Split by prompt: every example of one prompt, from whichever source (an SFT answer
    # and a preference pair often share theirs), lands on the same side, so no evaluation
    # prompt was trained on by an earlier stage; and every conversation that opens with it.
    wanted = {s.name: s.wanted_outputs() for s in config.sources}
    examples = [ex for name in names for ex in mixed[name]]
    rng.shuffle(examples)
    by_opening: dict[str, list[Example]] = {}
    for example in examples:
        by_opening.setdefault(opening_key(example), []).append(example)
    sides = split_prompts(list(by_opening), config)
    splits = {side: [ex for key in keys for ex in by_opening[key]] for side, keys in sides.items()}
    shared = [group for group in by_opening.values() if len({ex.source for ex in group}) > 1]
    for name in names:
        counts[name]["shared_prompts"] = sum(
            1 for group in shared if any(ex.source == name for ex in group)
        )
    written: dict[str, int] = {}
    unplaced = 0  # rows whose template rewrote a message: their messages are sought instead
    for split, rows in splits.items():
        files: dict[str, list[dict]] = {}
        asked: set[str] = set()  # a prompt is asked once per split, whatever its sources
        for example in rows:
            try:
                prompt = render_prompt(
                    config.template, example.messages, example.context, tokenizer
                )
                spans = prompt_spans(
                    prompt, config.template, example.messages, example.context, tokenizer
                )
            except Exception as exc:  # noqa: BLE001 - ValueError, a chat template's TemplateError
                raise BadInputError(
                    f"{example.where}: template {config.template!r}: {exc}"
                ) from None
            for output in wanted[example.source]:
                if output == "prompts":
                    if prompt_key(example) in asked:
                        continue
                    asked.add(prompt_key(example))
                try:
                    row = record(example, output, prompt, spans, tokenizer, config.template)
                except Exception as exc:  # noqa: BLE001 - as above
                    where = f"{example.where}: template {config.template!r}"
                    raise BadInputError(f"{where}: {exc}") from None
                if row is not None:
                    files.setdefault(output, []).append(row)
                    unplaced += "message_spans" not in row
        for output, out_rows in files.items():
            path = ctx.out_dir / output / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                for row in out_rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            written[f"{output}.{split}"] = len(out_rows)
    if not written:
        raise BadInputError(
            "data: no rows for any output: "
            + "; ".join(f"{s.name} ({s.format}) feeds {s.wanted_outputs()}" for s in config.sources)
            + " (an alpaca or sharegpt source has no pairs)"
        )
    ctx.log(1, kept=total, **written)
    if unplaced:
        dist.say_once(
            f"data: template {config.template!r} rewrites the messages of {unplaced} rows, so "
            "where their texts lie is not known: a special token's text in them is read as "
            "text only where it is found by searching (message_spans absent)"
        )
    return {
        "kept": total,
        "rows": written,
        "sources": counts,
        "cross_source_prompts": len(shared),
        "eval_prompts": len({prompt_key(ex) for ex in splits["eval"]}),
        "judge_prompts": len({prompt_key(ex) for ex in splits["judge"]}),
        "rows_without_message_spans": unplaced,
    }


__all__ = ["Config", "run", "READERS"]
