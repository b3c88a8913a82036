"""SFT training throughput: our sft stage (DeepSpeed engine) against TRL's SFTTrainer.

Same tiny model, same data, batch size, sequence length, optimiser and number of steps,
each in a fresh process, one after the other in one run; figures are non-padding
training tokens per second of training time. Run: ``python -m bench.sft_throughput``.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import TrainerClock, ours_against_trl, run_ours, trl_arguments

STEPS, BATCH, SEQ_LEN, LR = 60, 16, 128, 3e-3


def ours(model: Path, data: Path, root: Path) -> dict:
    return run_ours(
        "sft",
        model,
        data,
        root,
        max_seq_len=SEQ_LEN,
        max_steps=STEPS,
        train={"micro_batch_size": BATCH, "learning_rate": LR},
    )


def trl(model_dir: Path, data: Path, root: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (data / "sft/train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["response"]} for r in rows]
    )
    args = SFTConfig(**trl_arguments(root, BATCH, STEPS, SEQ_LEN, LR), packing=False)
    return TrainerClock().train(
        SFTTrainer,
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


if __name__ == "__main__":
    ours_against_trl(
        "sft_throughput",
        "bench.sft_throughput",
        ours,
        trl,
        {"steps": STEPS, "micro_batch_size": BATCH, "max_seq_len": SEQ_LEN},
    )
