"""evaluate: did alignment help? Win rate of a model against a baseline on held-out prompts,
judged by a judge the model was not optimised against, beside the proxy it was; and plots
of every stage's curves.

Both models answer ``prompts/eval.jsonl`` of a data stage output with the same sampling
and seed, each asked in the data stage's template (what a model trained on that data
knows) or, with ``candidate_prompt`` / ``baseline_prompt`` ``chat``, in its own chat
template. The held-out judge (``judge_model``: a reward model trained on the data stage's
``pairs/judge.jsonl``, prompts that neither the policy's reward model nor the policy saw;
or ``judge``: an OpenAI-compatible endpoint) decides the headline win rate; the proxy
(``reward_model``: the one PPO optimised) is reported beside it, so that a policy that
games its reward model shows as a proxy win and a held-out loss. The candidate wins a
prompt when its answer scores higher (a tie counts half); each win rate comes with a 95%
bootstrap confidence interval. Writes ``report.json``, ``answers.jsonl`` and
``plots/<stage>.png`` for each stage output named in ``curves``.
"""

from __future__ import annotations

import json
import random
import time
from typing import Literal

from pydantic import Field, model_validator

from jobs.batches import literals, read_jsonl
from jobs.contract import METRICS, StageConfig, StageContext
from jobs.data.readers import Message
from jobs.data.templates import asked_turns, prompt_spans, render_prompt
from jobs.errors import BadInputError
from jobs.generation import SamplingConfig, timed_generate
from jobs.judge import JudgeConfig, judge_scores
from jobs.models import InferenceConfig, free_memory, load_causal_lm, load_tokenizer, model_source
from jobs.plots import draw_curves

CURVES = (
    "loss",
    "eval_loss",
    "accuracy",
    "eval_accuracy",
    "eval_margin",
    "reward_mean",
    "kl",
    "policy_loss",
    "value_loss",
    "entropy",
)


class Config(StageConfig):
    prompts: str = Field(description="a data stage output (reads prompts/eval.jsonl)")
    candidate: str = Field(description="the model to judge (e.g. the PPO model)")
    baseline: str = Field(description="the model to beat (e.g. the SFT model)")
    reward_model: str | None = Field(
        None,
        description="the proxy: the reward model the candidate was optimised against "
        "(reported beside the held-out judge, never the headline: reward hacking passes it)",
    )
    judge_model: str | None = Field(
        None,
        description="the held-out judge: a reward model trained on other pairs (a reward stage "
        "with train_split: judge); decides the win rate",
    )
    candidate_prompt: Literal["data", "chat"] = Field(
        "data",
        description="how the candidate is asked: 'data', the data stage's prompt (the "
        "template it was trained on); 'chat', its own tokenizer's chat template applied to "
        "the instruction",
    )
    baseline_prompt: Literal["data", "chat"] = Field(
        "data",
        description="as candidate_prompt, for the baseline: 'chat' for a model of another "
        "family or training (a released chat model) that never saw the data stage's template",
    )
    max_prompts: int | None = Field(200, ge=1)
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, max_new_tokens=64)
    judge: JudgeConfig | None = None
    inference: InferenceConfig = InferenceConfig()
    curves: dict[str, str] = Field(
        default_factory=dict, description="plot name -> stage output with metrics.jsonl"
    )

    @model_validator(mode="after")
    def _someone_judges(self) -> Config:
        if self.reward_model is None and self.judge_model is None and self.judge is None:
            raise ValueError("give judge_model (a held-out reward model), judge, or reward_model")
        return self


def answers(
    name: str, ref: str, rows: list[dict], config: Config, ctx: StageContext
) -> tuple[list[str], list[bool]]:
    """The model's answers, asked as ``{name}_prompt`` says, and whether each ended (not
    cut at ``max_new_tokens``); its generation seconds and tokens/s go in the metrics."""
    path = model_source(ctx, ref)
    tokenizer = load_tokenizer(path)
    if getattr(config, f"{name}_prompt") == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise BadInputError(
                f"{ref}: {name}_prompt 'chat' needs a tokenizer with a chat template, and "
                "this model's has none; use 'data'"
            )
        prompts, placed = [], []
        for row in rows:
            turns = asked_turns(row)
            messages = [Message(t["role"], t["content"]) for t in turns]
            prompt = render_prompt("chat", messages, tokenizer=tokenizer)
            asked = {"prompt": prompt, "messages": turns}
            # where the turns' own texts lie, placed as the data stage places them
            if (spans := prompt_spans(prompt, "chat", messages, tokenizer=tokenizer)) is not None:
                asked["message_spans"] = spans
            prompts.append(prompt)
            placed.append(literals(asked))
    else:
        prompts, placed = [row["prompt"] for row in rows], [literals(row) for row in rows]
    model = load_causal_lm(path, config.inference)
    samples, speed = timed_generate(
        model, tokenizer, prompts, config.sampling, seed=config.seed, literals=placed
    )
    ctx.log(0, **{f"{name}.{key}": value for key, value in speed.items()})
    del model
    free_memory()
    firsts = [per_prompt[0] for per_prompt in samples]
    return [s.text for s in firsts], [s.finish_reason != "length" for s in firsts]


def win_rate(
    candidate: list[float],
    baseline: list[float],
    seed: int,
    same: list[bool] | None = None,
    resamples: int = 2000,
) -> tuple[float, float, float]:
    """Share of prompts the candidate wins (ties half), with a 95% bootstrap interval over
    prompts. ``same``: the two answered alike, a tie whatever the scores (one text scored
    in two batches can get two slightly different bf16 scores)."""
    same = same or [False] * len(candidate)
    outcomes = [
        0.5 if alike or c == b else 1.0 if c > b else 0.0
        for c, b, alike in zip(candidate, baseline, same, strict=True)
    ]
    rate = sum(outcomes) / len(outcomes)
    rng = random.Random(seed)
    means = sorted(
        sum(rng.choices(outcomes, k=len(outcomes))) / len(outcomes) for _ in range(resamples)
    )
    return rate, means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def run(config: Config, ctx: StageContext) -> dict:
    from jobs.scoring import load_reward_model, score_texts

    rows = read_jsonl(
        ctx.input_dir(config.prompts) / "prompts" / "eval.jsonl", ("prompt", "instruction")
    )[: config.max_prompts]
    if not rows:
        raise BadInputError(
            f"{config.prompts}/prompts/eval.jsonl: no prompts to evaluate on (give the data "
            "stage an eval_fraction above 0)"
        )
    candidate, candidate_ended = answers("candidate", config.candidate, rows, config, ctx)
    baseline, baseline_ended = answers("baseline", config.baseline, rows, config, ctx)
    # the reward models score every answer after the data stage's prompt: the text they
    # were trained on, the same for both models
    prompts, placed = [row["prompt"] for row in rows], [literals(row) for row in rows]

    same = [c == b for c, b in zip(candidate, baseline, strict=True)]
    report: dict = {
        "prompts": len(rows),
        "same_answers": sum(same),
        # cut answers are scored as cut (no EOS appended), as PPO's reward reads them
        "candidate_cut": candidate_ended.count(False),
        "baseline_cut": baseline_ended.count(False),
    }
    scores: dict[str, tuple[list[float], list[float]]] = {}
    for name, ref in (("held_out", config.judge_model), ("proxy", config.reward_model)):
        if ref is None:
            continue
        rm_path = model_source(ctx, ref)
        reward_model = load_reward_model(rm_path, config.inference)
        tokenizer = load_tokenizer(rm_path)
        size = config.sampling.batch_size
        started = time.perf_counter()
        scores[name] = (
            score_texts(
                reward_model,
                tokenizer,
                prompts,
                candidate,
                batch_size=size,
                finished=candidate_ended,
                literals=placed,
            ),
            score_texts(
                reward_model,
                tokenizer,
                prompts,
                baseline,
                batch_size=size,
                finished=baseline_ended,
                literals=placed,
            ),
        )
        ctx.log(0, **{f"{name}.scoring_s": round(time.perf_counter() - started, 3)})
        del reward_model
        free_memory()
        rate, low, high = win_rate(*scores[name], config.seed, same)
        report[name] = {
            "reward_candidate": sum(scores[name][0]) / len(rows),
            "reward_baseline": sum(scores[name][1]) / len(rows),
            "win_rate": rate,
            "win_rate_ci95": [low, high],
        }
    if config.judge is not None:
        pairs = [
            {
                "instruction": row["instruction"],
                "category": row.get("source"),
                "responses": [{"text": c}, {"text": b}],
            }
            for row, c, b in zip(rows, candidate, baseline, strict=True)
        ]
        counts = {"unparseable": 0}
        judged_scores = judge_scores(pairs, config.judge, config.output, ctx, "evaluate", counts)
        judged = [
            (c, b, alike)
            for (c, b), alike in zip(judged_scores, same, strict=True)
            if None not in (c, b)
        ]
        if judged:
            ours, theirs, alike = (list(column) for column in zip(*judged, strict=True))
            rate, low, high = win_rate(ours, theirs, config.seed, alike)
            report["judge"] = {
                "reward_candidate": sum(c for c, _, _ in judged) / len(judged),
                "reward_baseline": sum(b for _, b, _ in judged) / len(judged),
                "win_rate": rate,
                "win_rate_ci95": [low, high],
            }
        report["judge_unparseable"] = counts["unparseable"]
    # The headline: a judge the candidate was not optimised against, where there is one.
    judged_by = next((n for n in ("held_out", "judge", "proxy") if n in report), None)
    if judged_by is None:
        raise BadInputError("evaluate: the judge scored none of the answers (all unparseable)")
    report["judged_by"] = judged_by
    report["win_rate"] = report[judged_by]["win_rate"]
    report["win_rate_ci95"] = report[judged_by]["win_rate_ci95"]

    plots = {}
    for name, uri in config.curves.items():
        local = ctx.input_dir(uri, only=[METRICS])
        records = [json.loads(line) for line in (local / METRICS).read_text().splitlines()]
        drawn, _ = draw_curves(name, records, ctx.out_dir / "plots" / f"{name}.png", CURVES)
        if drawn:
            plots[name] = {"file": f"plots/{name}.png", "curves": drawn}
    report["plots"] = plots
    (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    with open(ctx.out_dir / "answers.jsonl", "w", encoding="utf-8") as handle:
        for index, (row, c, b) in enumerate(zip(rows, candidate, baseline, strict=True)):
            record = {"instruction": row["instruction"], "candidate": c, "baseline": b}
            for name, (cs, bs) in scores.items():
                record[f"{name}_candidate_score"] = cs[index]
                record[f"{name}_baseline_score"] = bs[index]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    flat = {
        f"{name}_{key}": value
        for name in ("held_out", "judge", "proxy")
        for key, value in report.get(name, {}).items()
    }
    ctx.log(0, win_rate=report["win_rate"], **{k: v for k, v in flat.items() if "ci95" not in k})
    return {
        "prompts": len(rows),
        "judged_by": judged_by,
        "win_rate": report["win_rate"],
        "win_rate_ci95": report["win_rate_ci95"],
        **flat,
        **({"judge_unparseable": report["judge_unparseable"]} if config.judge else {}),
        "plots": ", ".join(p["file"] for p in plots.values()),
    }
