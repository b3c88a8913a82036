"""The GPU benchmark's comparisons, from the figures its children print (`make bench-gpu`
runs for minutes on a GPU before it reaches them, so they are checked here)."""

from __future__ import annotations

import sys

from bench.gpu import IMPLEMENTATIONS, ratios, run_child


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


def test_generate_compares_the_steady_state_after_the_compile_too():
    entry = figures("generate", "generation_tokens_per_s", (100.0, 150.0, 200.0))
    for impl, steady in (("dynamic", 110.0), ("static", 165.0), ("compiled", 440.0)):
        entry[impl]["steady_generation_tokens_per_s"] = steady
    assert ratios("generate", entry) == {
        "static_over_dynamic_generation": 1.5,
        "compiled_over_dynamic_generation": 2.0,  # with the one-time compile
        "static_over_dynamic_steady_generation": 1.5,
        "compiled_over_dynamic_steady_generation": 4.0,
    }


def test_an_implementation_that_failed_is_left_out_of_the_comparisons():
    sft = figures("sft", "tokens_per_s", (200.0, 300.0, 100.0, 150.0))
    sft["trl"] = {"error": "exit 1: CUDA out of memory"}
    assert ratios("sft", sft) == {"ours_over_plain": 2.0, "compiled_over_plain": 3.0}
    ppo = figures("ppo", "generation_tokens_per_s", (100.0, 150.0, 400.0))
    ppo["compiled"] = {"error": "timed out after 900 s"}
    assert ratios("ppo", ppo) == {"static_over_dynamic_generation": 1.5}


def test_each_child_gives_its_figures_or_its_error_and_leaves_no_outputs(tmp_path):
    (tmp_path / "actor").mkdir()  # an input made before the children: kept
    writes = "import pathlib, sys; d = pathlib.Path(sys.argv[1]); (d / 'out').mkdir(); "
    (tmp_path / "done").write_text("")  # made before: kept too
    found = run_child(
        [
            sys.executable,
            "-c",
            writes + "(d / 'f').write_text('x'); print('{\"a\": 1}')",
            str(tmp_path),
        ],
        tmp_path,
        timeout=60,
    )
    assert found == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actor", "done"]
    failed = run_child(
        [sys.executable, "-c", writes + "sys.exit('no GPU memory left')", str(tmp_path)],
        tmp_path,
        60,
    )
    assert failed["error"].startswith("exit 1") and "no GPU memory left" in failed["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actor", "done"]
    slow = run_child([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, timeout=1)
    assert slow == {"error": "timed out after 1 s"}


def test_trl_trains_in_the_precision_ours_does(tmp_path):
    """TRL's configs default to bf16 (autocast, on the CPU too) and our stages to fp32: the
    CPU comparisons compared two precisions until TRL was told."""
    from trl import DPOConfig, RewardConfig, SFTConfig

    from bench.common import trl_arguments
    from jobs.engine import EngineConfig

    assert EngineConfig().precision == "fp32"
    for config_class in (SFTConfig, RewardConfig, DPOConfig):
        config = config_class(**trl_arguments(tmp_path, 4, 10, 128, 1e-4))
        assert not config.bf16 and not config.fp16 and not config.gradient_checkpointing


def test_each_side_counts_its_median_run_and_keeps_every_run():
    from bench.common import median_runs

    runs = {
        "ours": [{"tokens_per_s": 300.0}, {"tokens_per_s": 100.0}, {"tokens_per_s": 200.0}],
        "trl": [{"tokens_per_s": 50.0, "steps": 1}, {"tokens_per_s": 70.0, "steps": 2}],
    }
    figures = median_runs(runs)
    assert figures["ours"] == {"tokens_per_s": 200.0, "runs_tokens_per_s": [300, 100, 200]}
    assert figures["trl"] == {"tokens_per_s": 50.0, "steps": 1, "runs_tokens_per_s": [50, 70]}


def test_the_gpu_figures_are_a_parts_own_or_none():
    """An H100 PCIe has its own peak and bandwidth, not the SXM part's; a part not listed
    (a GH200) gets no MFU or decode floor rather than another's."""
    from bench.gpu import gpu_limits

    assert gpu_limits("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert gpu_limits("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert gpu_limits("NVIDIA H200") == (989e12, 4.8e12)
    assert gpu_limits("NVIDIA GH200 480GB") == (None, None)


def test_mfu_counts_the_parameters_a_tokens_matmuls_use(tiny):
    """Not the input embedding (a lookup), and for a reward model its score head, not an LM
    head it does not have."""
    from transformers import AutoModelForCausalLM

    from bench.gpu import matmul_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    hidden = model.config.hidden_size
    assert matmul_parameters(tiny / "model") == total - embedding
    assert matmul_parameters(tiny / "model", "reward") == total - embedding - head + hidden


def test_both_sides_count_tokens_over_time_after_the_warm_up():
    """Ours: windows of one size after the first, tokens over time (their harmonic mean, not
    a median that would drop only our slow windows); TRL: a timed step's tokens the average
    collated batch's (one batch is collated ahead of the steps)."""
    import pytest

    from bench.common import TrainerClock
    from bench.gpu import steady_rate

    windows = [{"tokens_per_s": r} for r in (10.0, 100.0, 100.0, 25.0)]
    assert steady_rate(windows) == pytest.approx(3 / (1 / 100 + 1 / 100 + 1 / 25))
    clock = TrainerClock(skip_steps=1)
    clock._steps, clock._batches, clock.tokens, clock.seconds = 4, 5, 500, 3.0
    assert clock.tokens_per_s == pytest.approx(100 * 3 / 3.0)
    with pytest.raises(ValueError, match="no timed step"):
        _ = TrainerClock(skip_steps=5).tokens_per_s
