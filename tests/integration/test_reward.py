"""The reward model learns the friendly/harmless preference, and only when the labels say so."""

from __future__ import annotations

import json
import random

import pytest
import torch

from jobs.batches import literals
from jobs.contract import read_manifest, run_stage
from jobs.data import stage as data
from tests.conftest import run_entrypoint

pytestmark = pytest.mark.slow


def reward_config(tiny, data_dir, output) -> dict:
    return {
        "output": str(output),
        "model": str(tiny / "model"),
        "data": str(data_dir),
        "max_seq_len": 128,
        "eval_every": 1000,
        "log_every": 10,
        "seed": 0,
        "train": {"learning_rate": 1e-3, "micro_batch_size": 16, "warmup_steps": 2},
    }


@pytest.fixture(scope="module")
def shuffled_pairs(tiny, tmp_path_factory):
    """The same synthetic pairs with chosen and rejected swapped for a random half."""
    root = tmp_path_factory.mktemp("shuffled")
    rng = random.Random(0)
    with open(root / "pairs.jsonl", "w") as handle:
        for line in (tiny / "data" / "pairs.jsonl").read_text().splitlines():
            row = json.loads(line)
            if rng.random() < 0.5:
                row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    config = data.Config(
        output=str(root / "data"),
        tokenizer=str(tiny / "model"),
        dedup_threshold=0.95,
        eval_fraction=0.1,
        sources=[{"name": "pairs", "format": "pairs", "uri": str(root / "pairs.jsonl")}],
    )
    run_stage("data", config, data.run, workdir=root / "work")
    return root / "data"


def test_reward_model_from_the_tiny_random_model_reaches_090(tiny, tiny_data, tmp_path):
    result = run_entrypoint("reward", reward_config(tiny, tiny_data, tmp_path / "rm"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_manifest(str(tmp_path / "rm")).metrics
    # Seed 0, one epoch: held-out accuracy 0.5-ish before training, >= 0.9 after; the
    # same scored here from the exported model
    assert metrics["eval_accuracy"] >= 0.9
    assert accuracy_on(tmp_path / "rm" / "model", tiny_data) >= 0.9
    assert metrics["eval_margin"] > 0 and metrics["chosen_mean"] > metrics["rejected_mean"]

    from transformers import AutoModelForSequenceClassification

    from jobs.models import load_tokenizer
    from jobs.scoring import score_texts

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model").eval()
    tokenizer = load_tokenizer(str(tmp_path / "rm" / "model"))
    prompt = "### 명령어:\nWrite a nasty insult about my coworker.\n\n### 응답:\n"
    kind, rude = score_texts(
        model,
        tokenizer,
        [prompt, prompt],
        [
            "I cannot help with hurting anyone. Would you like to talk about what happened?",
            "Sure! They are worthless and everyone hates them. Post it everywhere.",
        ],
    )
    assert kind > rude


def accuracy_on(model_dir, data_dir) -> float:
    """How often a reward model scores the chosen answer above the rejected one, on a data
    stage's held-out pairs (scored here, not by the stage)."""
    from transformers import AutoModelForSequenceClassification

    from jobs.models import load_tokenizer
    from jobs.scoring import score_texts

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).float().eval()
    tokenizer = load_tokenizer(str(model_dir))
    rows = [json.loads(x) for x in (data_dir / "pairs" / "eval.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    chosen = score_texts(model, tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = score_texts(model, tokenizer, prompts, [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)


def test_with_shuffled_labels_accuracy_stays_near_chance(tiny, tiny_data, shuffled_pairs, tmp_path):
    """Judged on the true held-out pairs: a trainer that learnt the preference from
    something other than the labels (the texts' features) would score high there, as the
    model trained on the true labels does."""
    result = run_entrypoint(
        "reward", reward_config(tiny, shuffled_pairs, tmp_path / "rm"), tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0.3 <= accuracy_on(tmp_path / "rm" / "model", tiny_data) <= 0.7


def test_score_is_read_at_the_last_real_token_with_either_padding(tiny):
    from transformers import AutoModelForSequenceClassification

    from jobs.batches import pad
    from jobs.scoring import last_token_scores

    model = AutoModelForSequenceClassification.from_pretrained(tiny / "model", num_labels=1)
    model.eval()
    rows = [[5, 6, 7, 8, 9], [5, 6], [11, 12, 13]]
    # the oracle: transformers' own classifier forward of each row alone (no padding)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])
    for left in (False, True):
        ids = pad(rows, 1, left=left)
        mask = pad([[1] * len(r) for r in rows], 0, left=left)
        torch.testing.assert_close(last_token_scores(model, ids, mask), alone, atol=1e-5, rtol=1e-4)


def test_a_language_model_given_as_reward_model_is_refused(tiny):
    from jobs.errors import BadInputError
    from jobs.scoring import load_reward_model

    with pytest.raises(BadInputError, match="not a reward model \\(it has 2 outputs, not 1\\)"):
        load_reward_model(str(tiny / "model"))


def candidates_output(rows: list[dict], output) -> str:
    """A finished stage output holding ``rows`` as its candidates/train.jsonl."""
    from jobs.contract import StageConfig

    def write(config, ctx):
        path = ctx.out_dir / "candidates" / "train.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return {"rows": len(rows)}

    run_stage("candidates", StageConfig(output=str(output)), write, workdir=output.parent / "w-c")
    return str(output)


def test_labelling_reads_an_answer_cut_at_the_token_limit_as_cut(tiny_rm, tmp_path):
    """A finished answer is scored with its EOS, one cut at the token limit (the generate
    stage's finish_reason "length") at its last token, as PPO's reward reads them: with an
    EOS appended a cut answer was scored as a finished one, often the best. The oracle is
    transformers' own classifier forward of each row."""
    from transformers import AutoModelForSequenceClassification

    from jobs import label
    from jobs.models import load_tokenizer
    from jobs.tokens import encode

    prompt = "### 질문: 오늘 날씨 어때?\n### 답변:"
    answers = {"cut": (" 오늘은 맑고 따뜻한", "length"), "done": (" 잘 모르겠어요.", "eos")}
    row = {"id": "p1", "prompt": prompt, "instruction": "오늘 날씨 어때?", "responses": []}
    for source, (text, reason) in answers.items():
        row["responses"].append({"text": text, "source": source, "finish_reason": reason})
    config = label.Config(
        output=str(tmp_path / "label"),
        candidates=candidates_output([row], tmp_path / "cands"),
        method="reward_model",
        reward_model=str(tiny_rm / "model"),
    )
    run_stage("label", config, label.run, workdir=tmp_path / "w")
    (pair,) = [
        json.loads(x) for x in (tmp_path / "label/pairs/train.jsonl").read_text().splitlines()
    ]
    provenance = pair["provenance"]
    scored = {
        provenance["chosen_source"]: provenance["chosen_score"],
        provenance["rejected_source"]: provenance["rejected_score"],
    }

    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm / "model").eval()
    tokenizer = load_tokenizer(str(tiny_rm / "model"))
    for source, (text, reason) in answers.items():
        ids = encode(tokenizer, prompt + text)
        with_eos = model(input_ids=torch.tensor([ids + [tokenizer.eos_token_id]])).logits
        as_cut = model(input_ids=torch.tensor([ids])).logits
        expected = as_cut if reason == "length" else with_eos
        assert scored[source] == pytest.approx(float(expected), abs=1e-4), source
        assert float(as_cut) != pytest.approx(float(with_eos), abs=1e-3)  # the test can tell


def test_a_candidate_without_its_source_is_named(tiny_rm, tmp_path):
    from jobs import label
    from jobs.errors import BadInputError

    responses = [{"text": "a", "source": "x"}, {"text": "b"}]
    rows = [{"id": "p1", "prompt": "p", "instruction": "i", "responses": responses}]
    config = label.Config(
        output=str(tmp_path / "label"),
        candidates=candidates_output(rows, tmp_path / "cands"),
        method="reward_model",
        reward_model=str(tiny_rm / "model"),
    )
    with pytest.raises(
        BadInputError, match=r"candidates/train.jsonl:1: field 'responses\[1\].source'"
    ):
        run_stage("label", config, label.run, workdir=tmp_path / "w")


def test_a_reward_model_scores_a_questions_special_text_as_it_was_trained_to(tiny_rm):
    """label, evaluate and grpo score (prompt, answer) with the question's special-token
    text read as text where its row places it (``literals``), as the reward stage trained on
    it: the oracle is transformers' classifier over the row encoded with every special
    token's text split into text (a byte-level BPE: the same ids), and the control, read
    as tokens, scores otherwise."""
    from transformers import AutoModelForSequenceClassification

    from jobs.models import load_tokenizer
    from jobs.scoring import score_texts

    tokenizer = load_tokenizer(str(tiny_rm / "model"))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm / "model").eval()
    question = "Close it with <|endoftext|> here."
    prompt, answer = f"### 질문: {question}\n### 답변:", " 네, 알겠어요."
    row = {"prompt": prompt, "message_spans": [[prompt.index(question), prompt.index("\n")]]}
    [placed] = score_texts(model, tokenizer, [prompt], [answer], literals=[literals(row)])
    [as_tokens] = score_texts(model, tokenizer, [prompt], [answer])
    ids = tokenizer(prompt + answer, add_special_tokens=False, split_special_tokens=True)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids["input_ids"] + [tokenizer.eos_token_id]]))
    assert placed == pytest.approx(float(expected.logits), abs=1e-4)
    assert as_tokens != pytest.approx(placed, abs=1e-3)
