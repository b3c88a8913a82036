"""generate: K responses per prompt from one or more sources (seed: RM v1/v2).

Reads ``prompts/{train,eval}.jsonl`` of a data stage output. A source is a model (a
stage output folder or a Hugging Face id: batched, left-padded, KV-cached sampling that
stops at EOS) or an OpenAI-compatible chat endpoint (given the plain instruction; its
answers are cached so a restart never asks twice). Writes
``candidates/{train,eval}.jsonl``: each prompt with its responses, each response with the
source that produced it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.batches import literals, placement, read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.data.templates import asked_turns
from jobs.endpoint import Ask, Cache, ChatClient, EndpointConfig
from jobs.errors import BadInputError
from jobs.generation import SamplingConfig, timed_generate
from jobs.models import (
    InferenceConfig,
    free_memory,
    load_causal_lm,
    load_tokenizer,
    model_source,
)

SPLITS = ("train", "eval")


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="how responses of this source are labelled (e.g. sft, gpt4)")
    model: str | None = Field(None, description="a stage output folder or Hugging Face id")
    revision: str | None = None
    endpoint: EndpointConfig | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SourceConfig:
        if (self.model is None) == (self.endpoint is None):
            raise ValueError("give exactly one of 'model' and 'endpoint'")
        return self


class Config(StageConfig):
    prompts: str = Field(description="a data stage output (reads prompts/{train,eval}.jsonl)")
    sources: list[SourceConfig] = Field(min_length=1)
    samples_per_source: int = Field(1, ge=1, description="K responses per prompt and source")
    max_prompts: int | None = Field(None, ge=1, description="per split")
    sampling: SamplingConfig = SamplingConfig()
    inference: InferenceConfig = InferenceConfig()


def from_model(
    source: SourceConfig, rows: list[dict], config: Config, ctx: StageContext, split: str
):
    path = model_source(ctx, source.model, source.revision)
    tokenizer = load_tokenizer(path, source.revision)
    model = load_causal_lm(path, config.inference, source.revision)
    samples, speed = timed_generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        config.sampling,
        num_samples=config.samples_per_source,
        seed=config.seed,
        literals=[literals(r) for r in rows],
    )
    ctx.log(0, **{f"{split}.{source.name}.{key}": value for key, value in speed.items()})
    del model
    free_memory()
    return [
        [
            {"text": s.text, "finish_reason": s.finish_reason, "tokens": len(s.tokens)}
            for s in per_prompt
        ]
        for per_prompt in samples
    ]


def from_endpoint(
    source: SourceConfig, rows: list[dict], config: Config, ctx: StageContext, split: str
):
    endpoint = source.endpoint
    client = ChatClient(endpoint)
    cache = Cache(
        config.output,
        f"generate-{source.name}-{split}",
        ctx.workdir / "cache" / f"{source.name}-{split}.jsonl",
    )

    asks = [
        Ask(asked_turns(row), tag=str(sample), where=f"prompts/{split}.jsonl:{index + 1}")
        for index, row in enumerate(rows)
        for sample in range(config.samples_per_source)
    ]
    answers = [
        {"text": got["text"].strip(), "finish_reason": got["finish_reason"], "tokens": None}
        for got in client.ask_all(asks, cache, stop=lambda: ctx.stop_requested)
    ]
    k = config.samples_per_source
    return [answers[i * k : (i + 1) * k] for i in range(len(rows))]


def run(config: Config, ctx: StageContext) -> dict:
    names = [s.name for s in config.sources]
    if len(set(names)) != len(names):
        raise BadInputError("generate: sources: every source needs a distinct 'name'")
    data_dir = ctx.input_dir(config.prompts)
    counts: dict[str, Any] = {}
    for split in SPLITS:
        path = data_dir / "prompts" / f"{split}.jsonl"
        if not path.is_file():
            continue
        rows = read_jsonl(path, ("prompt", "instruction"))[: config.max_prompts]
        responses: list[list[dict]] = [[] for _ in rows]
        for source in config.sources:
            if source.model is not None:
                got = from_model(source, rows, config, ctx, split)
            else:
                got = from_endpoint(source, rows, config, ctx, split)
            for index, samples in enumerate(got):
                responses[index] += [{"source": source.name, **s} for s in samples]
            eos = sum(s["finish_reason"] in {"eos", "stop"} for per in got for s in per)
            counts[f"{split}.{source.name}.ended"] = eos
            ctx.log(0, **{f"{split}.{source.name}.responses": sum(len(p) for p in got)})
        out = ctx.out_dir / "candidates" / f"{split}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as handle:
            for index, (row, answers) in enumerate(zip(rows, responses, strict=True)):
                record = {
                    "id": f"{split}-{index}",
                    "prompt": row["prompt"],
                    "instruction": row["instruction"],
                    "category": row.get("source"),
                    "responses": answers,
                    **placement(row),
                }
                if "end" in row:  # how the chat template closes an answer: label's pairs keep it
                    record["end"] = row["end"]
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[f"{split}.prompts"] = len(rows)
    if not any(key.endswith(".prompts") for key in counts):
        raise BadInputError(f"{config.prompts}: no prompts/train.jsonl or prompts/eval.jsonl")
    return counts
