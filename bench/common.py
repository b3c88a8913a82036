"""What every benchmark shares: the tiny model and data, fresh processes per
implementation, a clock for TRL's trainers, and how results are printed and kept."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str:
    """The CPU's model name (platform.processor() says only "x86_64" on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        **{name: installed(name) for name in ("transformers", "deepspeed", "trl")},
    }


def report(name: str, figures: dict, show: bool = True) -> Path:
    """Write ``figures``, with the machine, to bench/results/NAME.json (and print them)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"bench": name, "machine": machine(), **figures}, indent=2))
    if show:
        print(json.dumps(figures, indent=2))
        print(f"written to {path}")
    return path


def prepare(root: Path) -> tuple[Path, Path]:
    """The tiny model and a data stage output (SFT rows and pairs), made by the stages."""
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
            {"name": "pairs", "format": "pairs", "uri": str(boot / "data/pairs.jsonl")},
        ],
    )
    run_stage("data", config, data.run, root / "w2")
    return boot / "model", out


def median_runs(runs: dict[str, list[dict]]) -> dict:
    """Each implementation's figures: its median run's (by tokens/s), with every run's
    tokens/s beside them, so the spread is in the result."""
    figures = {}
    for impl, got in runs.items():
        ranked = sorted(got, key=lambda f: f["tokens_per_s"])
        middle = ranked[(len(ranked) - 1) // 2]
        figures[impl] = {**middle, "runs_tokens_per_s": [round(f["tokens_per_s"]) for f in got]}
    return figures


def compare(
    module: str, root: Path, impls: tuple[str, ...] = ("ours", "trl"), repeats: int = 3
) -> dict:
    """Run ``python -m MODULE --impl I --root ROOT`` for each implementation ``repeats``
    times in fresh processes, the order alternating (on a shared 2-core machine one run of
    each, always in one order, moved a side by 50%); each prints its figures as JSON on its
    last line. The median run of each counts."""
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    # both sides on the CPU, on a GPU machine too (TRL's arguments say use_cpu; our stage
    # would take the GPU it sees): the GPU comparison is bench/gpu.py's
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for repeat in range(repeats):
        for impl in impls if repeat % 2 == 0 else tuple(reversed(impls)):
            child = subprocess.run(
                [sys.executable, "-m", module, "--impl", impl, "--root", str(root)],
                capture_output=True,
                text=True,
                env=env,
            )
            if child.returncode != 0:
                raise SystemExit(f"{impl} failed:\n{child.stderr[-3000:]}")
            runs[impl].append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{impl:>5}: {runs[impl][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    return median_runs(runs)


class TrainerClock:
    """Training time and non-padding tokens of a transformers Trainer, counted the way our
    stages count them: time inside optimiser steps, tokens from the batches' attention masks."""

    def __init__(self, skip_steps: int = 0) -> None:
        """``skip_steps``: the first steps (kernel builds, warm-up) are not counted."""
        self.seconds, self.tokens, self._started = 0.0, 0, 0.0
        self.skip_steps, self._steps, self._batches = skip_steps, 0, 0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                # batches collated before (precomputing references) do not count
                clock.tokens = clock._batches = 0

            def on_step_begin(self, args, state, control, **kwargs):
                # the previous (maybe uncounted) step's kernels finish before the clock
                # starts: a warm-up step's queued work is not the first timed step's
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock._started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock._steps += 1
                if clock._steps <= clock.skip_steps:
                    return
                if torch.cuda.is_available():  # the step's kernels, not only their launch
                    torch.cuda.synchronize()
                clock.seconds += time.perf_counter() - clock._started

        return Clock()

    def count(self, trainer) -> None:
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            self.tokens += int(sum(v.sum() for k, v in batch.items() if "attention_mask" in k))
            self._batches += 1
            return batch

        trainer.data_collator = counting

    @property
    def tokens_per_s(self) -> float:
        # Batches are collated ahead of their step (prefetch: one more than the steps run),
        # so a timed step's tokens are taken as the average collated batch's.
        timed = self._steps - min(self.skip_steps, self._steps)
        if timed == 0 or self.seconds <= 0:
            raise ValueError(f"no timed step: {self._steps} run, {self.skip_steps} skipped")
        return self.tokens / max(self._batches, 1) * timed / self.seconds

    def train(self, trainer_class, **kwargs) -> dict:
        """Build a TRL trainer with this clock attached, train it, give its throughput."""
        trainer = trainer_class(callbacks=[self.callback()], **kwargs)
        self.count(trainer)
        trainer.train()
        return {"tokens_per_s": self.tokens_per_s}


def trl_arguments(root: Path, batch: int, steps: int, max_length: int, lr: float) -> dict:
    """TRL training arguments that match our stages' runs: batch, steps, length, AdamW
    betas (0.9, 0.95), no weight decay, cosine schedule, CPU, no logging or saving."""
    return {
        "output_dir": str(root / "trl"),
        "per_device_train_batch_size": batch,
        "max_steps": steps,
        "max_length": max_length,
        "learning_rate": lr,
        "lr_scheduler_type": "cosine",
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "dataloader_drop_last": True,
        "adam_beta2": 0.95,
        "weight_decay": 0.0,
        # TRL's default since 1.x recomputes activations; our stages keep them (their
        # gradient_checkpointing is off by default), so TRL runs without it too
        "gradient_checkpointing": False,
        # and its default precision is bf16 (autocast, on the CPU too): ours trains in
        # fp32 here (EngineConfig.precision's default), so TRL does too
        "bf16": False,
    }


def run_ours(stage: str, model: Path, data: Path, root: Path, **fields) -> dict:
    """Our stage on the prepared model and data, without evaluation or checkpoints."""
    from jobs.contract import run_stage
    from jobs.stages import stage_module

    module = stage_module(stage)
    # a fresh output for every run: a second run into the first's would find it up to date
    # and report the first run's figures without training
    output, work = root / "ours", root / "w-ours"
    for folder in (output, work):
        shutil.rmtree(folder, ignore_errors=True)
    config = module.Config(
        output=str(output),
        model=str(model),
        data=str(data),
        eval_every=10**6,
        log_every=10**6,
        checkpoint_every=10**6,
        **fields,
    )
    manifest = run_stage(stage, config, module.run, work)
    return {"tokens_per_s": manifest.metrics["tokens_per_s"]}


def pairs_dataset(data: Path):
    """The data output's training pairs as a datasets.Dataset (prompt, chosen, rejected)."""
    from datasets import Dataset

    rows = [json.loads(line) for line in (data / "pairs/train.jsonl").read_text().splitlines()]
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


Impl = Callable[[Path, Path, Path], dict]  # (model dir, data output, scratch) -> figures


def ours_against_trl(name: str, module: str, ours: Impl, trl: Impl, setting: dict) -> None:
    """The command line of a throughput benchmark: as the parent, prepare the model and data,
    run both implementations and report the ratio; as a child (--impl), run one."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["ours", "trl"])
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.impl:  # a child: one implementation, figures on the last line
        root = Path(args.root)
        fn = ours if args.impl == "ours" else trl
        print(json.dumps(fn(root / "bootstrap" / "model", root / "data", root)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp))
        figures = {**setting, **compare(module, Path(tmp))}
    figures["ratio_ours_over_trl"] = round(
        figures["ours"]["tokens_per_s"] / figures["trl"]["tokens_per_s"], 3
    )
    print(f"ratio ours/TRL: {figures['ratio_ours_over_trl']}")
    report(name, figures)
