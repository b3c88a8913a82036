"""Where a PPO iteration's time goes: generation, scoring (actor, reference, critic and
reward forward passes) and training, and generation tokens per second.

The tiny model is made by the project's stages (bootstrap, data, SFT, reward); then PPO
runs ITERATIONS iterations of ROLLOUT prompts and the per-iteration figures are averaged
(the first iteration, which warms caches up, is left out). Run:
``python -m bench.ppo_iteration``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.common import prepare, report

ITERATIONS, ROLLOUT, MINIBATCH, NEW_TOKENS = 11, 32, 16, 48


def main() -> None:
    from jobs import ppo, reward, sft
    from jobs.contract import run_stage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, data = prepare(root)
        run_stage(
            "sft",
            sft.Config(
                output=str(root / "sft"),
                model=str(model),
                data=str(data),
                max_seq_len=128,
                epochs=2,
                train={"learning_rate": 3e-3, "micro_batch_size": 16},
            ),
            sft.run,
            root / "w-sft",
        )
        run_stage(
            "reward",
            reward.Config(
                output=str(root / "rm"),
                model=str(root / "sft/model"),
                data=str(data),
                max_seq_len=160,
                train={"learning_rate": 1e-3, "micro_batch_size": 16},
            ),
            reward.run,
            root / "w-rm",
        )
        config = ppo.Config(
            output=str(root / "ppo"),
            actor=str(root / "sft/model"),
            reward_model=str(root / "rm/model"),
            prompts=str(data),
            iterations=ITERATIONS,
            rollout_batch_size=ROLLOUT,
            minibatch_size=MINIBATCH,
            checkpoint_every=10**6,
            sampling={
                "max_new_tokens": NEW_TOKENS,
                "temperature": 1.0,
                "top_p": 1.0,
                "max_prompt_tokens": 128,
            },
            actor_train={"learning_rate": 2e-4, "micro_batch_size": MINIBATCH},
            critic_train={"learning_rate": 2e-4, "micro_batch_size": MINIBATCH},
        )
        run_stage("ppo", config, ppo.run, root / "w-ppo")
        lines = [json.loads(x) for x in (root / "ppo/metrics.jsonl").read_text().splitlines()]
    steady = [m for m in lines if m.get("step", 0) > 1 and "generation_s" in m]
    parts = {
        k: sum(m[k] for m in steady) / len(steady)
        for k in ("generation_s", "scoring_s", "training_s")
    }
    total = sum(parts.values())
    figures = {
        "iterations_averaged": len(steady),
        "rollout_prompts": ROLLOUT,
        "max_new_tokens": NEW_TOKENS,
        "seconds_per_iteration": round(total, 4),
        **{k: round(v, 4) for k, v in parts.items()},
        **{k.replace("_s", "_share"): round(v / total, 3) for k, v in parts.items()},
        "generation_tokens_per_s": round(
            sum(m["generation_tokens_per_s"] for m in steady) / len(steady), 1
        ),
        "response_length": round(sum(m["response_length"] for m in steady) / len(steady), 1),
    }
    print(
        f"per iteration: {total:.3f} s = generation {parts['generation_s']:.3f} s "
        f"({figures['generation_share']:.0%}) + scoring {parts['scoring_s']:.3f} s "
        f"({figures['scoring_share']:.0%}) + training {parts['training_s']:.3f} s "
        f"({figures['training_share']:.0%}); generation "
        f"{figures['generation_tokens_per_s']:.0f} tokens/s"
    )
    report("ppo_iteration", figures)


if __name__ == "__main__":
    main()
