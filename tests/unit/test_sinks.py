"""The sinks every stage logs through, on the real contract: W&B's offline run read back
from its own transaction log, a tracking server that is down or refuses costing a warning
(without its credentials) and not the stage, and the progress `rlhf status` and the
submitter show for a running stage."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

from jobs.contract import PROGRESS, STATUS, ProgressLog, StageConfig, run_stage
from pipeline.status import StageStatus, read_progress
from tests.conftest import ROOT

CANARY = "canary-0b7c41d2e9"


def logging_stage(config, ctx) -> dict:
    """A stage body that logs five steps and one set of sample answers."""
    ctx.progress(5)
    for step in range(1, 6):
        ctx.log(step, loss=1.0 / step)
    ctx.samples(5, [{"prompt": "2+2?", "answer": "4", "reward": 1.0, "kl": 0.25}])
    return {"steps": 5}


def wandb_records(path: Path):
    """The records of a W&B run file (LevelDB's log format of W&B protobuf records: the
    SDK has no reader any more, `wandb sync` reads it in its Go core)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, position, chunks = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            break
        chunks += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_wandb(monkeypatch, folder: Path) -> None:
    """W&B's offline mode into ``folder``, for a pipeline run r1."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(folder),
        "WANDB_PROJECT": "kuberlhf-test",
        "WANDB_SILENT": "true",
        "KUBERLHF_RUN": "r1",
    }.items():
        monkeypatch.setenv(name, value)


def test_wandb_offline_run_holds_the_stage_metrics_config_and_samples(tmp_path, monkeypatch):
    offline_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("KUBERLHF_TEST_TOKEN", CANARY)
    # a secret's value in a config (the config rules refuse the usual ways in) is masked
    output = str(tmp_path / "r1" / CANARY / "sft")
    manifest = run_stage("sft", StageConfig(output=output), logging_stage, tmp_path / "w")
    [path] = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    # the manifest, a file of the run's own (not a link into the work folder) that
    # `wandb sync` uploads with it
    saved = path.parent / "files" / "manifest.json"
    assert (
        not saved.is_symlink()
        and saved.read_text() == (tmp_path / "w" / "manifest.json").read_text()
    )
    assert json.loads(saved.read_text())["config_hash"] == manifest.config_hash
    assert CANARY.encode() not in path.read_bytes()
    history, config, run, files = {}, {}, None, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history[items["_step"]] = items
        elif kind == "files":
            files += [f.path for f in record.files.files]
        elif kind == "run":
            run = record.run
            config = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.run.config.update
            }
    assert run.run_id.startswith("r1-sft-") and run.run_group == "r1" and run.job_type == "sft"
    assert config["output"] == output.replace(CANARY, "***") and config["seed"] == 0
    assert [history[s]["loss"] for s in range(1, 6)] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    assert "| 2+2? | 4 | 1 | 0.25 |" in history[5]["samples"]
    assert "manifest.json" in files


def test_wandb_goes_on_in_an_interrupted_run_and_starts_a_new_one_for_a_finished_config(
    tmp_path, monkeypatch
):
    """W&B drops steps below a run's last: a finished config run again (its output
    deleted) logged into its old run would lose every step. A retried attempt goes on in
    the run it was interrupted in; a finished one's re-run gets its own."""
    import shutil

    import pytest

    from jobs.errors import TransientError

    offline_wandb(monkeypatch, tmp_path)
    output = tmp_path / "r1" / "sft"
    config = StageConfig(output=str(output))

    def run_ids() -> list[str]:
        found = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
        return [path.stem.removeprefix("run-") for path in found]

    with pytest.raises(TransientError):
        run_stage("sft", config, failing_stage(TransientError("node drained")), tmp_path / "w1")
    run_stage("sft", config, logging_stage, tmp_path / "w2")
    interrupted, retried = run_ids()
    assert retried == interrupted
    shutil.rmtree(output)  # the user deletes the output and runs the pipeline again
    run_stage("sft", config, logging_stage, tmp_path / "w3")
    again = [i for i in run_ids() if i != interrupted]
    assert len(again) == 1 and again[0].startswith("r1-sft-")


def test_a_tracking_server_that_is_down_costs_a_warning_not_the_stage(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://someone:hunter2-secret@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    manifest = run_stage(
        "sft", StageConfig(output=str(tmp_path / "out")), logging_stage, tmp_path / "w"
    )
    assert manifest.metrics["steps"] == 5
    err = capfd.readouterr().err
    assert "MLFLOW_TRACKING_URI is set but MLflowSink could not start" in err
    assert "hunter2-secret" not in err
    # the event files are there all the same, in the manifest
    assert any(f.path.startswith("tensorboard/events.out.tfevents.") for f in manifest.files)


def test_status_shows_the_step_the_time_elapsed_and_an_estimate_of_the_time_left(tmp_path):
    output = str(tmp_path / "run" / "sft")
    log = ProgressLog("sft", StageConfig(output=output), tmp_path / "out", sync_s=1e9)
    log.total, log.started = 100, 1000.0
    for step, at in ((10, 1100.0), (20, 1120.0), (30, 1140.0)):  # 2 s a step after the first
        log.log({"step": step, "time": at, "loss": 1.0 / step})
    log.sync()
    status = json.loads((tmp_path / "run" / "sft" / PROGRESS / STATUS).read_text())
    assert status["step"] == 30 and status["total"] == 100

    progress = read_progress(output, now=1150.0)
    assert progress.step == 30 and progress.elapsed_s == 150.0
    assert progress.remaining_s == 70 * 2.0 - 10  # 70 steps to go, 10 s of them spent
    line = StageStatus("sft", "started", output, progress.metrics, progress=progress).line()
    assert line.startswith("step 30/100 (30%), 2m30s elapsed, about 2m10s left; loss=0.03333")
    # a resumed attempt times its own steps only (the restart's loading is not a step)
    log.continue_from(20)
    log.started = 2000.0
    log.log({"step": 21, "time": 2060.0, "loss": 0.05})
    log.log({"step": 25, "time": 2068.0, "loss": 0.04})
    log.sync()
    again = read_progress(output, now=2068.0)
    assert again.step == 25 and again.remaining_s == 75 * 2.0
    assert read_progress(str(tmp_path / "run" / "other")) is None


def failing_stage(error: Exception, synced: bool = True):
    """A stage body that logs three steps, pushes its progress (unless not ``synced``), then
    fails with ``error``."""

    def run(config, ctx) -> dict:
        ctx.progress(10)
        for step in range(1, 4):
            ctx.log(step, loss=1.0 / step)
        if synced:
            ctx.metrics.sync()
        raise error

    return run


def test_a_stage_that_ends_on_an_error_is_shown_failed_or_interrupted_with_its_reason(tmp_path):
    import pytest

    from jobs.errors import BadInputError, TransientError
    from pipeline.status import mark_given_up, run_status

    run = tmp_path / "run"
    names = ("bad", "flaky", "early")
    stages = [{"name": n, "stage": "sft", "output": str(run / n), "needs": []} for n in names]
    run.mkdir()
    described = {"name": "p", "run_id": "run", "run_uri": str(run), "stages": stages}
    (run / "run.json").write_text(json.dumps(described))
    for name, error, synced in (
        ("bad", BadInputError("data/train.jsonl row 7: field <prompt> is missing"), True),
        ("flaky", TransientError("s3://b/x: S3 error SlowDown after retries"), True),
        ("early", BadInputError("no such model"), False),
    ):
        with pytest.raises(type(error)):
            run_stage(name, StageConfig(output=str(run / name)), failing_stage(error, synced))

    bad, flaky, early = run_status(str(run))
    assert bad.state == "failed"
    # what the submitter puts on the Job (kuberlhf.io/progress): a new value for the new state
    from pipeline.backends.kubernetes import progress_text

    key, text = progress_text(bad.output)
    assert key == (3, bad.metrics["time"], "failed") and len(text) <= 250
    assert text.startswith("failed at step 3/10 (30%) after ") and text.endswith("| loss=0.3333")
    # the clock stopped when the attempt ended: read a day later, the same time
    later = read_progress(bad.output, now=time.time() + 86400)
    assert later.elapsed_s == bad.progress.elapsed_s < 86400  # not counting the day since
    assert re.fullmatch(
        r"failed at step 3/10 \(30%\) after \d+s: BadInputError: data/train\.jsonl row 7: "
        r"field <prompt> is missing; loss=0\.3333",
        bad.line(),
    ), bad.line()
    assert flaky.state == "started"  # its pod is retried, from its newest checkpoint
    assert flaky.line().startswith("interrupted at step 3/10 (30%) after ")
    reason = "(retried from its newest checkpoint): TransientError: s3://b/x: S3 error"
    assert reason in flaky.line()
    assert flaky.progress.remaining_s is None
    # its next attempt dies of a bug before its own first sync: the status it finds says so
    with pytest.raises(RuntimeError):
        run_stage(
            "flaky", StageConfig(output=flaky.output), failing_stage(RuntimeError("oops"), False)
        )
    again = read_progress(flaky.output)
    assert again.state == "interrupted" and again.error == "RuntimeError: oops"
    # the submitter gives up retrying: failed for good, with its reason
    mark_given_up(flaky.output, "gave up after 3 attempts (exit code 1)")
    given_up = {s.name: s for s in run_status(str(run))}["flaky"]
    assert given_up.state == "failed"
    assert given_up.line().endswith(": gave up after 3 attempts (exit code 1); loss=0.3333")
    # an attempt that fails before its first push leaves the store as it was
    assert early.state == "pending" and not (run / "early").exists()

    from pipeline.report import write_report

    page = write_report(str(run), tmp_path / "page.html").read_text()
    assert '<g class="stage failed"><rect' in page and "failed at step 3</text>" in page
    assert "field &lt;prompt&gt; is missing" in page and "<prompt>" not in page


def test_the_local_backend_marks_a_stage_it_gives_up_on_as_failed(tmp_path):
    from types import SimpleNamespace

    import pytest

    from jobs.errors import TransientError
    from pipeline.backends import StageFailed, run_with_retries

    output = str(tmp_path / "run" / "sft")
    with pytest.raises(TransientError):  # a first attempt that synced, then lost S3
        run_stage("sft", StageConfig(output=output), failing_stage(TransientError("s3 away")))
    assert read_progress(output).state == "interrupted"
    stage = SimpleNamespace(name="sft", output=output, spec=SimpleNamespace(retries=2))
    the_plan = SimpleNamespace(run_uri=str(tmp_path / "run"))
    attempts = []
    with pytest.raises(StageFailed, match="gave up after 3 attempts"):
        run_with_retries(the_plan, stage, "sft", print, lambda: attempts.append(1) or 75)
    assert len(attempts) == 3
    given_up = read_progress(output)
    assert (
        given_up.state == "failed" and given_up.error == "gave up after 3 attempts (exit code 75)"
    )


def test_a_stage_stopped_by_rlhf_cancel_is_not_started_again(tmp_path):
    """The container backend's cancel stops the container as a pod is stopped: the stage
    checkpoints and exits 75, which is no reason to start it again (it was, up to
    ``retries`` times, and the run ended on 75 instead of the cancel's 130)."""
    from types import SimpleNamespace

    import pytest

    from pipeline.backends import StageFailed, mark_cancelled, run_with_retries
    from pipeline.watch import EXIT_CANCELLED

    stage = SimpleNamespace(
        name="sft", output=str(tmp_path / "run" / "sft"), spec=SimpleNamespace(retries=2)
    )
    the_plan = SimpleNamespace(run_uri=str(tmp_path / "run"))
    attempts = []

    def cancelled_while_running() -> int:
        attempts.append(1)
        mark_cancelled(the_plan)
        return 75

    with pytest.raises(StageFailed, match="cancelled") as failed:
        run_with_retries(the_plan, stage, "sft", print, cancelled_while_running)
    assert failed.value.exit_code == EXIT_CANCELLED and len(attempts) == 1


def test_a_stage_that_ends_without_its_manifest_fails_the_run_with_a_nonzero_code(tmp_path):
    import pytest

    from pipeline.backends import StageFailed, run_in_order
    from pipeline.config import plan
    from tests.conftest import pipeline_file

    stages = {"sft": {"config": {"model": "m", "data": str(tmp_path / "d")}}}
    path = pipeline_file(tmp_path, stages, name="p")
    with pytest.raises(StageFailed, match="without writing its manifest") as failed:
        run_in_order(plan(str(path)), None, print, lambda stage, head: None)
    assert failed.value.exit_code != 0


def test_the_report_of_a_run_in_progress_shows_each_stage_as_it_stands(tmp_path):
    from pipeline.report import write_report

    run = tmp_path / "runs" / "r2"
    stages = [
        {"name": "sft", "stage": "sft", "output": str(run / "sft"), "needs": []},
        {"name": "ppo", "stage": "ppo", "output": str(run / "ppo"), "needs": ["sft"]},
        {
            "name": "evaluate",
            "stage": "evaluate",
            "output": str(run / "evaluate"),
            "needs": ["ppo"],
        },
    ]
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps({"name": "p", "run_id": "r2", "run_uri": str(run), "stages": stages})
    )
    run_stage("sft", StageConfig(output=str(run / "sft")), logging_stage, tmp_path / "w")
    live = ProgressLog("ppo", StageConfig(output=str(run / "ppo")), tmp_path / "out", sync_s=1e9)
    live.total = 30
    for step in (1, 2, 3):
        live.log({"step": step, "time": 1000.0 + step, "reward_mean": 0.1 * step})
    live.sample(3, [{"prompt": "p?", "answer": "<b>a</b>", "reward": 0.3, "kl": 0.1}])
    live.sync()

    page = write_report(str(run), tmp_path / "page.html").read_text()
    states = dict(
        (name, state)
        for state, name in re.findall(r'<g class="stage (\w+)">.*?<text[^>]*>([^<]+)</text>', page)
    )
    assert states == {"sft": "finished", "ppo": "started", "evaluate": "pending"}
    assert "step 3/30 (10%)" in page  # the running stage's progress, in graph and table
    assert "&lt;b&gt;a&lt;/b&gt;" in page and "<b>a</b>" not in page  # answers are escaped
    assert page.count("<svg") >= 3  # the graph and the curves of sft and of ppo so far


def test_mlflow_keeps_every_record_of_a_step_and_an_earlier_attempts_steps_once(
    tmp_path, monkeypatch
):
    """Training and evaluation log at one step, with a flush between them (the sync every
    15 s can fall there); a retried attempt sends again only what its predecessor had not."""
    from mlflow.tracking import MlflowClient

    from jobs.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder, ./mlruns

    def sink() -> MLflowSink:
        return MLflowSink("sft", "r1", {"lr": 1e-4}, "hash", key="k1")

    first = sink()
    first.scalars(10, {"loss": 1.0})
    first.flush()
    first.scalars(10, {"eval_loss": 2.0})
    first.scalars(20, {"loss": 0.5})
    first.flush()  # killed here: the checkpoint was at step 10

    again = sink()
    assert again.run_id == first.run_id
    for step, values in ((20, {"loss": 0.5}), (20, {"eval_loss": 1.5}), (30, {"loss": 0.25})):
        again.scalars(step, values)
    again.flush()

    client = MlflowClient()

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, key))

    assert history("loss") == [(10, 1.0), (20, 0.5), (30, 0.25)]
    # the killed attempt sent step 20's training record, not its evaluation
    assert history("eval_loss") == [(10, 2.0), (20, 1.5)]


def test_mlflow_sends_a_retried_single_step_stage_once(tmp_path, monkeypatch):
    """A stage that logs everything at step 0 (generate, label, evaluate) killed after
    sending part of it: the retry sends the rest, and what was sent, not again."""
    from mlflow.tracking import MlflowClient

    from jobs.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)

    def sink() -> MLflowSink:
        return MLflowSink("generate", "r1", {}, "hash", key="k1")

    first = sink()
    first.scalars(0, {"train.tokens_per_s": 100.0})
    first.flush()
    first.finish(None, "KILLED")
    again = sink()
    again.scalars(0, {"train.tokens_per_s": 90.0})
    again.scalars(0, {"train.responses": 8.0})
    again.finish(None, "FINISHED")
    client = MlflowClient()
    assert [m.value for m in client.get_metric_history(again.run_id, "train.tokens_per_s")] == [
        100.0
    ]
    assert [m.value for m in client.get_metric_history(again.run_id, "train.responses")] == [8.0]


def test_an_attempt_that_fails_before_it_resumes_keeps_the_earlier_records(tmp_path):
    """Attempt 1 logs steps 1-4 and is preempted after its checkpoint at 3; attempt 2 fails
    before it resumes (the store unreachable while reading its inputs); attempt 3 resumes
    from step 3. The output's metrics are steps 1 to 6, and meanwhile the status shows
    attempt 2's error at attempt 1's step."""
    import pytest

    from jobs.errors import Preempted, TransientError

    config = StageConfig(output=str(tmp_path / "out"))
    status = tmp_path / "out" / PROGRESS / STATUS

    def attempt_1(config, ctx) -> dict:
        ctx.progress(6)
        for step in range(1, 5):
            ctx.log(step, loss=1.0 / step)
        ctx.metrics.sync()  # as every 15 s
        raise ctx.preempted(3)

    def attempt_2(config, ctx) -> dict:
        raise TransientError("s3://bucket/data: the store cannot be reached")

    def attempt_3(config, ctx) -> dict:
        ctx.progress(6)
        ctx.continue_metrics(3)
        for step in range(4, 7):
            ctx.log(step, loss=1.0 / step)
        return {}

    for number, body, error in ((1, attempt_1, Preempted), (2, attempt_2, TransientError)):
        with pytest.raises(error):
            run_stage("sft", config, body, workdir=tmp_path / f"w{number}")
    shown = json.loads(status.read_text())
    assert shown["step"] == 4 and shown["state"] == "interrupted"
    assert "the store cannot be reached" in shown["error"]

    run_stage("sft", config, attempt_3, workdir=tmp_path / "w3")
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_mlflow_runs_a_finished_config_again_in_a_new_run(tmp_path, monkeypatch):
    """A retried attempt goes on in its run; once a run FINISHED (the output published),
    the same config run again (its output deleted) gets a run of its own, whose steps
    are all sent."""
    from mlflow.tracking import MlflowClient

    from jobs.sinks import MLflowSink

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)

    def sink() -> MLflowSink:
        return MLflowSink("sft", "r1", {"lr": 1e-4}, "hash", key="k1")

    killed = sink()
    killed.scalars(1, {"loss": 1.0})
    killed.finish(None, "KILLED")
    finished = sink()
    assert finished.run_id == killed.run_id  # the retry goes on where it was
    finished.scalars(2, {"loss": 0.5})
    finished.finish(None, "FINISHED")

    again = sink()
    assert again.run_id != finished.run_id
    again.scalars(1, {"loss": 3.0})
    again.finish(None, "FINISHED")
    history = MlflowClient().get_metric_history(again.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0)]


def test_the_pipeline_run_reads_running_again_when_its_file_is_run_again(tmp_path, monkeypatch):
    """`rlhf run` ends the pipeline's MLflow run; running the file again goes on in it, and
    while its stages run it must not read as finished."""
    from mlflow.tracking import MlflowClient

    from jobs.sinks import MLflowSink, end_pipeline_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    first = MLflowSink("sft", "r1", {}, "hash", key="k1")
    first.finish(None, "FINISHED")
    end_pipeline_run("r1", succeeded=True)
    client = MlflowClient()
    assert client.get_run(first.parent).info.status == "FINISHED"
    again = MLflowSink("ppo", "r1", {}, "hash", key="k2")
    assert again.parent == first.parent
    assert client.get_run(again.parent).info.status == "RUNNING"


def test_mlflow_takes_keys_named_after_a_users_sources_and_classes(tmp_path, monkeypatch):
    """A data source or C-RLFT class name with characters MLflow refuses in a key (the
    server refuses the whole batch, and the stage dropped its MLflow sink)."""
    from mlflow.tracking import MlflowClient

    from jobs.sinks import MLflowSink, mlflow_key

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    config = {"classes": {"gpt-4 (best)+": {"weight": 1.0}}}
    sink = MLflowSink("crlft", "r1", config, "hash", key="k1")
    sink.scalars(1, {"train.pairs(v2).read": 3.0, "loss": 0.5, "hh//v2.read": 1.0})
    sink.finish(None, "FINISHED")
    run = MlflowClient().get_run(sink.run_id)
    [(param, value)] = run.data.params.items()
    assert param.startswith("classes.gpt-4 _best__.weight-") and value == "1.0"
    assert run.data.metrics.pop("loss") == 0.5  # a key MLflow takes is kept as it is
    # two names that read alike once cleaned keep two keys
    assert len({mlflow_key("pairs(v2)"), mlflow_key("pairs[v2]")}) == 2
    assert sorted(run.data.metrics.values()) == [1.0, 3.0]
    assert {key.rsplit("-", 1)[0] for key in run.data.metrics} == {
        "train.pairs_v2_.read",
        "hh/_/v2.read",
    }


def test_a_re_run_over_a_finished_output_shows_its_own_state(tmp_path):
    """A re-run with another config leaves the old manifest until it publishes: `rlhf
    status` shows the re-run (here failed) rather than the old output as finished."""
    import pytest

    from jobs.errors import BadInputError
    from pipeline.status import run_status

    run = tmp_path / "run"
    stages = [{"name": "sft", "stage": "sft", "output": str(run / "sft"), "needs": []}]
    run.mkdir()
    described = {"name": "p", "run_id": "run", "run_uri": str(run), "stages": stages}
    (run / "run.json").write_text(json.dumps(described))
    run_stage("sft", StageConfig(output=str(run / "sft")), logging_stage)
    [finished] = run_status(str(run))
    assert finished.state == "finished"

    changed = StageConfig(output=str(run / "sft"), seed=7)
    error = BadInputError("data/train.jsonl row 2: field 'prompt' is missing")
    with pytest.raises(BadInputError):
        run_stage("sft", changed, failing_stage(error))
    [shown] = run_status(str(run))
    assert (run / "sft" / "manifest.json").is_file()  # the old output, intact
    assert shown.state == "failed" and "field 'prompt' is missing" in shown.line()
    assert f"a re-run; the output of {finished.manifest.finished_at} stays" in shown.line()


def test_a_stage_stopped_by_rlhf_cancel_is_shown_cancelled_not_retried(tmp_path):
    import pytest

    from jobs.errors import Preempted
    from pipeline.status import CANCELLED, run_status

    run = tmp_path / "run"
    stages = [{"name": "sft", "stage": "sft", "output": str(run / "sft"), "needs": []}]
    run.mkdir()
    described = {"name": "p", "run_id": "run", "run_uri": str(run), "stages": stages}
    (run / "run.json").write_text(json.dumps(described))
    stopped = Preempted("SIGTERM: checkpoint saved at step 3")
    with pytest.raises(Preempted):
        run_stage("sft", StageConfig(output=str(run / "sft")), failing_stage(stopped))
    [shown] = run_status(str(run))
    assert "(retried from its newest checkpoint)" in shown.line()  # a preemption, retried
    (run / CANCELLED).write_text("{}")  # what `rlhf cancel` writes before deleting the Jobs
    [shown] = run_status(str(run))
    assert shown.line().startswith("cancelled at step 3/10 (30%) after ")
    assert "(rlhf cancel; running the file again resumes it)" in shown.line()


def test_deepspeed_comes_without_mlflow_which_stays_importable_for_the_sink():
    """DeepSpeed's autotuner imports MLflow when DeepSpeed is imported (0.9 s of CPU in
    every stage's start); the engine leaves it out, and a sink that logs to MLflow still
    gets it."""
    code = (
        "import sys\n"
        "from jobs.engine import import_deepspeed\n"
        "deepspeed = import_deepspeed()\n"
        "assert deepspeed.initialize, 'no DeepSpeed'\n"
        "print('mlflow' in sys.modules)\n"
        "import mlflow\n"
        "print(callable(mlflow.log_metrics))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == ["False", "True"]  # after DeepSpeed's own log
