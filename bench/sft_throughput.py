"""SFT training throughput: our sft stage (DeepSpeed engine) against TRL's SFTTrainer.

Same tiny model, same data, batch size, sequence length, optimiser and number
of steps, each in a fresh process, one after the other in one run; figures are
non-padding training tokens per second of training time. Run:
``python -m bench.sft_throughput``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS, BATCH, SEQ_LEN, LR = 60, 16, 128, 3e-3


def prepare(root: Path) -> tuple[Path, Path]:
    """The tiny model and the data stage output, made by the project's own stages."""
    from jobs import bootstrap
    from jobs.contract import run_stage
    from jobs.data import stage as data

    boot = root / "bootstrap"
    run_stage("bootstrap", bootstrap.Config(output=str(boot)), bootstrap.run, root / "w1")
    out = root / "data"
    config = data.Config(
        output=str(out),
        tokenizer=str(boot / "model"),
        dedup_threshold=0.95,
        eval_fraction=0.05,
        sources=[
            {"name": "daily", "format": "alpaca", "uri": str(boot / "data/sft_daily.jsonl")},
            {"name": "hate", "format": "alpaca", "uri": str(boot / "data/sft_hate.jsonl")},
        ],
    )
    run_stage("data", config, data.run, root / "w2")
    return boot / "model", out


def ours(model: Path, data: Path, root: Path) -> dict:
    from jobs import sft
    from jobs.contract import run_stage

    config = sft.Config(
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
    manifest = run_stage("sft", config, sft.run, root / "w-ours")
    return {"tokens_per_s": manifest.metrics["tokens_per_s"]}


def trl(model_dir: Path, data: Path, root: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (data / "sft/train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["response"]} for r in rows]
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    class Clock(TrainerCallback):
        """Training time and tokens, counted as our stage counts them."""

        def __init__(self) -> None:
            self.seconds, self.tokens, self.started = 0.0, 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started

    clock = Clock()
    args = SFTConfig(
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
        packing=False,
        seed=0,
        dataloader_drop_last=True,
        adam_beta2=0.95,
        weight_decay=0.0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock]
    )
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        clock.tokens += (
            int(batch["attention_mask"].sum())
            if "attention_mask" in batch
            else int((batch["input_ids"] != tokenizer.pad_token_id).sum())
        )
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return {"tokens_per_s": clock.tokens / clock.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["ours", "trl"])
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.impl:  # a child: one implementation, figures on the last line
        root = Path(args.root)
        fn = ours if args.impl == "ours" else trl
        print(json.dumps(fn(root / "bootstrap" / "model", root / "data", root)))
        return

    from bench.common import report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        figures: dict = {"steps": STEPS, "micro_batch_size": BATCH, "max_seq_len": SEQ_LEN}
        for impl in ("ours", "trl"):
            child = subprocess.run(
                [sys.executable, "-m", "bench.sft_throughput", "--impl", impl, "--root", str(root)],
                capture_output=True,
                text=True,
            )
            if child.returncode != 0:
                raise SystemExit(f"{impl} failed:\n{child.stderr[-3000:]}")
            figures[impl] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{impl:>5}: {figures[impl]['tokens_per_s']:.0f} tokens/s", flush=True)
    figures["ratio_ours_over_trl"] = round(
        figures["ours"]["tokens_per_s"] / figures["trl"]["tokens_per_s"], 3
    )
    print(f"ratio ours/TRL: {figures['ratio_ours_over_trl']}")
    report("sft_throughput", figures)


if __name__ == "__main__":
    main()
