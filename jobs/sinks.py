"""Where a stage's metrics and sample answers go besides its JSON lines: TensorBoard event
files in the stage's output (always), an MLflow tracking server when
``MLFLOW_TRACKING_URI`` is set, Weights & Biases when ``WANDB_PROJECT`` is set.

Every stage logs through ``StageContext.log`` and ``StageContext.samples``; they reach
each sink here. The sinks are told only metric names and numbers, sample text, the stage's
config (which the secrets rules keep free of credentials), the run and stage names and the
manifest: never the environment.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from jobs.secrets import redact

TENSORBOARD = "tensorboard"  # the folder of event files in a stage's output


class Sink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, step: int, tag: str, text: str) -> None: ...

    def flush(self) -> None: ...

    def finish(self, manifest: Path | None, status: str) -> None:
        """The stage ended: FINISHED with its manifest, KILLED (stopped to be resumed: a
        retryable exit) or FAILED without."""


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a record (its step and time are the axes, not metrics)."""
    return {
        key: float(value)
        for key, value in values.items()
        if key not in ("step", "time")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """Sample answers as a Markdown table (TensorBoard's text tab renders it)."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    keys = list(dict.fromkeys(k for row in rows for k in row if k != "step"))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def masked(config: Any) -> Any:
    """The config as the sinks get it. The config rules refuse a credential in a config;
    as a second lock, the value of any secret-named variable of this environment, or a
    URL's user information, is masked in its text values."""
    if isinstance(config, dict):
        return {key: masked(value) for key, value in config.items()}
    if isinstance(config, list):
        return [masked(value) for value in config]
    return redact(config) if isinstance(config, str) else config


def mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts a param or metric key (letters, digits, ``_-. /:``, at
    most 250 characters): one data source or C-RLFT class named otherwise (``pairs(v2)``)
    would make the server refuse the whole batch, and the stage lose its tracking. A name
    that had to change carries a hash of itself, so two (``pairs(v2)``, ``pairs[v2]``)
    never write one key."""
    key = re.sub(r"[^/\w.\- :]", "_", name)
    # nor an absolute path or one with empty or ".." parts (MLflow's path_not_unique)
    key = "/".join(part if part not in ("", ".", "..") else "_" for part in key.split("/"))
    if key == name and len(key) <= 250:
        return key
    return f"{key[:241]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A (masked) stage config as MLflow parameters, ``train.learning_rate`` style."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = str(value)[:500]
    return out


class TensorBoardSink:
    """Event files under ``<output>/tensorboard``, written by PyTorch's own SummaryWriter.
    ``tensorboard --logdir`` on a run folder shows each stage as a run of one experiment."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        shutil.rmtree(log_dir, ignore_errors=True)  # a previous attempt's, on this node
        self._open()

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=30)

    def restart(self) -> None:
        """An empty log again: a resumed attempt replays the records it keeps, so the
        event files hold each step once, like metrics.jsonl."""
        self.writer.close()
        shutil.rmtree(self.log_dir, ignore_errors=True)
        self._open()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, manifest: Path | None, status: str) -> None:  # noqa: ARG002
        self.writer.close()  # the event files are part of the output


class MLflowSink:
    """One MLflow run per pipeline run (found by its tag, made by the first stage that
    needs it) and a nested run per stage, in the experiment ``MLFLOW_EXPERIMENT_NAME``
    (default ``kuberlhf``). A retried stage goes on in its nested run. Metrics are sent in
    batches when the stage syncs its progress, so a slow server slows no step."""

    def __init__(
        self, stage: str, run: str, config: dict[str, Any], config_hash: str, key: str
    ) -> None:
        from mlflow.tracking import MlflowClient

        # MLflow's own defaults (7 retries with back-off, 120 s) would hold a training step
        # for minutes while a server is down; a user's settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kuberlhf"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        self.parent = pipeline_run(self.client, experiment_id, run, create=True)
        found = self.client.search_runs(
            [experiment_id],
            # a FINISHED run's output was published: running this config again (the output
            # deleted, or found broken) is a new run, not more steps of that one
            filter_string=(
                f"tags.`kuberlhf.run` = '{run}' and tags.`kuberlhf.stage` = '{stage}' "
                f"and tags.`kuberlhf.key` = '{key}' and attributes.status != 'FINISHED'"
            ),
            max_results=1,
        )
        # The steps a killed attempt sent after its checkpoint come again, the same: sent
        # once. Only an earlier attempt's steps: this one logs several records at one step
        # (training, then evaluation), and a flush between them must not drop the second.
        self.sent = self.sent_before = -1
        # At the earlier attempt's last step, which of its keys it sent (it may have been
        # killed between a step's training and evaluation records), read when first needed
        self.sent_at_last: dict[str, bool] = {}
        if found:
            self.run_id = found[0].info.run_id
            self.sent = int(found[0].data.tags.get("kuberlhf.sent_step", -1))
            self.sent_before = self.sent
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(
                experiment_id,
                run_name=stage,
                tags={
                    "mlflow.parentRunId": self.parent,
                    "kuberlhf.run": run,
                    "kuberlhf.stage": stage,
                    "kuberlhf.config_hash": config_hash,
                    "kuberlhf.key": key,  # config and inputs
                },
            ).info.run_id
            params = sorted(flat_params(masked(config)).items())
            from mlflow.entities import Param

            for first in range(0, len(params), 100):  # the server's limit per batch
                batch = params[first : first + 100]
                self.client.log_batch(
                    self.run_id, params=[Param(mlflow_key(k), v) for k, v in batch]
                )
        self.pending: list[Any] = []

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step < self.sent_before:
            return
        keys = {mlflow_key(k): value for k, value in values.items()}
        if step == self.sent_before:
            keys = {k: value for k, value in keys.items() if not self._sent_last(k)}
        now = int(time.time() * 1000)
        self.pending += [Metric(k, value, now, step) for k, value in keys.items()]

    def _sent_last(self, key: str) -> bool:
        """Whether the earlier attempt sent ``key`` at its last step."""
        if key not in self.sent_at_last:
            history = self.client.get_metric_history(self.run_id, key)
            self.sent_at_last[key] = any(m.step == self.sent_before for m in history)
        return self.sent_at_last[key]

    def text(self, step: int, tag: str, text: str) -> None:
        self.flush()
        self.client.log_text(self.run_id, text, f"{tag}/step-{step:08d}.md")

    def flush(self) -> None:
        if not self.pending:
            return
        for first in range(0, len(self.pending), 1000):
            self.client.log_batch(self.run_id, metrics=self.pending[first : first + 1000])
        self.sent = max(self.sent, max(m.step for m in self.pending))
        self.client.set_tag(self.run_id, "kuberlhf.sent_step", str(self.sent))
        self.pending = []

    def finish(self, manifest: Path | None, status: str) -> None:
        self.flush()
        if manifest is not None:
            self.client.log_artifact(self.run_id, str(manifest))
        self.client.set_terminated(self.run_id, status)


def pipeline_run(client, experiment_id: str, run: str, create: bool) -> str | None:
    """The id of the MLflow run of pipeline run ``run``."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`kuberlhf.run` = '{run}' and tags.`kuberlhf.kind` = 'pipeline'",
        max_results=1,
    )
    if found:
        if create and found[0].info.status != "RUNNING":
            # the pipeline run again (`rlhf run` of the same file goes on in its run)
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    if not create:
        return None
    return client.create_run(
        experiment_id, run_name=run, tags={"kuberlhf.run": run, "kuberlhf.kind": "pipeline"}
    ).info.run_id


def end_pipeline_run(run: str, succeeded: bool) -> None:
    """Close the pipeline's MLflow run when ``rlhf run`` ends (the stages leave it open)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(
        os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kuberlhf"
    )
    if experiment is None:
        return
    if parent := pipeline_run(client, experiment.experiment_id, run, create=False):
        client.set_terminated(parent, "FINISHED" if succeeded else "FAILED")


class WandbSink:
    """A W&B run per stage, grouped by the pipeline run; ``WANDB_MODE=offline`` writes it
    under ``WANDB_DIR`` for a later ``wandb sync``."""

    def __init__(
        self,
        stage: str,
        run: str,
        config: dict[str, Any],
        config_hash: str,
        key: str,
        lineage: str = "",
    ) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ["WANDB_PROJECT"],
            group=run,
            job_type=stage,
            name=f"{run}-{stage}",
            # A retried attempt goes on in its run (the lineage is the interrupted one's); a
            # finished config run again gets a run of its own: W&B drops steps below a run's
            # last, so in the old run every step of the new one would be lost. (MLflow asks
            # its server whether a run finished; an offline W&B client cannot.)
            id=f"{run}-{stage}-{key[:8]}-{lineage}".rstrip("-"),
            resume="allow",
            # the pods' root file system is read-only; the scratch volume is TMPDIR
            dir=os.environ.get("WANDB_DIR") or tempfile.gettempdir(),
            config=masked(config),
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: text}, step=step)

    def flush(self) -> None:
        pass  # the W&B service process sends as it goes

    def finish(self, manifest: Path | None, status: str) -> None:
        if manifest is not None:
            # a copy in the run's own folder: `save` links a file from elsewhere, and the
            # work folder may be gone when an offline run is synced
            copy = Path(shutil.copy(manifest, Path(self.run.dir) / manifest.name))
            self.run.save(str(copy), base_path=self.run.dir, policy="now")
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def open_sinks(
    out_dir: Path,
    stage: str,
    config: dict[str, Any],
    config_hash: str,
    key: str,
    lineage: str = "",
) -> list[Sink]:
    """The sinks a stage logs to: TensorBoard always, the others where configured;
    ``lineage`` names the run of the config that an attempt belongs to (W&B's run id)."""
    run = os.environ.get("KUBERLHF_RUN") or "run"
    sinks: list[Sink] = [TensorBoardSink(out_dir / TENSORBOARD)]
    for variable, kind in (("MLFLOW_TRACKING_URI", MLflowSink), ("WANDB_PROJECT", WandbSink)):
        if not os.environ.get(variable):
            continue
        try:
            extra = {"lineage": lineage} if kind is WandbSink else {}
            sinks.append(kind(stage, run, config, config_hash, key, **extra))
        except Exception as exc:  # noqa: BLE001 - a tracking server never fails a stage
            print(
                f"{stage}: warning: {variable} is set but {kind.__name__} could not start "
                f"({type(exc).__name__}: {redact(str(exc))[:300]}); logging without it",
                file=sys.stderr,
                flush=True,
            )
    return sinks
