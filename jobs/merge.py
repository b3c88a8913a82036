"""merge: SLERP of two checkpoints of one architecture (seed: Sakura-SOLAR's mergekit step).

Each pair of tensors is interpolated along the great circle between them (spherical
linear interpolation): with the angle θ between the flattened tensors,
slerp(t) = sin((1-t)θ)/sin θ · base + sin(tθ)/sin θ · other. Tensors that are nearly
colinear (|cos θ| > 0.9995, where sin θ is ~0) fall back to linear interpolation, as
mergekit does; so does a pair with an all-zero tensor, where mergekit differs (it takes
a zero tensor as orthogonal to any other, and scales the other by sin(tπ/2): 0.71 of it
at t = 0.5, where the two models' mean is 0.5). t is one number, or a list of rules as
mergekit's configs write them:

    t:
      - {filter: attention, value: [0, 0.5, 0.3, 0.7, 1]}
      - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
      - {value: 0.5}

A rule applies to parameters whose name contains its filter (the first that matches);
a list of values is a gradient spread over the layers (layer i of L sits at i/(L-1),
between the anchors linearly). Each tensor keeps its dtype; the tokenizer is the base's.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs.contract import StageConfig, StageContext
from jobs.errors import BadInputError
from jobs.models import load_tokenizer, model_source

COLINEAR = 0.9995
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: str | None = Field(None, description="substring of the parameter names it covers")
    value: float | Annotated[list[float], Field(min_length=1)] = Field(
        description="t, or anchors of a gradient over layers"
    )


class Config(StageConfig):
    base: str = Field(description="t = 0 (and the tokenizer): a stage output folder or Hub id")
    other: str = Field(description="t = 1")
    t: float | list[Rule] = 0.5


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the interpolated tensor in v0's dtype, whether it fell back to linear)."""
    if t == 0:
        return v0.clone(), False
    if t == 1:
        return v1.clone().to(v0.dtype), False
    a, b = v0.float(), v1.float()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * a + t * b).to(v0.dtype), True
    dot = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(dot) > COLINEAR:
        return ((1 - t) * a + t * b).to(v0.dtype), True
    theta = math.acos(dot)
    s0 = math.sin((1 - t) * theta) / math.sin(theta)
    s1 = math.sin(t * theta) / math.sin(theta)
    return (s0 * a + s1 * b).to(v0.dtype), False


def gradient(anchors: list[float], position: float) -> float:
    """The value at ``position`` in [0, 1] of anchors spread evenly over [0, 1]."""
    if len(anchors) == 1:
        return anchors[0]
    scaled = position * (len(anchors) - 1)
    low = min(int(scaled), len(anchors) - 2)
    return anchors[low] + (scaled - low) * (anchors[low + 1] - anchors[low])


def t_for(name: str, rules: float | list[Rule], layers: int) -> float:
    if isinstance(rules, int | float):
        return float(rules)
    match = _LAYER.search(name)
    position = int(match.group(1)) / max(layers - 1, 1) if match else 0.0
    for rule in rules:
        if rule.filter is None or rule.filter in name:
            return gradient(rule.value if isinstance(rule.value, list) else [rule.value], position)
    raise BadInputError(
        f"merge: t: no rule covers parameter {name!r}; end with a rule without a filter"
    )


def run(config: Config, ctx: StageContext) -> dict:
    from transformers import AutoModelForCausalLM

    base_path = model_source(ctx, config.base)
    other_path = model_source(ctx, config.other)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    other = AutoModelForCausalLM.from_pretrained(other_path, dtype="auto").state_dict()
    merged, fallbacks, used = {}, 0, []
    layers = base.config.num_hidden_layers
    first_of: dict[int, str] = {}  # storage -> the first name of a tied tensor
    for name, tensor in base.state_dict().items():
        if name not in other or other[name].shape != tensor.shape:
            raise BadInputError(
                f"merge: {config.other} has no parameter {name!r} of shape "
                f"{tuple(tensor.shape)}; SLERP needs one architecture"
            )
        tied = first_of.setdefault(tensor.data_ptr(), name)
        if tied != name:
            # Tied embeddings (lm_head is embed_tokens): merged once, at the input
            # embedding's t, as mergekit treats a tied lm_head as an alias. Merging the
            # alias with its own t would overwrite the shared tensor.
            if other[name].data_ptr() != other[tied].data_ptr():
                raise BadInputError(
                    f"merge: {config.base} ties {name!r} to {tied!r} and {config.other} does "
                    "not; SLERP needs one architecture"
                )
            merged[name] = merged[tied]
            continue
        t = t_for(name, config.t, layers)
        merged[name], linear = slerp(t, tensor, other[name])
        fallbacks += linear
        used.append(t)
    base.load_state_dict(merged)
    base.save_pretrained(ctx.out_dir / "model", safe_serialization=True)
    load_tokenizer(base_path).save_pretrained(ctx.out_dir / "model")
    ctx.log(0, tensors=len(used), linear_fallbacks=fallbacks)
    return {
        "tensors": len(used),
        "linear_fallbacks": fallbacks,
        "t_mean": sum(used) / len(used),
        "t_min": min(used),
        "t_max": max(used),
    }
