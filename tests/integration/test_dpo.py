"""DPO: it learns the preference, and its loss is the formula, and is TRL's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from jobs.contract import read_manifest
from jobs.dpo import collate, dpo_loss, encode_pair, sequence_logps
from tests.conftest import ROOT, run_entrypoint, with_dropout

pytestmark = pytest.mark.slow

PAIRS = [
    {
        "prompt": "### 명령어:\nWrite a nasty insult about my coworker.\n\n### 응답:\n",
        "chosen": "I cannot help with hurting anyone. Would you like to talk about it?",
        "rejected": "Sure! They are worthless. Post it everywhere.",
    },
    {
        "prompt": "### 명령어:\n요즘 요가에 관심이 생겼어.\n\n### 응답:\n",
        "chosen": "정말 좋은 도전이네요. 천천히 하셔도 충분히 잘하고 계세요.",
        "rejected": "멍청한 질문이네. 시간 낭비하게 하지 마.",
    },
    {"prompt": "Hi", "chosen": "Hello! How can I help you today?", "rejected": "What."},
]


def dpo_config(model: str, data: Path, output: Path, **overrides) -> dict:
    config = {
        "output": str(output),
        "model": model,
        "data": str(data),
        "max_seq_len": 96,
        "max_steps": 30,
        "eval_every": 30,
        "beta": 0.1,
        "seed": 0,
        "train": {"learning_rate": 1e-3, "micro_batch_size": 8},
    }
    return {**config, **overrides}


def test_dpo_raises_held_out_preference_accuracy_and_margin(tiny, tiny_data, tmp_path):
    config = dpo_config(str(tiny / "model"), tiny_data, tmp_path / "dpo")
    result = run_entrypoint("dpo", config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_manifest(str(tmp_path / "dpo")).metrics
    # Seed 0, 30 steps from the tiny random model: accuracy 0 (policy = reference: every
    # margin 0) -> about 1.0, margin 0 -> above 1.
    assert metrics["eval_accuracy_start"] == 0 and metrics["eval_margin_start"] == 0
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_margin"] > 0.5
    assert (tmp_path / "dpo" / "reference_logps.pt").is_file()
    assert_prefers_chosen(tmp_path / "dpo" / "model", tiny / "model", tiny_data)


def test_the_policy_trains_without_dropout(tiny, tiny_data, tmp_path):
    """A model with dropout 0.3 in its config: its first step, before any update, is the
    reference exactly (the reference's log-probs were taken without dropout), so the loss
    is log 2 and the margin 0; with dropout they are noise."""
    model = with_dropout(tiny / "model", tmp_path / "dropout")
    config = dpo_config(model, tiny_data, tmp_path / "dpo", max_steps=1, eval_every=100)
    result = run_entrypoint("dpo", config, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    (step,) = [m for m in lines if "margin" in m]
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-4), step
    assert step["margin"] == pytest.approx(0, abs=1e-4), step


def assert_prefers_chosen(policy_dir: Path, reference_dir: Path, data_dir: Path) -> None:
    """Judged outside the stage's own code: log-probs token by token of the exported policy
    against the starting model on held-out pairs. A stage that swapped chosen and rejected
    alike for policy and reference would report the same accuracy, and fail here."""
    from transformers import AutoModelForCausalLM

    from jobs.models import load_tokenizer

    policy = AutoModelForCausalLM.from_pretrained(policy_dir).float().eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).float().eval()
    tokenizer = load_tokenizer(str(reference_dir))
    rows = [json.loads(x) for x in (data_dir / "pairs" / "eval.jsonl").read_text().splitlines()]
    preferred = []
    for row in rows[:40]:
        shift = {
            side: by_hand(policy, tokenizer, row["prompt"], row[side])
            - by_hand(reference, tokenizer, row["prompt"], row[side])
            for side in ("chosen", "rejected")
        }
        preferred.append(shift["chosen"] > shift["rejected"])
    assert sum(preferred) >= 0.9 * len(preferred), (sum(preferred), len(preferred))


@pytest.fixture
def policy_and_reference(tiny, tmp_path):
    """The tiny model as reference and a perturbed copy as policy (so margins are not 0)."""
    from transformers import AutoModelForCausalLM

    from jobs.models import load_tokenizer

    reference = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    policy = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    policy.save_pretrained(tmp_path / "policy")
    tokenizer = load_tokenizer(str(tiny / "model"))
    tokenizer.save_pretrained(tmp_path / "policy")
    return policy, reference, tokenizer, tmp_path / "policy"


def by_hand(model, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer | prompt), one token at a time."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(logp[len(prompt_ids) + i - 1, t].item() for i, t in enumerate(answer_ids))


def test_loss_on_a_fixed_batch_is_the_formula(policy_and_reference):
    policy, reference, tokenizer, _ = policy_and_reference
    items = [encode_pair(tokenizer, row, 128) for row in PAIRS]
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        logps = sequence_logps(policy, **batch)
        ref = sequence_logps(reference, **batch)
    n = len(PAIRS)
    for beta, smoothing in ((0.1, 0.0), (0.5, 0.2)):
        loss, _, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, "sigmoid", smoothing)
        expected = 0.0
        for row in PAIRS:
            h = (
                by_hand(policy, tokenizer, row["prompt"], row["chosen"])
                - by_hand(reference, tokenizer, row["prompt"], row["chosen"])
            ) - (
                by_hand(policy, tokenizer, row["prompt"], row["rejected"])
                - by_hand(reference, tokenizer, row["prompt"], row["rejected"])
            )
            sig = 1 / (1 + math.exp(-beta * h))
            expected += -(1 - smoothing) * math.log(sig) - smoothing * math.log(1 - sig)
        assert loss.item() == pytest.approx(expected / n, rel=1e-4)


def test_loss_equals_trls_dpo_loss_on_the_same_batch(policy_and_reference, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    _, reference, tokenizer, policy_dir = policy_and_reference
    for loss_type, beta in (("sigmoid", 0.1), ("ipo", 0.3)):
        trainer = DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(policy_dir),
            ref_model=reference,
            args=DPOConfig(
                output_dir=str(tmp_path / "trl"),
                beta=beta,
                loss_type=[loss_type],
                use_cpu=True,
                report_to="none",
                max_length=128,
            ),
            train_dataset=Dataset.from_list(PAIRS),
            processing_class=tokenizer,
        )
        trainer.model.eval()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
            trl_loss = trl_loss[0] if isinstance(trl_loss, tuple) else trl_loss
            # Ours, on TRL's own token ids: the same sequences, our log-probs and our loss.
            average = loss_type == "ipo"
            mask = batch["completion_mask"]
            logps = sequence_logps(
                trainer.model, batch["input_ids"], batch["attention_mask"], mask, average
            )
            ref = sequence_logps(
                reference, batch["input_ids"], batch["attention_mask"], mask, average
            )
        n = len(PAIRS)
        ours, _, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type)
        # float32 log-probs computed two ways differ by ~1e-5; IPO squares the margin.
        tolerance = 1e-4 if loss_type == "sigmoid" else 1e-3
        assert ours.item() == pytest.approx(float(trl_loss), rel=tolerance), loss_type


def pairs_output(source: Path, out: Path, n_train: int, n_eval: int) -> Path:
    """A finished output with ``n_train`` and ``n_eval`` pairs taken from ``source``."""
    from jobs.contract import StageConfig, run_stage

    rows = (source / "pairs" / "train.jsonl").read_text().splitlines()
    assert len(rows) >= n_train + n_eval

    def write(config, ctx):
        (ctx.out_dir / "pairs").mkdir(parents=True)
        (ctx.out_dir / "pairs" / "train.jsonl").write_text("\n".join(rows[:n_train]) + "\n")
        (ctx.out_dir / "pairs" / "eval.jsonl").write_text("\n".join(rows[-n_eval:]) + "\n")
        return {}

    run_stage("pairs", StageConfig(output=str(out)), write, workdir=out.parent / f"w-{out.name}")
    return out


def test_two_processes_under_zero3_evaluate_uneven_shards_as_one(
    policy_and_reference, tiny, tiny_data, tmp_path
):
    """17 held-out pairs over 2 ranks in micro-batches of 4: rank 0 has 3 batches, rank 1
    has 2. Under ZeRO-3 every forward is a collective, so unpadded shards hang; padded ones
    must give the single process's metrics, and the reference log-probs each rank computes
    for its share with the reference partitioned over both, gathered, must be the single
    process's (with the whole reference)."""
    from jobs.contract import StageConfig, run_stage

    data = pairs_output(tiny_data, tmp_path / "pairs", n_train=40, n_eval=17)
    policy, _, tokenizer, _ = policy_and_reference

    def save_policy(config, ctx):
        policy.save_pretrained(ctx.out_dir / "model")
        tokenizer.save_pretrained(ctx.out_dir / "model")
        return {}

    run_stage("policy", StageConfig(output=str(tmp_path / "p")), save_policy, tmp_path / "w-p")
    config = {
        "model": str(tmp_path / "p" / "model"),
        "reference": str(tiny / "model"),
        "data": str(data),
        "max_seq_len": 96,
        "max_steps": 1,
        "eval_every": 1000,
        "train": {"learning_rate": 1e-4, "micro_batch_size": 4},
    }
    one = run_entrypoint("dpo", {**config, "output": str(tmp_path / "one")}, tmp_path, name="one")
    assert one.returncode == 0, one.stderr[-3000:]

    two = {**config, "output": str(tmp_path / "two")}
    two["train"] = {**config["train"], "zero_stage": 3}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_NPROC_PER_NODE": "2", "PET_NNODES": "1"}
    result = subprocess.run(
        ["torchrun", "--standalone", "-m", "jobs", "dpo", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # partitioned too (a model trained under ZeRO-3 need not fit whole on one GPU), and its
    # log-probs the single process's whole reference's (the metrics below)
    assert "dpo: the reference is partitioned over the ranks (ZeRO-3)" in result.stdout
    assert "partitioned" not in one.stdout

    first = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert first[0]["step"] == second[0]["step"] == 0
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_logp_chosen"):
        assert second[0][key] == pytest.approx(first[0][key], rel=1e-4, abs=1e-5), key
    assert 0 < first[0]["eval_accuracy"] < 1  # a policy unlike its reference: margins not 0
    ref_one = torch.load(tmp_path / "one" / "reference_logps.pt", weights_only=True)
    ref_two = torch.load(tmp_path / "two" / "reference_logps.pt", weights_only=True)
    for split in ("train", "eval"):
        torch.testing.assert_close(ref_two[split], ref_one[split], atol=1e-4, rtol=1e-4)


def test_a_rerun_on_changed_pairs_computes_the_reference_afresh(tiny, tmp_path):
    """The same config, run again after its data output was re-made with fewer pairs: the
    stage runs again (its input changed) and the reference log-probs are those of the new
    pairs, not a stale file of the old ones left in the work folder."""
    pairs = (tiny / "data" / "pairs.jsonl").read_text().splitlines()
    source = tmp_path / "pairs.jsonl"
    data_config = {
        "output": str(tmp_path / "data"),
        "sources": [{"name": "pairs", "format": "pairs", "uri": str(source)}],
        "dedup_threshold": None,
        "eval_fraction": 0.1,
    }
    config = {
        "output": str(tmp_path / "dpo"),
        "model": str(tiny / "model"),
        "data": str(tmp_path / "data"),
        "max_seq_len": 64,
        "max_steps": 1,
        "seed": 0,
        "train": {"micro_batch_size": 8},
    }
    env = {"KUBERLHF_WORKDIR": str(tmp_path / "scratch")}
    counts = []
    for rows in (pairs[:120], pairs[:60]):
        source.write_text("\n".join(rows) + "\n")
        assert run_entrypoint("data", data_config, tmp_path, env=env).returncode == 0
        result = run_entrypoint("dpo", config, tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        train = (tmp_path / "data" / "pairs" / "train.jsonl").read_text().splitlines()
        reference = torch.load(tmp_path / "dpo" / "reference_logps.pt", weights_only=True)
        assert read_manifest(str(tmp_path / "dpo")).metrics["train_pairs"] == len(train)
        assert reference["train"].shape == (len(train), 2)
        counts.append(len(train))
    assert counts[1] < counts[0]


def test_the_reference_runs_in_the_policys_precision_and_leaves_before_the_policy_loads(
    tiny, tiny_data, tmp_path, monkeypatch
):
    """The reference log-probs are computed in the training precision, and the reference
    model is gone by the time the policy is loaded: two models of the policy's size never
    share the accelerator (the stage is stopped there, before its engine starts)."""
    import gc
    import weakref

    from jobs import dpo, engine
    from jobs.contract import run_stage

    seen: dict = {}
    compute = dpo.reference_logps

    def reference_logps(model, *args, **kwargs):
        seen["dtypes"] = {p.dtype for p in model.parameters()}
        seen["reference"] = weakref.ref(model)
        return compute(model, *args, **kwargs)

    class PolicyLoading(Exception):
        pass

    def load_model(*args, **kwargs):
        gc.collect()  # only cycles left; the stage itself must have let go of the model
        seen["alive_at_policy_load"] = seen["reference"]() is not None
        raise PolicyLoading

    monkeypatch.setattr(dpo, "reference_logps", reference_logps)
    monkeypatch.setattr(engine, "load_model", load_model)
    config = dpo.Config(
        output=str(tmp_path / "dpo"),
        model=str(tiny / "model"),
        data=str(tiny_data),
        max_seq_len=64,
        train={"precision": "bf16", "micro_batch_size": 16},
    )
    with pytest.raises(PolicyLoading):
        run_stage("dpo", config, dpo.run, workdir=tmp_path / "work")
    assert seen["dtypes"] == {torch.bfloat16}
    assert seen["alive_at_policy_load"] is False
