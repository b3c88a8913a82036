"""The win rate evaluate reports: ties, answers alike, and its bootstrap interval."""

from __future__ import annotations

import pytest

from jobs.evaluate import win_rate


def test_ties_and_answers_alike_count_half():
    # a win, a loss, equal scores, and one answer given by both models that the scorer
    # (two batches, bf16) scored a hair apart
    candidate, baseline = [3.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.001]
    rate, _, _ = win_rate(candidate, baseline, seed=0, same=[False, False, False, True])
    assert rate == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert win_rate(candidate, baseline, seed=0)[0] == pytest.approx(1.5 / 4)


def test_the_interval_is_a_bootstrap_over_prompts():
    # 7 wins in 10: the 2.5% and 97.5% points of Binomial(10, 0.7) / 10 are 0.4 and 1.0
    candidate, baseline = [1.0] * 7 + [0.0] * 3, [0.5] * 10
    rate, low, high = win_rate(candidate, baseline, seed=3)
    assert rate == pytest.approx(0.7)
    assert 0.3 <= low <= 0.5 and 0.9 <= high <= 1.0, (low, high)
    assert win_rate(candidate, baseline, seed=3) == (rate, low, high)  # seeded
    assert win_rate([1.0] * 5, [0.0] * 5, seed=0) == (1.0, 1.0, 1.0)  # no doubt left


def test_no_eval_prompts_is_a_clear_error(tmp_path):
    """A data stage run with eval_fraction 0 wrote an empty eval split: named, not a
    ZeroDivisionError from the win rate."""
    from jobs import evaluate
    from jobs.contract import StageConfig, run_stage
    from jobs.errors import BadInputError

    def empty_prompts(config, ctx) -> dict:  # a finished data output, as stages read it
        (ctx.out_dir / "prompts").mkdir()
        (ctx.out_dir / "prompts" / "eval.jsonl").write_text("")
        return {}

    run_stage("data", StageConfig(output=str(tmp_path / "data")), empty_prompts, tmp_path / "d")
    config = evaluate.Config(
        output=str(tmp_path / "eval"),
        prompts=str(tmp_path / "data"),
        candidate=str(tmp_path / "none"),
        baseline=str(tmp_path / "none"),
        reward_model=str(tmp_path / "none"),
    )
    with pytest.raises(BadInputError, match=r"prompts/eval\.jsonl: no prompts to evaluate on"):
        run_stage("evaluate", config, evaluate.run, workdir=tmp_path / "w")
