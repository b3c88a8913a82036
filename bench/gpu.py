"""GPU benchmarks at the shape of polyglot-ko-1.3b (GPT-NeoX, hidden 2048, 24 layers, 16 heads,
vocab 30080; 1.33B parameters), one NVIDIA GPU, bf16, in one run:

- sft: our stage (bf16 and ZeRO-2, as a GPU recipe sets them, otherwise its defaults; and
  with ``train.compile``: torch.compile inside the engine) against a plain PyTorch loop
  (pure bf16 weights, fused AdamW) and TRL's SFTTrainer, at sequence 1024 and 2048;
- reward and dpo: our stages (default and compiled) against TRL's RewardTrainer and
  DPOTrainer;
- ppo: a 1.33B actor with a 350M reward model and critic (prompts up to 256 tokens, 256
  new tokens, rollout batch 64), with transformers' dynamic KV cache, the static one run
  eagerly, and the static one with the decode step compiled: seconds per iteration split into
  generation, scoring and training, generation tokens/s, and the share of the decode floor
  reached (the actor's weights and KV cache read once per decode step at the GPU's memory
  bandwidth);
- generate: the generate stage on the 1.33B model (256 prompts in batches of 64, 256 new
  tokens), with the same three ways to decode: tokens/s and the share of the decode floor;
- evaluate: the evaluate stage, the 1.33B model as candidate and baseline (each answering
  the 256 prompts as above) judged by the 350M reward model, the same three ways: seconds
  of generation and of scoring, tokens/s and the share of the decode floor.

Figures are steady-state non-padding training tokens per second (the first steps, which
compile kernels and warm the allocator, left out), MFU (6 x parameters FLOPs per token, the
convention of the figures in the issue, against the GPU's dense bf16 peak), and peak GPU
memory. Each implementation runs in a fresh process on the same random-initialised model
and the same data. Run: ``make bench-gpu`` or ``python -m bench.gpu [--only sft,ppo]
[--seq 1024 2048]``; ``--tiny`` runs the same code at a tiny shape (a check of the benchmark
on a CPU machine: its figures say nothing about GPUs). Writes bench/results/gpu.json. Every
implementation runs with the CUDA allocator's expandable segments, as the stages do in a pod
(``PYTORCH_CUDA_ALLOC_CONF`` set before the run overrides it for all of them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import TrainerClock, report

SHAPES = {
    "1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16},
    "350m": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
}
VOCAB = 30080
# Dense bf16 peak and memory bandwidth by the device's exact name (NVIDIA datasheets): a
# name not listed gets no MFU or decode floor (its name is in the report), rather than
# another part's figures (an H100 PCIe is not an SXM one, a GH200 not an H200).
GPUS = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # SXM5
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100 NVL": (835e12, 3.9e12),
    "NVIDIA H200": (989e12, 4.8e12),  # SXM
    "NVIDIA H200 NVL": (835e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.039e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.555e12),
    "NVIDIA A100 80GB PCIe": (312e12, 1.935e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 1.555e12),
}
CASES = ("sft", "reward", "dpo", "ppo", "generate", "evaluate")
# What runs for each case, in one run: ours by default and with train.compile, against the
# references; PPO with each way to decode (DECODES).
IMPLEMENTATIONS = {
    "sft": ("ours", "compiled", "plain", "trl"),
    "reward": ("ours", "compiled", "trl"),
    "dpo": ("ours", "compiled", "trl"),
    "ppo": ("dynamic", "static", "compiled"),
    "generate": ("dynamic", "static", "compiled"),
    "evaluate": ("dynamic", "static", "compiled"),
}
# The cases that compare decodes (their "compiled" is the decode step, SFT's the training).
ROLLOUT_CASES = ("ppo", "generate", "evaluate")


def gpu_limits(name: str | None = None) -> tuple[float | None, float | None]:
    if name is None:
        if not torch.cuda.is_available():
            return None, None
        name = torch.cuda.get_device_name()
    return GPUS.get(name.strip(), (None, None))


# --- inputs: models of the benchmark's shapes and data of the benchmark's lengths -----------


def make_model(kind: str, shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random-initialised GPT-NeoX of ``shape`` as a finished stage output (``model/``)."""
    from transformers import (
        AutoTokenizer,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        GPTNeoXForSequenceClassification,
    )

    from jobs.contract import StageConfig, run_stage

    def build(config, ctx):
        dims = SHAPES[shape]
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model_config = GPTNeoXConfig(
            **dims,
            intermediate_size=4 * dims["hidden_size"],
            vocab_size=VOCAB,
            max_position_embeddings=2048,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
        cls = GPTNeoXForCausalLM if kind == "lm" else GPTNeoXForSequenceClassification
        torch.manual_seed(0)
        cls(model_config).to(torch.bfloat16).save_pretrained(ctx.out_dir / "model")
        tokenizer.save_pretrained(ctx.out_dir / "model")
        return {}

    run_stage(f"{kind}-{shape}", StageConfig(output=str(out)), build, out.parent / f"w-{out.name}")
    return out / "model"


def make_data(tokenizer_dir: Path, texts: list[str], seq: int, rows: int, out: Path) -> Path:
    """A finished data output whose SFT rows, pairs and prompts fill ``seq`` tokens: prompts
    of a quarter of it, answers of the rest (prompts for PPO: up to 256 tokens)."""
    from transformers import AutoTokenizer

    from jobs.contract import StageConfig, run_stage

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = [t for text in texts for t in tokenizer(text + "\n")["input_ids"]]

    def piece(start: int, length: int) -> str:
        ids = [stream[(start + i) % len(stream)] for i in range(length)]
        return tokenizer.decode(ids)

    def build(config, ctx):
        prompt_len, answer_len = seq // 4, seq - seq // 4 - 8
        sft, pairs, prompts = [], [], []
        for i in range(rows):
            at = i * 7919
            prompt = piece(at, prompt_len)
            sft.append({"prompt": prompt, "response": piece(at + prompt_len, answer_len)})
            pairs.append(
                {
                    "prompt": piece(at, prompt_len // 2),
                    "chosen": piece(at + seq, answer_len // 2),
                    "rejected": piece(at + 2 * seq, answer_len // 2),
                }
            )
            prompts.append({"prompt": piece(at, min(256, prompt_len)), "instruction": "-"})
        files = [("sft", "train", sft), ("pairs", "train", pairs), ("prompts", "train", prompts)]
        files.append(("prompts", "eval", prompts))  # what evaluate answers
        for folder, split, items in files:
            (ctx.out_dir / folder).mkdir(parents=True, exist_ok=True)
            with open(ctx.out_dir / folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
        return {}

    run_stage("data", StageConfig(output=str(out)), build, out.parent / f"w-{out.name}")
    return out


def prepare(root: Path, tiny: bool, seqs: list[int], rows: int) -> None:
    from jobs import bootstrap
    from jobs.contract import run_stage

    boot = root / "bootstrap"
    run_stage("bootstrap", bootstrap.Config(output=str(boot)), bootstrap.run, root / "w-boot")
    texts = [
        json.loads(line)["chosen"]
        for line in (boot / "data" / "dialogues.jsonl").read_text().splitlines()
    ]
    big, small = ("tiny", "tiny") if tiny else ("1.3b", "350m")
    make_model("lm", big, boot / "model", root / "actor")
    make_model("rm", small, boot / "model", root / "rm")
    for seq in seqs:
        make_data(boot / "model", texts, seq, rows, root / f"data-{seq}")


# --- one implementation, in a child process ------------------------------------------------


def steady_rate(lines: list[dict]) -> float:
    """Tokens/s over the logged windows after the first (kernel builds, warm-up): their
    harmonic mean, which for windows of one size is their tokens over their time, as
    TrainerClock gives TRL's (a median would drop our slow windows and not TRL's)."""
    rates = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]
    return statistics.harmonic_mean(rates[1:] if len(rates) > 1 else rates)


def figures(rate: float, params: int, peak_gib: float) -> dict:
    """Throughput, and MFU as 6 x N FLOPs a token (N: the parameters a token's matmuls use;
    attention's own FLOPs left out, as the usual 6N figure does) against the dense peak."""
    peak_flops, _ = gpu_limits()
    out = {"tokens_per_s": round(rate, 1), "peak_memory_gib": round(peak_gib, 2)}
    if peak_flops:
        out["mfu"] = round(rate * 6 * params / peak_flops, 4)
        out["mfu_parameters"] = params
    return out


def matmul_parameters(model_dir: Path, case: str = "sft") -> int:
    """The parameters a token's matmuls use in the model ``case`` trains: all but the input
    embedding (a lookup, unless it is tied to the LM head), and for a reward model its
    score head, not an LM head it does not have."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        if case == "reward":
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()  # None for a sequence classifier
    tied = output is not None and output.weight is embedding
    return total if tied else total - embedding.numel()


def ours(case: str, root: Path, seq: int, args, compiled: bool = False) -> dict:
    """Our stage; ``compiled``: with ``train.compile`` (torch.compile inside the engine),
    one of the speed levers, measured beside the default in the same run."""
    from jobs.contract import read_manifest
    from jobs.stages import stage_module

    module = stage_module(case)
    # Inductor's C++ code for the CPU fails on bf16 reductions (torch 2.13: "conflicting
    # declaration at_BFloat16_tmp_acc0_vec"): the tiny CPU check compiles in fp32.
    cpu_compiled = compiled and not torch.cuda.is_available()
    train = {
        "precision": "fp32" if cpu_compiled else "bf16",
        "zero_stage": 2,
        "micro_batch_size": args.batch,
        "learning_rate": 1e-5,
        "compile": compiled,
    }
    config = module.Config(
        output=str(root / f"ours-{case}-{seq}"),
        model=str(root / "actor" / "model"),
        data=str(root / f"data-{seq}"),
        max_seq_len=seq,
        max_steps=args.steps,
        eval_every=10**6,
        log_every=args.log_every,
        checkpoint_every=10**6,
        train=train,
    )
    compiles = run_watched(case, config, module.run, root / f"w-ours-{case}-{seq}", compiled)
    output = Path(config.output)
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    metrics = read_manifest(str(output)).metrics
    peak = metrics.get("cuda_peak_memory_gib", 0.0)
    model = root / "actor" / "model"
    rate = figures(steady_rate(lines), matmul_parameters(model, case), peak)
    return rate | startup(metrics) | compiles


def plain(case: str, root: Path, seq: int, args) -> dict:
    """The reference loop: the model in bf16, torch's fused AdamW, the same batches, and
    transformers' own loss (its logits at every position, as a plain loop computes them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.batches import ShardedSampler, read_jsonl
    from jobs.supervised import collate, tokenize

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = root / "actor" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    items = tokenize(read_jsonl(root / f"data-{seq}" / "sft" / "train.jsonl", ()), tokenizer, seq)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    batches = ShardedSampler(len(items), args.batch, 0).micro_batches()
    rates, tokens, started = [], 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = collate([items[i] for i in next(batches)], tokenizer.pad_token_id)
        tokens += int(batch["attention_mask"].sum())
        inputs = ("input_ids", "attention_mask", "labels")
        loss = model(**{k: batch[k].to(device) for k in inputs}, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append({"tokens_per_s": tokens / (time.perf_counter() - started)})
            tokens, started = 0, time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return figures(steady_rate(rates), matmul_parameters(model_dir, case), peak)


def trl(case: str, root: Path, seq: int, args) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    model_dir = root / "actor" / "model"
    data = root / f"data-{seq}"
    cuda = torch.cuda.is_available()
    common = {
        "output_dir": str(root / f"trl-{case}-{seq}"),
        "per_device_train_batch_size": args.batch,
        "max_steps": args.steps,
        "max_length": seq,
        "learning_rate": 1e-5,
        "adam_beta2": 0.95,
        "lr_scheduler_type": "cosine",
        "logging_steps": 10**6,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": cuda,
        "use_cpu": not cuda,
        "optim": "adamw_torch_fused" if cuda else "adamw_torch",
        "dataloader_drop_last": True,
        "seed": 0,
        # TRL's default recomputes activations; ours keeps them (bench/common.py)
        "gradient_checkpointing": False,
    }
    rows = [
        json.loads(x)
        for x in (data / ("sft" if case == "sft" else "pairs"))
        .joinpath("train.jsonl")
        .read_text()
        .splitlines()
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    clock = TrainerClock(skip_steps=args.log_every)
    if case == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["response"]} for r in rows]
        )
        clock.train(
            SFTTrainer,
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            args=SFTConfig(**common, packing=False),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    elif case == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        clock.train(
            RewardTrainer,
            model=model,
            args=RewardConfig(**common),
            train_dataset=Dataset.from_list(
                [
                    {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                    for r in rows
                ]
            ),
            processing_class=tokenizer,
        )
    else:
        from trl import DPOConfig, DPOTrainer

        clock.train(
            DPOTrainer,
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            args=DPOConfig(**common, beta=0.1, precompute_ref_log_probs=True),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return figures(clock.tokens_per_s, matmul_parameters(model_dir, case), peak)


# The rollout's KV cache and decode step: transformers' dynamic cache; the static one run
# eagerly; the static one with the decode step compiled (torch.compile, CUDA graphs).
DECODES = {
    "dynamic": {"cache": "dynamic"},
    "static": {"cache": "static", "compile_decode": False},
    "compiled": {"cache": "static", "compile_decode": True},
}


def run_watched(stage_name: str, config, run, workdir: Path, compiled: bool) -> dict:
    """Run a stage; where it compiles (the decode step, or the model under
    ``train.compile``: never both in one case here), what its compiles met (graph breaks,
    frames run eager, CUDA graphs skipped on a GPU): a "compiled" figure is compiled whole
    only where each is 0."""
    from jobs.compiled import CompileWatch
    from jobs.contract import run_stage

    watch = CompileWatch()
    run_stage(stage_name, config, run, workdir)
    return {"compile": watch.counts(torch.cuda.is_available())} if compiled else {}


def ppo(root: Path, args, decode: str) -> dict:
    from jobs import ppo as stage
    from jobs.contract import read_manifest

    new_tokens = 16 if args.tiny else 256
    # bf16 as on a GPU; a compiled step on the CPU in fp32 (see ``ours``)
    cpu_compiled = decode == "compiled" and not torch.cuda.is_available()
    train = {
        "precision": "fp32" if cpu_compiled else "bf16",
        "zero_stage": 2,
        "learning_rate": 1e-6,
        # one forward per minibatch, as the figures and DeepSpeed-Chat's step 3 take it
        "micro_batch_size": max(args.rollout // 4, 1),
    }
    config = stage.Config(
        output=str(root / f"ours-ppo-{decode}"),
        actor=str(root / "actor" / "model"),
        reward_model=str(root / "rm" / "model"),
        prompts=str(root / f"data-{args.seq[0]}"),
        iterations=args.ppo_iterations,
        rollout_batch_size=args.rollout,
        minibatch_size=max(args.rollout // 4, 1),
        ppo_epochs=1,
        checkpoint_every=10**6,
        # no sample answers: their greedy decode of 4 prompts is a new shape to compile,
        # time no figure counts
        sample_every=0,
        sampling={
            "max_new_tokens": new_tokens,
            "max_prompt_tokens": 256,
            "temperature": 1.0,
            "top_p": 1.0,
            **DECODES[decode],
        },
        actor_train=train,
        critic_train=train,
    )
    compiles = run_watched("ppo", config, stage.run, root / f"w-ppo-{decode}", decode == "compiled")
    output = Path(config.output)
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    steady = [m for m in lines if m.get("step", 0) > 1 and "generation_s" in m] or lines
    split = {
        k: statistics.mean(m[k] for m in steady)
        for k in ("generation_s", "scoring_s", "training_s", "response_length")
    }
    iteration_s = split["generation_s"] + split["scoring_s"] + split["training_s"]
    generated = split["response_length"] * args.rollout
    metrics = read_manifest(str(output)).metrics
    out = {
        **{k: round(v, 3) for k, v in split.items()},
        "iteration_s": round(iteration_s, 3),
        "generation_share": round(split["generation_s"] / iteration_s, 3),
        "generation_tokens_per_s": round(generated / split["generation_s"], 1),
        "peak_memory_gib": metrics.get("cuda_peak_memory_gib", 0.0),
        **startup(metrics),
        **compiles,
    }
    return out | decode_floor(root, split["generation_s"], new_tokens, args.rollout)


def startup(metrics: dict) -> dict:
    """A stage's seconds from its start to its first step, and those fetching its inputs
    (issue 11 found about 35 s at 1.3B parameters)."""
    return {k: metrics[k] for k in ("startup_s", "startup_inputs_s") if k in metrics}


def decode_floor(root: Path, generation_s: float, new_tokens: int, batch: int) -> dict:
    """The share of the decode floor reached: one decode step reads the actor's bf16
    weights and, per row, the KV cache so far (keys and values of every layer, bf16; a
    step averages prompts of up to 256 tokens and half the answer) at the GPU's memory
    bandwidth. Empty where the GPU is not known."""
    _, bandwidth = gpu_limits()
    if not bandwidth:
        return {}
    from transformers import AutoConfig

    model = AutoConfig.from_pretrained(root / "actor" / "model")
    # bf16 weights a decode step reads whole: the embedding table is read a row a sequence
    weights = 2 * matmul_parameters(root / "actor" / "model")
    context = 256 + new_tokens / 2
    kv = 2 * model.num_hidden_layers * model.hidden_size * 2 * context * batch
    floor_s = (weights + kv) / bandwidth
    steps_s = generation_s / new_tokens
    return {
        "decode_floor_ms": round(floor_s * 1e3, 3),
        "decode_step_ms": round(steps_s * 1e3, 3),
        "decode_floor_share": round(floor_s / steps_s, 3),
    }


def inference_options(args, decode: str) -> dict:
    """The sampling and precision of the generate and evaluate cases: prompts up to 256
    tokens, 256 new ones at temperature 1, batches of the rollout's size; bf16 on a GPU
    (a compiled step on the CPU in fp32, see ``ours``)."""
    cpu_compiled = decode == "compiled" and not torch.cuda.is_available()
    return {
        "sampling": {
            "max_new_tokens": 16 if args.tiny else 256,
            "max_prompt_tokens": 256,
            "temperature": 1.0,
            "top_p": 1.0,
            "batch_size": args.rollout,
            **DECODES[decode],
        },
        "inference": {"precision": "fp32" if cpu_compiled else "auto"},
    }


def generate(root: Path, args, decode: str) -> dict:
    """The generate stage on the 1.33B actor: 4 rollout batches of prompts (up to 256
    tokens), 256 new tokens each at temperature 1, in batches of the rollout's size."""
    from jobs import generate as stage

    config = stage.Config(
        output=str(root / f"ours-generate-{decode}"),
        prompts=str(root / f"data-{args.seq[0]}"),
        sources=[{"name": "actor", "model": str(root / "actor" / "model")}],
        max_prompts=4 * args.rollout,
        **inference_options(args, decode),
    )
    compiles = run_watched(
        "generate", config, stage.run, root / f"w-generate-{decode}", decode == "compiled"
    )
    lines = [
        json.loads(x) for x in (Path(config.output) / "metrics.jsonl").read_text().splitlines()
    ]
    [line] = [x for x in lines if "train.actor.generation_s" in x]
    seconds, rate = line["train.actor.generation_s"], line["train.actor.tokens_per_s"]
    # What a stage run costs: the compiled decode's one-time compile (in the first batch)
    # counts here; PPO's figures above are the steady state, after the first iteration.
    # The eval split, generated after it by the same compiled step, is the steady state.
    steady = [x["eval.actor.tokens_per_s"] for x in lines if "eval.actor.tokens_per_s" in x]
    return {
        "generation_s": seconds,
        "generation_tokens_per_s": rate,
        "includes_compile": decode == "compiled",
        STEADY: steady[0] if steady else None,
        **compiles,
        **decode_floor(root, seconds / 4, config.sampling.max_new_tokens, args.rollout),
    }


def evaluate(root: Path, args, decode: str) -> dict:
    """The evaluate stage: the 1.33B actor answers 4 rollout batches of prompts as candidate
    and again as baseline, and the 350M reward model judges both."""
    from jobs import evaluate as stage

    config = stage.Config(
        output=str(root / f"ours-evaluate-{decode}"),
        prompts=str(root / f"data-{args.seq[0]}"),
        candidate=str(root / "actor" / "model"),
        baseline=str(root / "actor" / "model"),
        judge_model=str(root / "rm" / "model"),
        max_prompts=4 * args.rollout,
        **inference_options(args, decode),
    )
    compiles = run_watched(
        "evaluate", config, stage.run, root / f"w-evaluate-{decode}", decode == "compiled"
    )
    lines = [
        json.loads(x) for x in (Path(config.output) / "metrics.jsonl").read_text().splitlines()
    ]
    found = {k: v for line in lines for k, v in line.items()}
    seconds = found["candidate.generation_s"] + found["baseline.generation_s"]
    tokens = sum(
        found[f"{m}.generation_s"] * found[f"{m}.tokens_per_s"] for m in ("candidate", "baseline")
    )
    # The candidate's generation includes the one-time compile of the decode step; the
    # baseline, a second model of the same shapes, may reuse the compiled code (the CPU
    # check of the bench shows it did there; CUDA graphs may be recorded again): both
    # figures are given, the decode floor's share is the baseline's.
    return {
        "generation_s": round(seconds, 3),
        "scoring_s": found["held_out.scoring_s"],
        "generation_tokens_per_s": round(tokens / seconds, 1),
        "baseline_tokens_per_s": found["baseline.tokens_per_s"],
        "includes_compile": decode == "compiled",
        **compiles,
        **decode_floor(
            root, found["baseline.generation_s"] / 4, config.sampling.max_new_tokens, args.rollout
        ),
    }


STEADY = "steady_generation_tokens_per_s"


def ratios(case: str, entry: dict) -> dict:
    """Each implementation against the references measured in the same run: ours (eager and
    compiled) over TRL and the plain loop in tokens/s; for rollouts, the static cache's decode
    (eager and compiled) over the dynamic cache's in generated tokens/s."""
    # here "compiled" is the decode step, in training cases the model
    rate = "generation_tokens_per_s" if case in ROLLOUT_CASES else "tokens_per_s"
    measured = {impl for impl, found in entry.items() if isinstance(found, dict) and rate in found}
    pairs = (
        [(decode, "dynamic") for decode in ("static", "compiled")]
        if case in ROLLOUT_CASES
        else [(ours, ref) for ours in ("ours", "compiled") for ref in ("trl", "plain")]
    )
    suffix = "_generation" if case in ROLLOUT_CASES else ""
    found = {
        f"{impl}_over_{reference}{suffix}": round(entry[impl][rate] / entry[reference][rate], 3)
        for impl, reference in pairs
        if impl in measured and reference in measured
    }
    # a stage's later batches, after the compiled decode's one-time compile (generate: the
    # eval split)
    steady = {
        impl: got[STEADY]
        for impl, got in entry.items()
        if isinstance(got, dict) and got.get(STEADY)
    }
    for impl, reference in pairs if case in ROLLOUT_CASES else ():
        if impl in steady and reference in steady:
            found[f"{impl}_over_{reference}_steady{suffix}"] = round(
                steady[impl] / steady[reference], 3
            )
    return found


def run_child(command: list[str], root: Path, timeout: float) -> dict:
    """One implementation in a process of its own: its figures, or the error that stopped it
    (the run goes on with the next one). What it wrote under ``root`` is removed after it:
    every stage output at 1.33B is a 2.7 GB model, more than the disk holds in one run."""
    before = set(root.iterdir())
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        for made in set(root.iterdir()) - before:
            shutil.rmtree(made, ignore_errors=True) if made.is_dir() else made.unlink()
    if run.returncode != 0:
        return {"error": f"exit {run.returncode}: {run.stderr[-4000:]}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def child(args) -> dict:
    root = Path(args.root)
    if args.case in ROLLOUT_CASES:
        cases = {"ppo": ppo, "generate": generate, "evaluate": evaluate}
        return cases[args.case](root, args, args.impl)
    if args.impl == "compiled":
        return ours(args.case, root, args.seq[0], args, compiled=True)
    fn = {"ours": ours, "plain": plain, "trl": trl}[args.impl]
    return fn(args.case, root, args.seq[0], args)


# --- the run --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES)
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=None, help="micro-batch at sequence 1024")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--rollout", type=int, default=64)
    parser.add_argument("--ppo-iterations", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks the bench on CPU")
    parser.add_argument(
        "--impls", help="comma-separated implementations to run (default: each case's all)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds one implementation may take"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The allocator a pod's stages run with (python -m jobs sets it before CUDA starts),
    # for ours and the references alike: each child process inherits it.
    from jobs.__main__ import configure_cuda_allocator

    configure_cuda_allocator()
    if args.case:  # a child: one implementation, figures on the last line
        print(json.dumps(child(args)))
        return
    cases = [c for c in args.only.split(",") if c]
    if args.tiny:
        args.seq, args.steps, args.log_every, args.rollout = [64], 6, 2, 8
        args.ppo_iterations = 2
    results: dict = {"shape": "tiny" if args.tiny else "1.3b", "cases": {}}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    name = "gpu_tiny_check" if args.tiny else "gpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args.tiny, args.seq, rows=max(256, args.steps * 16))
        for case in cases:
            seqs = args.seq if case == "sft" else args.seq[:1]
            for seq in seqs:
                batch = args.batch or (8 if args.tiny else max(1, 8 * 1024 // seq))
                if case == "dpo":
                    batch = max(1, batch // 2)  # a pair is two sequences
                wanted = args.impls.split(",") if args.impls else IMPLEMENTATIONS[case]
                impls = [impl for impl in IMPLEMENTATIONS[case] if impl in wanted]
                key = case if case in ROLLOUT_CASES else f"{case}@{seq}"
                results["cases"][key] = {"micro_batch": batch, "seq": seq}
                for impl in impls:
                    command = [
                        sys.executable,
                        "-m",
                        "bench.gpu",
                        "--case",
                        case,
                        "--impl",
                        impl,
                        "--root",
                        str(root),
                        "--seq",
                        str(seq),
                        "--batch",
                        str(batch),
                        "--steps",
                        str(args.steps),
                        "--log-every",
                        str(args.log_every),
                        "--rollout",
                        str(args.rollout),
                        "--ppo-iterations",
                        str(args.ppo_iterations),
                    ]
                    if args.tiny:
                        command.append("--tiny")
                    found = run_child(command, root, args.timeout)
                    results["cases"][key][impl] = found
                    print(f"{key:>10} {impl:>5}: {json.dumps(found)}", flush=True)
                    # written as it goes: a run cut short by its machine keeps what it measured
                    report(name, results, show=False)
                results["cases"][key] |= ratios(case, results["cases"][key])
    report(name, results)
    failed = [
        f"{key} {impl}"
        for key, entry in results["cases"].items()
        for impl, found in entry.items()
        if isinstance(found, dict) and "error" in found
    ]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their errors are in the report)")


if __name__ == "__main__":
    main()
