"""C-RLFT: the expert tag brings out the expert style, and the end-of-turn token stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.contract import read_manifest, run_stage
from jobs.data import stage as data
from tests.conftest import run_entrypoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crlft_data(tiny, tmp_path_factory) -> Path:
    """Two sources of one set of prompts as ShareGPT with a model field: GPT-4 answers
    kindly, GPT-3.5 rudely; through the data stage (every prompt on one side of the split)."""
    tmp_path = tmp_path_factory.mktemp("crlft-data")
    # Two sources of one set of prompts: GPT-4 answers kindly, GPT-3.5 rudely.
    rows = []
    for line in (tiny / "data" / "dialogues.jsonl").read_text().splitlines():
        d = json.loads(line)
        rows.append(
            {
                "model": "gpt-4",
                "conversations": [
                    {"from": "human", "value": d["prompt"]},
                    {"from": "gpt", "value": d["chosen"]},
                ],
            }
        )
        rows.append(
            {
                "model": "gpt-3.5-turbo",
                "conversations": [
                    {"from": "human", "value": d["prompt"]},
                    {"from": "gpt", "value": d["rejected"]},
                ],
            }
        )
    (tmp_path / "sharegpt.json").write_text(json.dumps(rows, ensure_ascii=False))
    run_stage(
        "data",
        data.Config(
            output=str(tmp_path / "data"),
            template="raw",
            dedup_threshold=None,
            eval_fraction=0.1,
            sources=[
                {
                    "name": "sharegpt",
                    "format": "sharegpt",
                    "uri": str(tmp_path / "sharegpt.json"),
                    "label_field": "model",
                }
            ],
        ),
        data.run,
        workdir=tmp_path / "w",
    )

    return tmp_path / "data"


def test_expert_tag_answers_score_higher_and_end_of_turn_ends_generation(
    tiny, tiny_rm, crlft_data, tmp_path
):
    config = {
        "output": str(tmp_path / "crlft"),
        "model": str(tiny / "model"),
        "data": str(crlft_data),
        "max_seq_len": 128,
        "max_steps": 240,
        "eval_every": 1000,
        "seed": 0,
        "train": {"learning_rate": 3e-3, "micro_batch_size": 16, "warmup_steps": 5},
    }
    result = run_entrypoint("crlft", config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_manifest(str(tmp_path / "crlft")).metrics
    assert metrics["examples.gpt-4"] > 0 and metrics["examples.gpt-3.5-turbo"] > 0
    # The schedule every supervised stage shares: an evaluation before the first step and
    # after the last, the learning rate (past its warm-up by the first log, decaying) in every
    # log line.
    lines = [json.loads(x) for x in (tmp_path / "crlft" / "metrics.jsonl").read_text().splitlines()]
    evals = [x["step"] for x in lines if "eval_loss" in x]
    rates = [x["lr"] for x in lines if "loss" in x]
    assert evals == [0, 240] and len(rates) == 24, (evals, len(rates))
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1] > 0, rates
    assert metrics["eval_loss"] < 0.5 * metrics["eval_loss_start"]

    from transformers import AutoModelForCausalLM

    from jobs.crlft import conditioned
    from jobs.generation import SamplingConfig, generate
    from jobs.models import load_tokenizer
    from jobs.scoring import load_reward_model, score_texts

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "crlft" / "model").eval()
    tokenizer = load_tokenizer(str(tmp_path / "crlft" / "model"))
    eot = metrics["end_of_turn_id"]
    assert eot in model.generation_config.eos_token_id
    prompts = [
        json.loads(x)["prompt"]
        for x in (crlft_data / "sft" / "eval.jsonl").read_text().splitlines()
    ][:24]
    sampling = SamplingConfig(do_sample=False, max_new_tokens=60)
    by_tag = {}
    for tag in ("GPT4", "GPT3"):
        conditioned_prompts = [conditioned(p, tag, "<|end_of_turn|>") for p in prompts]
        samples = [s[0] for s in generate(model, tokenizer, conditioned_prompts, sampling)]
        assert sum(s.finish_reason == "eos" for s in samples) >= 0.8 * len(samples)
        assert all(eot not in s.tokens for s in samples)
        by_tag[tag] = [s.text for s in samples]

    reward_model = load_reward_model(str(tiny_rm / "model"))
    rm_tokenizer = load_tokenizer(str(tiny_rm / "model"))
    expert = score_texts(reward_model, rm_tokenizer, prompts, by_tag["GPT4"])
    suboptimal = score_texts(reward_model, rm_tokenizer, prompts, by_tag["GPT3"])
    # 240 steps: at 120 the GPT3 tag (weight 0.1) had not yet learned its style, and the
    # two tags answered alike, the comparison a coin's
    assert sum(expert) / len(expert) > sum(suboptimal) / len(suboptimal) + 0.1, by_tag


def answer_logp(model, tokenizer, config, row: dict) -> float:
    """Mean log-prob per token of a row's answer, laid out as crlft trains it."""
    from jobs.crlft import prepare
    from jobs.supervised import collate, token_losses

    [(ids, labels, _, _)] = prepare([row], config, tokenizer, "eval")
    with torch.no_grad():
        losses, mask = token_losses(model, collate([(ids, labels)], tokenizer.pad_token_id))
    return float(-(losses * mask).sum() / mask.sum())


def test_the_class_weights_decide_which_answers_are_learnt(tiny, crlft_data, tmp_path):
    """Both classes under one tag, so that only their weights tell them apart: with the kind
    answers weighted 1.0 and the rude 0.1 the model learns the kind ones, and with the
    weights swapped the rude ones (equal weights could not pass both)."""
    from transformers import AutoModelForCausalLM

    from jobs import crlft
    from jobs.models import load_tokenizer

    eval_rows = [
        json.loads(x) for x in (crlft_data / "sft" / "eval.jsonl").read_text().splitlines()
    ]
    by_prompt: dict[str, dict[str, dict]] = {}
    for row in eval_rows:
        by_prompt.setdefault(row["prompt"], {})[row["label"]] = row
    pairs = [p for p in by_prompt.values() if len(p) == 2][:24]
    assert len(pairs) >= 12

    margins = {}
    for name, (kind, rude) in {"kind": (1.0, 0.1), "rude": (0.1, 1.0)}.items():
        classes = {
            "gpt-4": {"tag": "Bot", "weight": kind},
            "gpt-3.5-turbo": {"tag": "Bot", "weight": rude},
        }
        config = {
            "output": str(tmp_path / name),
            "model": str(tiny / "model"),
            "data": str(crlft_data),
            "classes": classes,
            "max_seq_len": 96,
            "max_steps": 40,
            "eval_every": 1000,
            "seed": 0,
            "train": {"learning_rate": 3e-3, "micro_batch_size": 16, "warmup_steps": 5},
        }
        result = run_entrypoint("crlft", config, tmp_path, name=name)
        assert result.returncode == 0, result.stderr[-3000:]
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").eval()
        tokenizer = load_tokenizer(str(tmp_path / name / "model"))
        settings = crlft.Config(**config)
        margins[name] = sum(
            answer_logp(model, tokenizer, settings, pair["gpt-4"])
            - answer_logp(model, tokenizer, settings, pair["gpt-3.5-turbo"])
            for pair in pairs
        ) / len(pairs)
    assert margins["kind"] > 0 > margins["rude"], margins
