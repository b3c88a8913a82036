"""SLERP: exact at its ends, on the arc between, linear where it must be, per-layer t."""

from __future__ import annotations

import math

import pytest
import torch

from jobs.merge import Rule, gradient, slerp, t_for


def test_t_zero_and_one_return_the_inputs_exactly():
    a, b = torch.randn(7, 5, dtype=torch.bfloat16), torch.randn(7, 5, dtype=torch.bfloat16)
    assert torch.equal(slerp(0.0, a, b)[0], a)
    assert torch.equal(slerp(1.0, a, b)[0], b)
    assert slerp(0.3, a, b)[0].dtype == torch.bfloat16  # dtype kept


def test_half_way_between_orthogonal_unit_vectors_lies_on_the_arc():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    mid, linear = slerp(0.5, a, b)
    assert not linear
    assert mid.norm().item() == pytest.approx(1.0, abs=1e-6)  # on the unit circle
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    quarter, _ = slerp(0.25, a, b)
    angle = math.degrees(math.acos(float(quarter @ a)))
    assert angle == pytest.approx(22.5, abs=1e-4)  # equal steps of angle


@pytest.mark.parametrize("scale", [2.0, -3.0, 1.0])
def test_colinear_tensors_fall_back_to_linear_without_nan(scale):
    a = torch.randn(64)
    b = scale * a
    out, linear = slerp(0.4, a, b)
    assert linear and not torch.isnan(out).any()
    torch.testing.assert_close(out, 0.6 * a + 0.4 * b)


def test_a_layer_schedule_reaches_the_layers_it_names():
    rules = [
        Rule(filter="attention", value=[0.0, 1.0]),
        Rule(filter="mlp", value=[1.0, 0.0]),
        Rule(value=0.5),
    ]
    assert t_for("gpt_neox.layers.0.attention.dense.weight", rules, 5) == 0.0
    assert t_for("gpt_neox.layers.4.attention.dense.weight", rules, 5) == 1.0
    assert t_for("gpt_neox.layers.2.attention.dense.weight", rules, 5) == 0.5
    assert t_for("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", rules, 5) == 0.75
    assert t_for("gpt_neox.embed_in.weight", rules, 5) == 0.5
    assert gradient([0, 0.5, 0.3, 0.7, 1], 0.5) == 0.3  # mergekit's five anchors


def test_an_all_zero_tensor_interpolates_linearly():
    # mergekit reads it as orthogonal: 0.71 of the other at t = 0.5
    out, linear = slerp(0.5, torch.zeros(4), torch.ones(4))
    assert linear
    torch.testing.assert_close(out, torch.full((4,), 0.5))


def test_a_gradient_without_anchors_is_refused_by_the_config():
    from pydantic import ValidationError

    from jobs.merge import Config

    with pytest.raises(ValidationError, match="at least 1 item"):
        Config(output="o", base="a", other="b", t=[{"value": []}])
