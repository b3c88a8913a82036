"""Each training stage killed at seeded random moments, then restarted on a fresh pod, ends
where an uninterrupted run ends: the same weights and the same metrics. Its inputs and
output live in S3 behind the fault proxy, which also lands the kills at the moments that
matter: during a checkpoint's upload and during the manifest's write.

Each attempt runs on an empty work folder, as a rescheduled pod does. After every kill:
no manifest means no input any stage accepts, and every earlier finished output (the
inputs) is as it was.
"""

from __future__ import annotations

import json
import random
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs import store
from jobs.contract import read_manifest, require_finished
from jobs.errors import EXIT_RETRY, BadInputError
from tests.faults.conftest import SEED, Attempt, configs, noise, record, server_files, timing
from tests.faults.proxy import Rule

pytestmark = pytest.mark.slow


def outputs_equal(baseline: Path, resumed: Path, stage: str) -> None:
    """Weights, metrics, sample answers and TensorBoard curves of two finished outputs,
    equal up to float noise."""
    weights = sorted(p.relative_to(baseline) for p in baseline.rglob("*.safetensors"))
    assert weights, f"{stage}: no weights in the output"
    assert weights == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors"))
    for rel in weights:
        a, b = load_file(str(baseline / rel)), load_file(str(resumed / rel))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)

    def lines(root: Path, name: str) -> list[dict]:
        path = root / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []

    a, b = lines(baseline, "metrics.jsonl"), lines(resumed, "metrics.jsonl")
    assert [m["step"] for m in b] == [m["step"] for m in a], f"{stage}: metrics' steps differ"
    if stage in ("ppo", "grpo"):  # every second iteration, kept across the restarts
        samples = lines(baseline, "samples.jsonl")
        assert [s["step"] for s in samples] == [2, 2, 4, 4, 6, 6]
        a, b = a + samples, b + lines(resumed, "samples.jsonl")
    # TensorBoard's own reader: each step once, as in metrics.jsonl, after any restart
    curves, again = scalars(baseline), scalars(resumed)
    assert curves.keys() == again.keys()
    for tag, values in curves.items():
        assert again[tag] == pytest.approx(values, rel=1e-3, abs=1e-4), (stage, tag)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if timing(key):
                continue
            if isinstance(value, float):
                assert y[key] == pytest.approx(value, rel=1e-3, abs=1e-4), (stage, x["step"], key)
            else:
                assert y[key] == value, (stage, x["step"], key)


def scalars(output: Path) -> dict[str, list[float]]:
    """The curves of the output's event files as TensorBoard reads them, timings left out;
    the steps of each tag are checked to be those of metrics.jsonl, each once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    metrics = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    curves = {}
    for tag in events.Tags()["scalars"]:
        if timing(tag):
            continue
        points = events.Scalars(tag)
        assert [p.step for p in points] == [m["step"] for m in metrics if tag in m], tag
        curves[tag] = [p.value for p in points]
    assert curves, f"{output}: no curves in its event files"
    return curves


def fetch(uri: str, local: Path) -> Path:
    require_finished(uri)
    store.download_dir(uri, local)
    return local


# The moments each stage is killed at, in order, each attempt on a fresh pod; "a|b" is one
# of the two, drawn by the seed. The publish path (the manifest's moments) is the
# contract's, the same code for every stage, so one stage covers it; every training loop
# is stopped at least once mid-run, and whatever the seed each moment kind is met by one
# stage: a step (sft), a checkpoint's upload (grpo), a checkpoint just committed (reward),
# the manifest in flight and just landed (sft). SIGTERM, the graceful path, is drawn for
# PPO, which keeps most client state (and tests/integration/test_ppo.py stops two ranks
# with it); an S3 outage that outlasts the retries stops DPO with exit 75. Every attempt
# but the outage's also meets random S3 faults (``noise``), and the end result is still the
# fault-free run's.
MOMENTS = {
    "sft": ["step", "manifest", "after-manifest"],
    "reward": ["commit"],
    "dpo": ["outage", "step|checkpoint"],
    "ppo": ["sigterm|checkpoint"],
    "grpo": ["checkpoint"],
}


@pytest.mark.parametrize("stage", list(MOMENTS))
def test_killed_at_random_moments_the_stage_ends_as_if_never_interrupted(
    stage, proxy, inputs, s3_env, s3_server, tmp_path
):
    rng = random.Random(f"{SEED}-{stage}")
    config = configs(inputs)[stage]
    before = server_files(s3_server, inputs)
    baseline = {**config, "output": f"{s3_env}/{stage}-straight"}
    # fresh, unlike the attempts: its own string-hash seed (tests/warm.py)
    code, err = Attempt(stage, baseline, tmp_path, "straight", fresh=True).finish()
    assert code == 0, err[-3000:]

    config = {**config, "output": f"{s3_env}/{stage}-killed"}
    out = config["output"]
    last_step = 0  # the last step a killed attempt logged: the next kill comes later
    noisy: Counter = Counter()  # the random faults every attempt met

    for n, moment in enumerate(MOMENTS[stage]):
        moment = rng.choice(moment.split("|"))
        # an outage outlasts the client's retries sooner with two attempts than five
        env = {"KUBERLHF_S3_MAX_ATTEMPTS": "2"} if moment == "outage" else {}
        run = Attempt(stage, config, tmp_path, f"{n}-{moment}", env=env)
        rules, signal_at = [], None
        if moment in ("sigterm", "step"):
            step = rng.randint(last_step + 1, last_step + 2)
            signal_at = signal.SIGTERM if moment == "sigterm" else signal.SIGKILL
        elif moment == "checkpoint":  # the n-th file of a checkpoint in flight
            step = rng.randint(1, 3)
            path = r"-killed/_checkpoints/[0-9a-f]{16}/step-\d+/"
            rules = [Rule("kill", method="PUT|POST", path=path, nth=step)]
        elif moment == "commit":  # a checkpoint just committed, the stage never heard
            step = rng.randint(1, 2)
            path = r"-killed/_checkpoints/[0-9a-f]{16}/step-\d+/COMMIT$"
            rules = [Rule("kill-after", method="PUT", path=path, nth=step)]
        elif moment == "outage":  # S3 answers 503 to every write from a checkpoint on
            step = rng.randint(1, 2)
            path = r"-killed/_checkpoints/[0-9a-f]{16}/step-\d+/"
            rules = [Rule("503", method="PUT|POST", path=path, nth=step, times=10**6)]
        else:  # the manifest in flight, or just landed (the stage never hears)
            kind = "kill" if moment == "manifest" else "kill-after"
            rules = [Rule(kind, method="PUT", path=r"-killed/manifest\.json$", nth=1)]
        if moment != "outage":
            rules += noise()
        proxy.events.clear()
        proxy.set_rules(*rules, action=run.kill)
        if signal_at is not None:
            run.signal_at_step(step, signal_at, rng)
        code, err = run.finish()
        proxy.set_rules()
        noisy.update(e.kind for e in proxy.events if e.kind not in ("kill", "kill-after", "503"))
        last_step = max([last_step, *map(int, re.findall(r'"step": (\d+)', run.stdout))])

        if moment == "sigterm":
            assert code == EXIT_RETRY, err[-3000:]
            saved = re.search(r"checkpoint saved at step (\d+)", err).group(1)
            outcome = f"exit 75, checkpoint at step {saved}"
        elif moment == "outage":
            assert code == EXIT_RETRY, err[-3000:]
            assert "error: s3://" in err and "ServiceUnavailable" in err, err[-2000:]
            outcome = "exit 75 after the client's retries"
        else:
            assert code == -signal.SIGKILL, f"{moment}: {err[-3000:]}"
            outcome = "killed"
        if moment == "after-manifest":
            require_finished(out)  # finished: the manifest and every file it lists
            outcome += "; output finished, the next run skips"
        else:
            assert read_manifest(out) is None, f"{moment}: a manifest without a finished run"
            with pytest.raises(BadInputError, match="not a finished stage output"):
                require_finished(out)
            outcome += "; output unfinished, refused as input"
        assert server_files(s3_server, inputs) == before, f"{moment}: an input changed"
        where = {
            "sigterm": f"SIGTERM after step {step}",
            "step": f"SIGKILL after step {step}",
            "checkpoint": f"SIGKILL, checkpoint file {step} in flight",
            "commit": f"SIGKILL, checkpoint {step} just committed",
            "outage": f"S3 503 on every write from checkpoint file {step}",
            "manifest": "SIGKILL, manifest in flight",
            "after-manifest": "SIGKILL, manifest just landed",
        }[moment]
        record(where, stage, outcome + "; inputs intact")

    committed = [
        int(f.path.split("/")[1].removeprefix("step-"))  # <run key>/step-N/COMMIT
        for f in store.list_files(f"{out}/_checkpoints")
        if f.path.endswith("/COMMIT")
    ]
    run = Attempt(stage, config, tmp_path, "last")
    proxy.events.clear()
    proxy.set_rules(*noise())
    code, err = run.finish()
    proxy.set_rules()
    noisy.update(e.kind for e in proxy.events)
    assert sum(noisy.values()) > 0, "no random fault was injected"
    assert code == 0, err[-3000:]
    if committed and MOMENTS[stage][-1] != "after-manifest":
        assert f"resumed from the checkpoint at step {max(committed)}" in run.stdout
    assert not store.list_files(f"{out}/_checkpoints"), "checkpoints left behind"
    outputs_equal(fetch(baseline["output"], tmp_path / "a"), fetch(out, tmp_path / "b"), stage)
    record(
        "restart after the kills",
        stage,
        "same weights, metrics"
        + (", sample answers" if stage in ("ppo", "grpo") else "")
        + " and TensorBoard curves as uninterrupted",
    )
    faults = ", ".join(f"{n} {kind}" for kind, n in sorted(noisy.items()))
    record(f"random S3 faults in every attempt ({faults})", stage, "retried: same end result")
