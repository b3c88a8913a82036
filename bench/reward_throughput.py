"""Reward-model training throughput: our reward stage (DeepSpeed engine) against TRL's
RewardTrainer.

Same tiny model, same synthetic preference pairs, batch size (pairs), sequence length,
optimiser and number of steps, each in a fresh process, one after the other in one run;
figures are non-padding training tokens per second of training time.
Run: ``python -m bench.reward_throughput``.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import TrainerClock, ours_against_trl

STEPS, BATCH, SEQ_LEN, LR = 40, 16, 128, 1e-3


def ours(model: Path, data: Path, root: Path) -> dict:
    from jobs import reward
    from jobs.contract import run_stage

    config = reward.Config(
        output=str(root / "ours"),
        model=str(model),
        data=str(data),
        max_seq_len=SEQ_LEN,
        max_steps=STEPS,
        eval_every=10**6,
        log_every=10**6,
        checkpoint_every=10**6,
        train={"micro_batch_size": BATCH, "learning_rate": LR},
    )
    manifest = run_stage("reward", config, reward.run, root / "w-ours")
    return {"tokens_per_s": manifest.metrics["tokens_per_s"]}


def trl(model_dir: Path, data: Path, root: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = [json.loads(line) for line in (data / "pairs/train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    clock = TrainerClock()
    args = RewardConfig(
        output_dir=str(root / "trl"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        max_length=SEQ_LEN,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        adam_beta2=0.95,
        weight_decay=0.0,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock.callback()],
    )
    clock.count(trainer)
    trainer.train()
    return {"tokens_per_s": clock.tokens_per_s}


if __name__ == "__main__":
    ours_against_trl(
        "reward_throughput",
        "bench.reward_throughput",
        ours,
        trl,
        {"steps": STEPS, "pairs_per_batch": BATCH, "max_seq_len": SEQ_LEN},
    )
