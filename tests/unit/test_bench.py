"""The GPU benchmark's comparisons, from the figures its children print (`make bench-gpu`
runs for minutes on a GPU before it reaches them, so they are checked here)."""

from __future__ import annotations

from bench.gpu import IMPLEMENTATIONS, ratios


def figures(case: str, key: str, rates: tuple[float, ...]) -> dict:
    """An entry of the report as main() fills it: each implementation's child figures."""
    entry: dict = {"micro_batch": 8, "seq": 64}
    for impl, rate in zip(IMPLEMENTATIONS[case], rates, strict=True):
        entry[impl] = {key: rate, "peak_memory_gib": 1.0}
    return entry


def test_training_cases_compare_ours_eager_and_compiled_with_trl_and_the_plain_loop():
    sft = figures("sft", "tokens_per_s", (200.0, 300.0, 100.0, 150.0))
    assert ratios("sft", sft) == {
        "ours_over_trl": 1.333,
        "ours_over_plain": 2.0,
        "compiled_over_trl": 2.0,
        "compiled_over_plain": 3.0,
    }
    dpo = figures("dpo", "tokens_per_s", (90.0, 120.0, 60.0))
    assert ratios("dpo", dpo) == {"ours_over_trl": 1.5, "compiled_over_trl": 2.0}


def test_rollout_cases_compare_the_static_cache_decodes_with_the_dynamic_cache():
    for case in ("ppo", "generate", "evaluate"):
        entry = figures(case, "generation_tokens_per_s", (100.0, 150.0, 400.0))
        assert ratios(case, entry) == {
            "static_over_dynamic_generation": 1.5,
            "compiled_over_dynamic_generation": 4.0,
        }
