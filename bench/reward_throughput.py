"""Reward-model training throughput: our reward stage (DeepSpeed engine) against TRL's
RewardTrainer.

Same tiny model, same synthetic preference pairs, batch size (pairs), sequence length,
optimiser and number of steps, each in a fresh process, one after the other in one run;
figures are non-padding training tokens per second of training time.
Run: ``python -m bench.reward_throughput``.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import TrainerClock, ours_against_trl, pairs_dataset, run_ours, trl_arguments

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
    args = RewardConfig(**trl_arguments(root, BATCH, STEPS, SEQ_LEN, LR))
    return TrainerClock().train(
        RewardTrainer,
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


if __name__ == "__main__":
    ours_against_trl(
        "reward_throughput",
        "bench.reward_throughput",
        ours,
        trl,
        {"steps": STEPS, "pairs_per_batch": BATCH, "max_seq_len": SEQ_LEN},
    )
