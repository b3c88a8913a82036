"""DPO training throughput: our dpo stage (DeepSpeed engine) against TRL's DPOTrainer.

Same tiny model, same synthetic preference pairs, batch size (pairs), sequence length,
β, optimiser and number of steps, both with the reference's log-probs computed before
training; each in a fresh process, one after the other in one run. Figures are
non-padding training tokens per second of training time.
Run: ``python -m bench.dpo_throughput``.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import TrainerClock, ours_against_trl

STEPS, BATCH, SEQ_LEN, LR, BETA = 40, 8, 128, 1e-4, 0.1


def ours(model: Path, data: Path, root: Path) -> dict:
    from jobs import dpo
    from jobs.contract import run_stage

    config = dpo.Config(
        output=str(root / "ours"),
        model=str(model),
        data=str(data),
        max_seq_len=SEQ_LEN,
        max_steps=STEPS,
        beta=BETA,
        eval_every=10**6,
        log_every=10**6,
        checkpoint_every=10**6,
        train={"micro_batch_size": BATCH, "learning_rate": LR},
    )
    manifest = run_stage("dpo", config, dpo.run, root / "w-ours")
    return {"tokens_per_s": manifest.metrics["tokens_per_s"]}


def trl(model_dir: Path, data: Path, root: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in (data / "pairs/train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    clock = TrainerClock()
    args = DPOConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        max_length=SEQ_LEN,
        learning_rate=LR,
        beta=BETA,
        lr_scheduler_type="cosine",
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        adam_beta2=0.95,
        weight_decay=0.0,
        precompute_ref_log_probs=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[clock.callback()],
    )
    clock.count(trainer)
    trainer.train()
    return {"tokens_per_s": clock.tokens_per_s}


if __name__ == "__main__":
    ours_against_trl(
        "dpo_throughput",
        "bench.dpo_throughput",
        ours,
        trl,
        {"steps": STEPS, "pairs_per_batch": BATCH, "max_seq_len": SEQ_LEN},
    )
