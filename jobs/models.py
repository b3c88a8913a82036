"""Where a model or tokenizer comes from: a finished stage output in the store, or a Hub id."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs import dist, store
from jobs.contract import StageContext
from jobs.errors import BadInputError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(ref: str) -> bool:
    return not store.is_s3(ref) and not Path(ref).exists() and bool(_HUB_ID.match(ref))


def model_source(ctx: StageContext, ref: str, revision: str | None = None) -> str:
    """A path or Hub id ``from_pretrained`` can load; the input is recorded in the manifest."""
    if is_hub_id(ref):
        ctx.input_hub(ref, revision)
        return ref
    return str(ctx.input_dir(ref))


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report where weights are missing by design (a new head)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class InferenceConfig(BaseModel):
    """Where a stage runs the models it only samples from or scores."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: this process's GPU where there is one, else the CPU"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on the CPU"
    )

    def torch_device(self):
        import torch

        if self.device == "cpu":
            return torch.device("cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BadInputError("inference.device: cuda asked for, but this node has no GPU")
        return dist.device()

    def torch_dtype(self, device):
        import torch

        if self.precision == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def load_causal_lm(path: str, settings: InferenceConfig, revision: str | None = None):
    """A causal LM for sampling, in the configured precision on the configured device."""
    from transformers import AutoModelForCausalLM

    device = settings.torch_device()
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=settings.torch_dtype(device)
    )
    return model.to(device).eval()


def transformers_model(model):
    """The transformers model inside a plain model, a DeepSpeed engine (its ``module``) or
    a LoRA (peft) model (its base model, with the LoRA layers in it)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def free_memory() -> None:
    """Give a model's memory back once the caller has dropped it (the next model needs it)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
