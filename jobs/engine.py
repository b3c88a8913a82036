"""The DeepSpeed engine every training stage shares: config, set-up, checkpoints, export.

Written once so that sft, reward, ppo and dpo differ only in their data and
their loss (DeepSpeed-Chat re-implements this per step; we do not).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs import dist
from jobs.compiled import CompileWatch
from jobs.errors import BadInputError, TransientError


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


class EngineConfig(BaseModel):
    """How to train: DeepSpeed ZeRO stage, precision, batch, optimiser, memory savers."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: int = Field(0, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    micro_batch_size: int = Field(8, ge=1, description="per process")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor")
    gradient_clipping: float = 1.0
    gradient_checkpointing: bool = False
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimiser state to CPU")
    lora: LoraConfig | None = None
    attn_implementation: (
        Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] | None
    ) = Field(
        None,
        description="the attention kernel (transformers' attn_implementation); default: "
        "transformers' choice, SDPA where the model has it. flash_attention_2/3 need the "
        "flash-attn package; with packing they run each example as its own sequence",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model inside the engine (DeepSpeed's engine.compile): "
        "fuses the element-wise work between the matmuls; the first steps compile",
    )

    @model_validator(mode="after")
    def _supported(self) -> EngineConfig:
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora with zero_stage 3 is not supported; use zero_stage 0-2")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if (self.attn_implementation or "").startswith("flash_") and self.precision != "bf16":
            # transformers only warns, and the kernel fails at the first forward
            raise ValueError(
                f"attn_implementation {self.attn_implementation} runs in bf16 only; "
                "set precision: bf16"
            )
        return self


def deepspeed_config(cfg: EngineConfig, total_steps: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": optimizer_params(cfg)},
        **UNTIMED,
    }


# DeepSpeed's own progress lines and timers, off: the stages log their own figures. Its
# throughput timer, on by default, synchronises the device at the start of every forward
# and at every step (DeepSpeed PR #5363, which added the switch, measured up to 20-25%
# lost on some accelerators): the host waited for the GPU twice a micro-batch.
UNTIMED = {
    "steps_per_print": 1 << 30,
    "wall_clock_breakdown": False,
    "timers": {"throughput": {"enabled": False}},
}


def schedule(cfg: EngineConfig, total_steps: int):
    """The learning-rate schedule, for ``deepspeed.initialize``: a linear warm-up from 0 over
    ``warmup_steps``, then a cosine down to ``min_lr_ratio`` of the rate, as DeepSpeed-Chat
    (``transformers.get_scheduler``) and OpenRLHF (``cosine_with_min_lr``) train. DeepSpeed's
    own WarmupCosineLR gave the first step a rate of 0 (no warm-up, or with one: the first
    two) and warmed up on a log curve (half the rate a tenth of the way in)."""

    def build(optimizer):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        last = max(total_steps, 1)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, cfg.warmup_steps, last, min_lr_rate=cfg.min_lr_ratio
        )
        # held at the floor past the last step (transformers' cosine would rise again)
        [rate] = scheduler.lr_lambdas
        scheduler.lr_lambdas = [lambda step: rate(min(step, last))]
        return scheduler

    return build


def optimizer_params(cfg: EngineConfig) -> dict:
    return {
        "lr": cfg.learning_rate,
        "betas": list(cfg.betas),
        "eps": 1e-8,
        "weight_decay": cfg.weight_decay,
    }


def prepare_model(model, cfg: EngineConfig, task_type: str = "CAUSAL_LM"):
    """Gradient checkpointing and LoRA, before the engine wraps the model."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        from peft import LoraConfig as PeftLora
        from peft import get_peft_model

        model = get_peft_model(
            model,
            PeftLora(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type=task_type,
            ),
        )
    return model


def import_deepspeed():
    """DeepSpeed, imported without the ``import mlflow`` its autotuner runs at import time
    (``deepspeed/autotuning/autotuner.py``): 0.9 s of CPU in every stage process's start-up where
    MLflow is installed, for the autotuner's own logging, which no stage uses. A stage whose
    run logs to MLflow imports it in its sink as before."""
    import sys

    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # an import of it raises ImportError
        try:
            import deepspeed  # noqa: F401
        finally:
            del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def init_distributed() -> None:
    """DeepSpeed's process group (one process, or one rank of torchrun's group)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    deepspeed = import_deepspeed()

    cpu = not _has_cuda()
    if cpu:
        # On CPU (demos, tests) DeepSpeed would JIT-compile its C++ Adam and shared-memory
        # all-reduce ops, tens of seconds each and again whenever their build command
        # changes; torch's AdamW and gloo's all-reduce serve a tiny model just as well.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if dist.world_size() == 1:
        # DeepSpeed always wants a process group; a single process gets one of its own
        # (otherwise it goes looking for MPI).
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(
        dist_backend="gloo" if cpu else "nccl", timeout=dist.timeout(dist.COLLECTIVE_TIMEOUT)
    )


def training_dtype(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


@contextmanager
def zero3_init(config: dict):
    """While open, transformers builds models partitioned over the ranks (ZeRO-3's
    ``zero.Init``): no rank ever holds a full copy, in host or GPU memory. A no-op for other
    stages. Closed at once after loading: it applies to every model built while open."""
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    init_distributed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(config)
    try:
        yield
    finally:
        del hf_config
        unset_hf_deepspeed_config()


def model_options(cfg: EngineConfig) -> dict:
    """``from_pretrained`` options of a model trained (or used beside one) with ``cfg``: its
    training precision and attention kernel."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    options: dict = {"dtype": training_dtype(cfg.precision)}
    kernel = cfg.attn_implementation
    if kernel is not None:
        available = {
            "flash_attention_2": is_flash_attn_2_available,
            "flash_attention_3": is_flash_attn_3_available,
        }.get(kernel, lambda: True)
        if not available():
            raise BadInputError(
                f"train.attn_implementation {kernel!r}: its package (flash-attn) is not "
                "installed in this image, or there is no CUDA GPU; use sdpa"
            )
        options["attn_implementation"] = kernel
    return options


def load_model(model_class, source: str, cfg: EngineConfig, **kwargs):
    """A model to train with ``cfg``: loaded in its training precision (not a float32 copy
    first) with its attention kernel, and under ZeRO-3 built partitioned."""
    with zero3_init(deepspeed_config(cfg, 1)):
        return model_class.from_pretrained(source, **model_options(cfg), **kwargs)


def initialize(model, cfg: EngineConfig, total_steps: int, task_type: str = "CAUSAL_LM"):
    """A DeepSpeed engine around ``model`` (one process, or one rank of torchrun's group)."""
    import torch

    deepspeed = import_deepspeed()

    init_distributed()
    cpu = not _has_cuda()
    model = prepare_model(model, cfg, task_type)
    params = [p for p in model.parameters() if p.requires_grad]
    config = deepspeed_config(cfg, total_steps)
    optimizer = None
    if cpu:
        del config["optimizer"]
        config["zero_force_ds_cpu_optimizer"] = False
        optimizer = torch.optim.AdamW(params, **optimizer_params(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=schedule(cfg, total_steps),
        config=config,
    )
    if cfg.compile:
        # In place (nn.Module.compile): the module, its state dict and its export stay as
        # they are. Batches of new lengths recompile once, then run with dynamic shapes.
        if task_type == "SEQ_CLS":
            # A classifier is run as its backbone and head called apart (scoring.head_values),
            # never through the module's own forward, which engine.compile compiles: the
            # backbone is compiled as DeepSpeed compiles a module (engine.compile without
            # DeepCompile is module.compile with the accelerator's backend).
            from deepspeed.accelerator import get_accelerator

            from jobs.models import transformers_model

            backbone = transformers_model(engine).base_model
            backbone.compile(backend=get_accelerator().get_compile_backend())
        else:
            engine.compile()
        if dist.is_main():
            print("engine: the model is compiled (torch.compile); the first steps compile it")
    drop_idle_forward_hooks(engine)  # after compile, which could make them again
    reduce_only_among_several(engine)
    return engine


def reduce_only_among_several(engine) -> None:
    """Outside ZeRO, DeepSpeed's engine all-reduces the gradients at every step's end even
    in a group of one process (``buffered_allreduce_fallback``): it flattens them into
    buckets of up to 500M elements, reduces each over that group and copies it back, two
    passes over every gradient and a bucket's worth of memory for an identity. TRL and
    accelerate wrap no DDP around one process; the engine's own switch, which it clears
    where it has no process group, turns it off here too. ZeRO-1 to 3 keep theirs: their
    reduction fills the optimiser's partitions. (The reduction also gave a trainable
    parameter that had no gradient a zero one, which fp32 AdamW then steps with its
    momentum; every stage's model gives each trainable parameter a gradient.)"""
    if engine.dp_world_size == 1 and not engine.zero_optimization():
        engine.enable_backward_allreduce = False


def train_without_dropout(module) -> None:
    """Train mode, every dropout off (TRL's ``disable_dropout_in_model``): transformers runs
    gradient checkpointing only in train mode (a model fresh from ``from_pretrained`` is in
    eval mode, and DeepSpeed's engine leaves it so), and without dropout the training
    forward is the policy that sampled, so a first step's ratio is exactly 1.

    Beyond TRL's ``nn.Dropout`` layers: most transformers attentions (GPT-NeoX, Llama, OPT)
    keep their dropout as a float handed to the attention kernel, OPT's decoder drops
    whole layers (``layerdrop``) in train mode, and Falcon reads its config's rates at
    every forward; those are zeroed too. A LoRA adapter's dropout is an nn.Dropout: off."""
    import torch

    module.train()
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None)) is not None}
    for holder in [*module.modules(), *configs.values()]:
        if isinstance(holder, torch.nn.Dropout):
            holder.p = 0.0
        # a config's too: some models read theirs at every forward (Falcon's decoder)
        for name, value in list(vars(holder).items()):
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop"):
                setattr(holder, name, 0.0)


@contextmanager
def for_generation(engine, gather: bool = True):
    """The engine's model ready to generate, and whether its ranks must step together
    (``synced_gpus``). Under ZeRO-3 each forward gathers every layer's weights from all
    ranks: at every decode step, with finished ranks stepping on so the gathers match.
    Where the whole model fits on the device (half its free memory, the rest for the KV
    cache), it is gathered once for the rollout instead, DeepSpeed's
    ``unwrap_model_for_generation`` (the way TRL's ``unwrap_model_for_generation`` does it):
    the decode steps are plain forwards, with no weights to gather. Tokens are the same
    either way. The ranks still step together (``synced_gpus``: one small all-reduce a
    token): DeepSpeed's pre-forward hook, which stays, broadcasts while it traces the
    module order, so every rank must run as many forwards."""
    if engine.zero_optimization_stage() != 3:  # (its forward hooks gone: initialize)
        yield engine.module, False
        return
    if gather and dist.all_ranks(fits_on_device(engine.module)):
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        dist.say_once("generation: the actor's ZeRO-3 parameters are gathered once per rollout")
        with unwrap_model_for_generation(engine), engine_hooks_off(engine):
            yield engine.module, dist.world_size() > 1
        return
    dist.say_once(
        "generation: the actor's ZeRO-3 parameters are gathered layer by layer at every token"
    )
    yield engine.module, True


ENGINE_HOOKS = ("module_forward_pre_hook", "module_forward_post_hook")


def drop_idle_forward_hooks(engine) -> None:
    """Remove the hooks DeepSpeed's engine runs around its module's every forward
    (``_forward_prologue`` and ``_forward_epilogue``) where they have nothing to do: outside
    ZeRO-3 (whose flag lets a forward fetch parameters it has not announced), with no
    fp16 auto-cast, flops profiler, autotuning, random-LTD, memory breakdown or timers,
    as :func:`deepspeed_config` sets it. Run anyway, they are Python at every forward,
    and under ``train.compile`` dynamo in torch 2.11 cannot trace them (an enum compared
    with ``<``): the compiled model ran them as 5 eager frames at every step (the GPU
    machine's torch; torch 2.13 traces them)."""
    busy = (
        engine.zero_optimization_partition_weights()
        or engine.fp16_auto_cast()
        or engine.flops_profiler_enabled()  # autotuning turns it on too
        or engine.random_ltd_enabled()
        or engine.memory_breakdown()
        or engine.engine_timers.forward_timers
        or engine.tput_timer.config.enabled
    )
    if not busy:  # as DeepSpeed removes them itself under DeepCompile (_set_deepcompile_active)
        for name in ENGINE_HOOKS:
            if (handle := getattr(engine, name, None)) is not None:
                handle.remove()
                setattr(engine, name, None)


@contextmanager
def engine_hooks_off(engine):
    """A ZeRO-3 module without the hooks DeepSpeed runs at its every forward, none of which
    a rollout over gathered weights needs:
    - the engine's own (ZeRO-3's flag that lets a forward fetch a parameter it has not
      announced), which dynamo in torch 2.11 cannot trace (an enum compared with ``<``):
      the compiled decode step ran them eager at every token, in pieces around the
      compiled forward (5 frames in a PPO run under torch 2.11; outside ZeRO-3 they are
      gone from the start, :func:`drop_idle_forward_hooks`);
    - the start-of-forward hook that resets the parameter coordinator's trace,
      which DeepSpeed tells dynamo never to trace (a graph break before the compiled step
      and one after, under torch 2.11 and 2.13 alike). Over gathered weights nothing is
      fetched, and ZeRO-3's hooks put back after the rollout re-record the trace.
    Each is swapped for a hook that does nothing, in its place among the module's hooks,
    and put back after."""
    handles = [getattr(engine, name, None) for name in ENGINE_HOOKS]
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)  # as unwrap_model_for_... finds it
    handles.append(getattr(offload, "fwd_pre_hook", None))
    swapped = []
    for handle in handles:
        hooks = handle.hooks_dict_ref() if handle is not None else None
        if hooks is not None and handle.id in hooks:
            swapped.append((hooks, handle.id, hooks[handle.id]))
            hooks[handle.id] = _no_hook
    try:
        yield
    finally:
        for hooks, key, hook in swapped:
            hooks[key] = hook


def _no_hook(*_args, **_kwargs) -> None:
    return None


def fits_on_device(module, share: float = 0.5) -> bool:
    """Whether ``module``'s whole (ZeRO-3 partitioned) weights fit in ``share`` of the free
    memory of the GPU, counting what PyTorch's allocator holds unused (after a training
    step most of the GPU is reserved, not used); on a CPU machine host memory is not the
    limit a rollout meets."""
    import torch

    if not _has_cuda():
        return True
    size = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in module.parameters())
    free, _ = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return size < share * free


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def export_hf(engine, tokenizer, out_dir: Path, cfg: EngineConfig) -> None:
    """The trained model in Hugging Face format (safetensors + tokenizer); collective."""
    module = engine.module
    state_dict = None
    if cfg.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    if not dist.is_main():
        return
    if cfg.lora is not None:
        module = module.merge_and_unload()
        state_dict = None
    module.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _engines(engines) -> dict:
    """One engine, or several by name (PPO's actor and critic)."""
    return engines if isinstance(engines, dict) else {"model": engines}


def checkpoint(engines, ctx, step: int, state: dict) -> None:
    """Save and commit a resumable checkpoint at ``step``: every engine's model, optimiser
    and scheduler state (each rank its shard), ``state`` and the RNG; collective."""
    import torch

    # ``state`` is the run's (the same on every rank: stages all-reduce what goes in it) and
    # DeepSpeed keeps rank 0's; each rank's own generators go in a file of the rank's.
    client = {**state, "step": step}
    # The run's state goes with the first engine only: the others' files would each hold
    # another copy (PPO's EMA is a whole fp32 model), and a ZeRO-3 engine one per rank.
    bare = {"step": step}
    generators = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # sampling in rollouts draws from the GPU's generator
        generators["cuda_rng"] = torch.cuda.get_rng_state()
    failed: TransientError | None = None
    try:
        with ctx.checkpoints.writing(step) as local:
            for number, (name, engine) in enumerate(_engines(engines).items()):
                kept = client if number == 0 else bare
                engine.save_checkpoint(str(local / name), tag="state", client_state=kept)
            torch.save(generators, local / _rank_file())
    except TransientError as exc:  # a full scratch disk
        failed = exc
    # Every rank stops when one could not write (the others would wait for it at the upload's
    # barrier); a failure inside DeepSpeed's own collectives can still only time out.
    if dist.any_rank(failed is not None):
        raise failed or TransientError(
            f"{ctx.stage}: another rank could not write the checkpoint at step {step} "
            "(its scratch disk is full); the one before it is intact"
        )
    # The metrics up to the checkpoint reach the store before it commits: a kill between
    # the two must not lose the lines a resumed run continues from.
    if ctx.metrics is not None:
        ctx.metrics.sync()
    ctx.checkpoints.save(step)


def resume(engines, ctx) -> dict:
    """Load the newest committed checkpoint, if any: its client state, or {} for a fresh
    run. The metrics logged up to it are kept, so metrics.jsonl reads as one run."""
    import torch

    step = ctx.checkpoints.latest()
    if step is None:
        return {}
    directory = ctx.checkpoints.restore(step)
    state: dict = {}
    for number, (name, engine) in enumerate(_engines(engines).items()):
        # DeepSpeed loads its files with pickle (weights_only=False, no option to change
        # it): Checkpoints.restore verified each against its sha256 first.
        _, loaded = engine.load_checkpoint(str(directory / name), tag="state")
        if number == 0:  # the run's state is the first engine's (see checkpoint)
            state = loaded
    mine = directory / _rank_file()
    # Absent for a rank the checkpoint's run did not have, or a checkpoint from before the
    # per-rank files: then the generators rank 0 saved in the client state, if any.
    generators = torch.load(mine, weights_only=True) if mine.is_file() else state
    if "torch_rng" in generators:
        torch.set_rng_state(generators["torch_rng"].cpu())
        if "cuda_rng" in generators and torch.cuda.is_available():
            torch.cuda.set_rng_state(generators["cuda_rng"].cpu())
    elif dist.is_main():
        print(f"{ctx.stage}: the checkpoint holds no generator state for this rank", flush=True)
    ctx.continue_metrics(step)
    if dist.is_main():
        print(f"{ctx.stage}: resumed from the checkpoint at step {step}", flush=True)
    return state


def _rank_file() -> str:
    return f"generators-rank{dist.rank():05d}.pt"


def checkpoint_or_stop(engines, ctx, step: int, every: int, state: dict) -> None:
    """After an optimiser step: checkpoint every ``every`` steps, and on SIGTERM checkpoint
    and stop with the retryable exit code; collective."""
    stop = ctx.should_stop()
    if stop or step % every == 0:
        checkpoint(engines, ctx, step, state)
    if stop:
        raise ctx.preempted(step)


def frozen_config(zero_stage: int, offload: bool, precision: str) -> dict:
    """DeepSpeed's config of an inference-only engine (PPO's reference and reward models)."""
    if zero_stage not in (0, 3) or (offload and zero_stage != 3):
        # Stages 1 and 2 partition optimiser state and gradients, which a frozen model has
        # none of; DeepSpeed offloads parameters only under ZeRO-3.
        raise ValueError(
            f"frozen models: zero_stage {zero_stage} with offload {offload} is not supported; "
            "use zero_stage 0, or zero_stage 3 (with or without offload)"
        )
    zero: dict = {"stage": zero_stage}
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        **UNTIMED,
    }


def load_frozen(model_class, source: str, config: dict, precision: str, **kwargs):
    """A frozen model in ``precision``, built partitioned when ``config`` is ZeRO-3."""
    with zero3_init(config):
        return model_class.from_pretrained(source, dtype=training_dtype(precision), **kwargs)


def initialize_frozen(model, config: dict):
    """An inference-only engine: no optimiser, ZeRO-3 partitioning or CPU offload of
    parameters when memory is short."""
    deepspeed = import_deepspeed()
    init_distributed()
    engine, *_ = deepspeed.initialize(model=model.eval(), config=config)
    drop_idle_forward_hooks(engine)
    engine.eval()
    return engine


class Reference:
    """The KL reference of a trained model: an engine of its own (``frozen``), or, for a
    model trained with LoRA from its reference, that model with its adapters off: its
    starting point exactly (an adapter starts at zero), without a second copy of the
    weights, as TRL's trainers take a peft model's reference when given no ref_model."""

    def __init__(self, trained, frozen=None) -> None:
        self.trained, self.frozen = trained, frozen

    @contextmanager
    def model(self) -> Iterator:
        """The module the reference's forwards run through."""
        if self.frozen is not None:
            yield self.frozen.module
            return
        with self.trained.module.disable_adapter():
            yield self.trained.module


def adapters_as_reference(cfg: EngineConfig, reference: str | None, stage: str) -> bool:
    """Whether a model trained with ``cfg`` takes its reference from its own weights with
    its LoRA adapters off (no ``reference`` of another model named); said once."""
    if cfg.lora is None or reference is not None:
        return False
    dist.say_once(
        f"{stage}: the reference is the actor with its LoRA adapters off (no second copy "
        "of its weights)"
    )
    return True


class StepMeter:
    """A training loop's figures between two logs: metric sums kept on the device (read when
    logged: a read every step would make the host wait for the GPU), and the tokens and
    seconds behind the throughput of the window and of the run (all ranks)."""

    def __init__(self, names: tuple[str, ...], device) -> None:
        import torch

        self.names = names
        self.sums = torch.zeros(len(names), device=device)
        self.count, self.tokens, self.seconds = 0, 0, 0.0
        self._at_log = (0, 0.0)

    def add(self, tokens: int, *values) -> None:
        import torch

        self.sums += torch.stack([v.detach().float() for v in values])
        self.count, self.tokens = self.count + 1, self.tokens + tokens

    def means(self) -> dict[str, float]:
        """The metrics' means since the last call (waits for the device)."""
        means = (self.sums / max(self.count, 1)).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.names, means, strict=True))

    def window_rate(self) -> float:
        """Tokens per second since the last call, over all ranks."""
        tokens, seconds = self.tokens - self._at_log[0], self.seconds - self._at_log[1]
        self._at_log = (self.tokens, self.seconds)
        return tokens * dist.world_size() / max(seconds, 1e-9)

    @property
    def rate(self) -> float:
        """Tokens per second of the whole run, over all ranks."""
        return self.tokens * dist.world_size() / max(self.seconds, 1e-9)


class Schedule(BaseModel):
    """How long a supervised stage (sft, reward, dpo, crlft) trains, and how often it logs,
    evaluates and checkpoints."""

    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    eval_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1)

    def total_steps(self, sampler, accumulation: int) -> int:
        return self.max_steps or max(sampler.per_epoch // accumulation, 1) * self.epochs


class TrainLoop:
    """The optimiser steps of a supervised stage and the tail each one ends with, the same in
    every stage: the metrics fed to ``meter`` logged every ``log_every`` steps with the
    learning rate and the throughput; ``evaluate``'s dict logged before the first step
    (kept in ``first``, and in the checkpoints for a resumed run), every ``eval_every``
    steps and at the end (the newest in ``summary``); a checkpoint every
    ``checkpoint_every`` steps and on SIGTERM."""

    def __init__(
        self,
        ds,
        ctx,
        schedule: Schedule,
        total_steps: int,
        state: dict,
        names: tuple[str, ...],
        evaluate: Callable[[], dict] | None = None,
    ) -> None:
        self.ds, self.ctx, self.schedule, self.evaluate = ds, ctx, schedule, evaluate
        self.total, self.step = total_steps, state.get("step", 0)
        self.meter = StepMeter(names, ds.device)
        # what the compiles of a compiled model (train.compile) met, said where they broke it
        self.compiles = CompileWatch() if compiled(ds.module) else None
        self.first: dict = state.get("first_eval") or _earlier_first_eval(state)
        if not self.first and evaluate is not None:
            self.first = evaluate()
            ctx.log(self.step, **self.first)
        # resumed from the last checkpoint, no step is left: the run ended with its last eval
        self.summary = dict(state.get("last_eval") or self.first)

    def steps(self) -> Iterator[int]:
        """The steps still to run (from a resumed one on): the loop's body takes one step,
        feeding ``meter``; the tail runs when the body has ended."""
        import time

        progress = self.ctx.progress(self.total, self.step)
        while self.step < self.total:
            started = time.perf_counter()
            yield self.step
            self.step += 1
            step, every = self.step, self.schedule
            last = step == self.total
            log_now = step % every.log_every == 0 or last
            means = self.meter.means() if log_now else {}  # waits for the GPU: a timed span
            self.meter.seconds += time.perf_counter() - started
            progress.update(1)
            if log_now:
                lr = self.ds.get_lr()[0]
                self.ctx.log(step, **means, lr=lr, tokens_per_s=self.meter.window_rate())
                self._say_compiles()
            if self.evaluate is not None and (step % every.eval_every == 0 or last):
                self.summary = self.evaluate()
                self.ctx.log(step, **self.summary)
            state = {"first_eval": self.first, "last_eval": self.summary}
            checkpoint_or_stop(self.ds, self.ctx, step, every.checkpoint_every, state)
        progress.close()

    def _say_compiles(self) -> None:
        """Where the compiles since the last log broke the compiled model's graph or left
        frames eager (under ZeRO-3, DeepSpeed's hooks on every layer do)."""
        if self.compiles is not None:
            eager = self.compiles.eager_parts()
            if eager:
                dist.say_once(f"engine: {COMPILED_IN_PART}: {eager}")
            self.compiles.restart()


# What the log says where train.compile's model is not compiled whole.
COMPILED_IN_PART = "the compiled model runs eager in part"


def compiled(module) -> bool:
    """Whether ``module`` or one of its submodules was compiled in place (nn.Module.compile,
    what DeepSpeed's engine.compile does without DeepCompile)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def _earlier_first_eval(state: dict) -> dict:
    """The first evaluation as checkpoints written before TrainLoop kept it: dpo's dict
    under "first", sft's loss under "first_eval_loss" (reward's was "first_eval" already)."""
    if isinstance(state.get("first"), dict):
        return state["first"]
    if state.get("first_eval_loss") is not None:
        return {"eval_loss": state["first_eval_loss"]}
    return {}
