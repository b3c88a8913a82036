"""Reward-model training throughput: our reward stage (DeepSpeed engine) against TRL's
RewardTrainer.

Same tiny model, same synthetic preference pairs, batch size (pairs), sequence length,
optimiser and number of steps, each in a fresh process, one after the other in one run;
figures are non-padding training tokens per second of training time.
Run: ``python -m bench.reward_throughput``.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import TrainerClock, ours_against_trl, pairs_dataset, run_ours

STEPS, BATCH, SEQ_LEN, LR = 40, 16, 128, 1e-3


def ours(model: Path, data: Path, root: Path) -> dict:
    return run_ours(
        "reward",
        model,
        data,
        root,
        max_seq_len=SEQ_LEN,
        max_steps=STEPS,
        train={"micro_batch_size": BATCH, "learning_rate": LR},
    )


def trl(model_dir: Path, data: Path, root: Path) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    dataset = pairs_dataset(data)
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
