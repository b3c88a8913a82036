"""DPO training throughput: our dpo stage (DeepSpeed engine) against TRL's DPOTrainer.

Same tiny model, same synthetic preference pairs, batch size (pairs), sequence length,
β, optimiser and number of steps, both with the reference's log-probs computed before
training; each in a fresh process, one after the other in one run. Figures are
non-padding training tokens per second of training time.
Run: ``python -m bench.dpo_throughput``.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import TrainerClock, ours_against_trl, pairs_dataset, run_ours, trl_arguments

STEPS, BATCH, SEQ_LEN, LR, BETA = 40, 8, 128, 1e-4, 0.1


def ours(model: Path, data: Path, root: Path) -> dict:
    return run_ours(
        "dpo",
        model,
        data,
        root,
        max_seq_len=SEQ_LEN,
        max_steps=STEPS,
        beta=BETA,
        train={"micro_batch_size": BATCH, "learning_rate": LR},
    )


def trl(model_dir: Path, data: Path, root: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dataset = pairs_dataset(data)
    args = DPOConfig(
        **trl_arguments(root, BATCH, STEPS, SEQ_LEN, LR), beta=BETA, precompute_ref_log_probs=True
    )
    return TrainerClock().train(
        DPOTrainer,
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )


if __name__ == "__main__":
    ours_against_trl(
        "dpo_throughput",
        "bench.dpo_throughput",
        ours,
        trl,
        {"steps": STEPS, "pairs_per_batch": BATCH, "max_seq_len": SEQ_LEN},
    )
