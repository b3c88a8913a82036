"""The contract every stage keeps: config, inputs, metrics, checkpoints, manifest last.

A stage output under URI ``out`` is finished only when ``out/manifest.json``
exists and every file it lists is there with the size and sha256 it records.
Run-time state lives beside the finished files under ``out/_progress`` (the
metrics so far) and ``out/_checkpoints`` (resumable training state), so a
re-run never disturbs a finished output until it is ready to replace it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from jobs import dist, store
from jobs.errors import EXIT_BAD_INPUT, BadInputError, Preempted, TransientError
from jobs.secrets import redact
from jobs.sinks import TENSORBOARD, TensorBoardSink, numbers, open_sinks, samples_markdown
from jobs.stages import one_process_only

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"  # sample answers of an RL stage's policy as it trains
STATUS = "status.json"  # under _progress: the newest step, the total, the times
PROGRESS = "_progress"
CHECKPOINTS = "_checkpoints"
COMMIT = "COMMIT"


class StageConfig(BaseModel):
    """Fields every stage has; a stage's config adds its own."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field(description="URI the stage writes its outputs to (s3://... or a path)")
    seed: int = 0

    def config_hash(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class InputRef(BaseModel):
    """What a stage read: a finished stage output (by its manifest) or a plain file or data set."""

    uri: str
    kind: str  # "stage" | "file" | "hub"
    sha256: str


class Manifest(BaseModel):
    stage: str
    config: dict[str, Any]
    config_hash: str
    code_version: str
    image: str | None = None
    inputs: list[InputRef] = []
    files: list[FileEntry] = []
    metrics: dict[str, Any] = {}
    started_at: str
    finished_at: str


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    if env := os.environ.get("KUBERLHF_CODE_VERSION"):
        return env
    try:
        return version("kuberlhf")
    except PackageNotFoundError:
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- reading finished outputs ---------------------------------------------------------------


def _manifest_bytes(uri: str) -> bytes | None:
    path = store.join(uri, MANIFEST)
    if not store.exists(path):
        return None
    try:
        return store.read_bytes(path)
    except FileNotFoundError:  # a local output being published again: unfinished just now
        return None


def _parsed(uri: str, data: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValueError as exc:  # pydantic's ValidationError: cut short, or another schema
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise BadInputError(
            f"{store.join(uri, MANIFEST)}: not a readable manifest ({first[0].strip()}); run "
            "the stage that writes it again"
        ) from None


def read_manifest(uri: str) -> Manifest | None:
    """The manifest at ``uri``, or None when the output is not finished."""
    data = _manifest_bytes(uri)
    return None if data is None else _parsed(uri, data)


def manifest_hash(uri: str) -> str | None:
    data = _manifest_bytes(uri)
    return None if data is None else hashlib.sha256(data).hexdigest()


def require_finished(uri: str, manifest: Manifest | None = None) -> Manifest:
    """The manifest of a finished output (``manifest``, when already read): an unfinished
    one is a user-facing error."""
    manifest = manifest or read_manifest(uri)
    if manifest is None:
        raise BadInputError(
            f"{uri}: not a finished stage output (no {MANIFEST}); "
            "run the stage that writes it first"
        )
    present = {f.path: f.size for f in store.list_files(uri)}
    for entry in manifest.files:
        relative(entry.path, store.join(uri, MANIFEST))
        if present.get(entry.path) != entry.size:
            raise BadInputError(
                f"{uri}/{entry.path}: missing or of the wrong size "
                f"({present.get(entry.path)} bytes, manifest says {entry.size}); "
                "the output is incomplete"
            )
    return manifest


def relative(path: str, where: str) -> str:
    """A file path read from the store (a manifest's or a checkpoint part's list), checked:
    the store is a trust boundary, and a path that is absolute or climbs out with ``..``
    would make a stage write, then load, a file outside its folder."""
    parts = path.replace("\\", "/").split("/")
    if not path or path.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise BadInputError(
            f"{where}: file path {path!r} is not a relative path inside its folder; refused"
        )
    return path


def inside(folder: Path, path: str, where: str) -> Path:
    """``folder / path`` for a checked ``path`` that also resolves inside ``folder`` (a
    symbolic link planted in the folder cannot lead out of it)."""
    target = folder / relative(path, where)
    if not target.resolve().is_relative_to(folder.resolve()):
        raise BadInputError(f"{where}: file path {path!r} resolves outside its folder; refused")
    return target


class Found(NamedTuple):
    """A finished output as read once: its root, the path below it asked for, its manifest
    and the sha256 of the manifest's bytes (what a stage that reads it records)."""

    root: str
    below: str
    manifest: Manifest
    digest: str


def download_finished(
    uri: str, local_dir: Path, only: list[str] | None = None, found: Found | None = None
) -> Manifest:
    """Fetch a finished output (or ``only`` some of its files) and verify every checksum
    against its manifest (``found``'s, when already read)."""
    found = found or find_output(uri, depth=0)
    try:
        manifest = require_finished(uri, found.manifest)
        entries = [f for f in manifest.files if only is None or f.path in only]
        if only is not None and len(entries) != len(only):
            missing = sorted(set(only) - {f.path for f in entries})
            raise BadInputError(f"{uri}: the output has no file {missing[0]}")
        for entry in entries:
            target = inside(local_dir, entry.path, store.join(uri, MANIFEST))
            if target.is_file() and store.sha256_file(target) == entry.sha256:
                continue
            if store.download_file(store.join(uri, entry.path), target) != entry.sha256:
                target.unlink()
                raise BadInputError(f"{uri}/{entry.path}: checksum does not match the manifest")
    except (BadInputError, FileNotFoundError):
        # Files that disagree with the manifest read are the upstream stage publishing
        # again (it deletes its manifest first), not a broken output: read it once more.
        if manifest_hash(uri) != found.digest:
            raise TransientError(
                f"{uri}: the output was published again while it was read; reading it again"
            ) from None
        raise
    return manifest


def find_output(uri: str, depth: int = 4) -> Found:
    """The finished output holding ``uri`` (at it, or up to ``depth`` folders above)."""
    root, below = uri.rstrip("/"), []
    for _ in range(depth + 1):
        data = _manifest_bytes(root)
        if data is not None:
            manifest = require_finished(root, _parsed(root, data))
            digest = hashlib.sha256(data).hexdigest()
            return Found(root, "/".join(reversed(below)), manifest, digest)
        head, sep, leaf = root.rpartition("/")
        if not sep or not head or head.endswith(":/") or head == "s3:":
            break
        root = head
        below.append(leaf)
    raise BadInputError(
        f"{uri}: not inside a finished stage output (no {MANIFEST} at it or above it); "
        "run the stage that writes it first"
    )


# --- the run of one stage ----------------------------------------------------------------


class RecordLog:
    """A JSON-lines file of the output (metrics.jsonl, samples.jsonl) written as the stage
    goes; its copy under ``_progress`` is what a resumed attempt continues from."""

    def __init__(self, local: Path, remote: str, create: bool = True) -> None:
        self.local, self.remote = local, remote
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.local.unlink(missing_ok=True)  # a previous attempt's, on this node
        if create:
            self.local.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.local, "a") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def push(self) -> None:
        if self.local.is_file():
            store.upload_file(self.local, self.remote)

    def continue_from(self, step: int) -> list[dict[str, Any]]:
        """Start from the records a previous attempt pushed, up to ``step`` (its checkpoint)."""
        if not store.exists(self.remote):
            return []
        kept = [
            record
            for line in store.read_text(self.remote).splitlines()
            if line.strip() and (record := json.loads(line)).get("step", 0) <= step
        ]
        self.local.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        return kept


class ProgressLog:
    """Rank 0's record of the stage as it goes: metrics.jsonl, samples.jsonl and the sinks
    (TensorBoard always; MLflow, W&B where configured), pushed to ``<output>/_progress``
    every ``sync_s`` seconds with ``status.json`` (step, total, times) for ``rlhf status``
    and the submitter."""

    def __init__(
        self,
        stage: str,
        config: StageConfig,
        out_dir: Path,
        sync_s: float = 15.0,
        key: str | None = None,
    ):
        self.stage, self.out_dir, self.sync_s = stage, out_dir, sync_s
        self.remote = store.join(config.output, PROGRESS)
        self.metrics = RecordLog(out_dir / METRICS, store.join(self.remote, METRICS))
        self.samples = RecordLog(out_dir / SAMPLES, store.join(self.remote, SAMPLES), create=False)
        name = config.output.rstrip("/").rsplit("/", 1)[-1] or stage
        # A tracking run is this config on these inputs: a re-run on changed inputs (the
        # config, holding their URIs, hashes the same) gets a run of its own.
        key = key or run_key(config)
        self.key, self.lineage = key[:16], self._lineage(key[:16])
        self.sinks = open_sinks(
            out_dir, name, config.model_dump(mode="json"), config.config_hash(), key, self.lineage
        )
        self.total: int | None = None
        self.started = time.time()
        self.resumed_from = 0
        self.first: tuple[int, float] | None = None  # this attempt's first step and its time
        self.last: dict[str, Any] = {}
        # The first push waits sync_s: a stage that fails at once leaves the store untouched.
        self._last_sync = time.monotonic()
        self._synced = False
        # Whether this attempt has taken the progress over (resumed it, or logged): before
        # that, its empty files must not replace an earlier attempt's records.
        self._taken_over = False

    def _lineage(self, key: str) -> str:
        """The interrupted attempt's token where the store shows one of this config (this
        attempt goes on with its run), else a new one: the progress is cleared when an
        output is published, so a finished config run again starts a lineage of its own."""
        path = store.join(self.remote, STATUS)
        if store.exists(path):
            status = json.loads(store.read_text(path))
            if status.get("key") == key and status.get("lineage"):
                return status["lineage"]
        return secrets.token_hex(4)

    def log(self, record: dict[str, Any]) -> None:
        self._taken_over = True
        self.metrics.write(record)
        step = record.get("step", 0)
        self._each("scalars", step, numbers(record))
        if self.first is None and step > self.resumed_from:
            self.first = (step, record["time"])
        self.last = record
        self._maybe_sync()

    def sample(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._taken_over = True
        for row in rows:
            self.samples.write({"step": step, **row})
        self._each("text", step, "samples", samples_markdown(rows))
        self._maybe_sync()

    def _maybe_sync(self) -> None:
        if time.monotonic() - self._last_sync > self.sync_s:
            self.sync()

    def sync(self, state: str = "running", error: str | None = None) -> None:
        self.metrics.push()
        self.samples.push()
        self._each("flush")
        events = self.out_dir / TENSORBOARD
        if events.is_dir():
            remote = store.join(self.remote, TENSORBOARD)
            sent = store.upload_dir(events, remote)
            store.prune(remote, {f.path for f in sent})  # an earlier attempt's event files
        status = {
            "stage": self.stage,
            "step": self.last.get("step", self.resumed_from),
            "total": self.total,
            "started": round(self.started, 3),
            "resumed_from": self.resumed_from,
            "first": self.first,
            "time": self.last.get("time", round(time.time(), 3)),  # of the newest step
            "metrics": self.last,
            "state": state,
            "key": self.key,
            "lineage": self.lineage,
        }
        if state != "running":
            status |= {"ended": round(time.time(), 3), "error": error}
        store.write_text(store.join(self.remote, STATUS), json.dumps(status))
        self._last_sync = time.monotonic()
        self._synced = True

    def end(self, exc: BaseException) -> None:
        """The attempt ends on ``exc``: a stage shown as running (by this attempt or an
        earlier one) is shown as failed, for a bad config or input (exit 65, never
        retried), or else as interrupted (exit 75 or a bug: the pod is retried, from its
        newest checkpoint), with the reason and its clock stopped; the tracking runs end as
        FAILED or KILLED."""
        retried = isinstance(exc, Preempted | TransientError | KeyboardInterrupt)
        for_good = getattr(exc, "exit_code", None) == EXIT_BAD_INPUT
        self._mark_ended("failed" if for_good else "interrupted", exc)
        self.finish(None, "KILLED" if retried else "FAILED")

    def _mark_ended(self, state: str, exc: BaseException) -> None:
        """Only where the store shows the stage as running: a stage that fails before its
        first sync leaves the store as it was. The store may be what failed: then the
        warning is all there is."""
        reason = redact(str(exc)).strip().splitlines()
        error = f"{type(exc).__name__}: {reason[0][:300]}" if reason else type(exc).__name__
        path = store.join(self.remote, STATUS)
        try:
            if not self._synced and not store.exists(path):
                return
            if self._taken_over:
                self.sync(state, error)
                return
            # ended before it resumed: an earlier attempt's records and step stay
            ended = {"state": state, "ended": round(time.time(), 3), "error": error}
            store.write_text(path, json.dumps(json.loads(store.read_text(path)) | ended))
        except Exception as again:  # noqa: BLE001 - the stage's own error is the one to raise
            print(
                f"{self.stage}: warning: the progress could not be marked as ended "
                f"({type(again).__name__}: {redact(str(again))[:300]})",
                file=sys.stderr,
                flush=True,
            )

    def continue_from(self, step: int) -> None:
        """A resumed attempt: the records up to ``step`` again, in every sink that keeps
        its own files (the servers have them already)."""
        self.resumed_from, self.first, self._taken_over = step, None, True
        metrics = self.metrics.continue_from(step)
        samples = self.samples.continue_from(step)
        self.last = metrics[-1] if metrics else {}
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                sink.restart()
                for record in metrics:
                    sink.scalars(record.get("step", 0), numbers(record))
                for at in sorted({s["step"] for s in samples}):
                    sink.text(
                        at, "samples", samples_markdown([s for s in samples if s["step"] == at])
                    )

    def close_files(self) -> None:
        """Finish the files the sinks write into the output, before it is published."""
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                sink.finish(None, "FINISHED")

    def finish(self, manifest: Path | None, status: str) -> None:
        self._each("finish", manifest, status)

    def _each(self, method: str, *args: Any) -> None:
        """Call every sink; a tracking server that fails is dropped with a warning and the
        stage goes on (a dashboard never costs a GPU run). The event files are the output's
        and fail like any other file."""
        for sink in list(self.sinks):
            if isinstance(sink, TensorBoardSink):
                getattr(sink, method)(*args)
                continue
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # noqa: BLE001 - whatever the client raises
                self.sinks.remove(sink)
                print(
                    f"{self.stage}: warning: {type(sink).__name__} stopped "
                    f"({type(exc).__name__}: {redact(str(exc))[:300]}); "
                    f"the metrics are still in {METRICS} and {TENSORBOARD}/",
                    file=sys.stderr,
                    flush=True,
                )


class StageContext:
    """What a stage's ``run`` is handed: where to write, how to read inputs, log and checkpoint."""

    def __init__(
        self, stage: str, config: StageConfig, workdir: Path, key: str | None = None
    ) -> None:
        self.stage, self.config, self.workdir = stage, config, workdir
        self.out_dir = workdir / "output"
        self.inputs: dict[str, InputRef] = {}
        self.stop_requested = False
        # A run resumes only its own checkpoints: those of this config on these inputs. An
        # interrupted run of another config (a changed learning rate, re-made data) leaves
        # its own beside them, for that config to resume, until an output is published.
        keyed = (key or run_key(config))[:16]
        self.checkpoints = Checkpoints(
            store.join(config.output, CHECKPOINTS, keyed), workdir / "checkpoints"
        )
        self.metrics = ProgressLog(stage, config, self.out_dir, key=key) if dist.is_main() else None
        # The stage's start-up until its first step: issue 11 measured about 35 s at 1.3B
        # parameters, with nothing to say where it went. Recorded in the manifest.
        self.began, self.fetching = time.monotonic(), 0.0
        self.startup: dict[str, float] = {}

    @contextmanager
    def _fetch(self) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.fetching += time.monotonic() - began

    # inputs -------------------------------------------------------------------------

    def input_dir(self, uri: str, only: list[str] | None = None) -> Path:
        """A finished stage output, or a folder in one, downloaded once per node and verified
        (``only`` these files of it, when given)."""
        # Read once, by rank 0, for every rank: an upstream stage published again meanwhile
        # can neither give two nodes different data nor have the stage record a manifest
        # other than the one whose files it read.
        found: Found | str | None = None
        if dist.is_main():
            try:
                found = find_output(uri)
            except BadInputError as exc:  # every rank stops alike, none left in the broadcast
                found = str(exc)
        found = dist.broadcast_object(found)
        if isinstance(found, str):
            raise BadInputError(found)
        root, sub = found.root, found.below
        local = self.workdir / "inputs" / hashlib.sha256(root.encode()).hexdigest()[:16]
        wanted = [f.path for f in found.manifest.files if not sub or f.path.startswith(sub + "/")]
        if only is not None:
            wanted = [path for path in wanted if path in only]
        if not wanted:
            raise BadInputError(f"{uri}: the output at {root} has no files under {sub!r}")
        with self._fetch():
            if dist.is_node_main():
                download_finished(root, local, only=wanted, found=found)
            dist.barrier()
        self.inputs[root] = InputRef(uri=root, kind="stage", sha256=found.digest)
        return local / sub if sub else local

    def input_file(self, uri: str) -> Path:
        """A file: inside a finished stage output (verified), or a plain local or S3 file."""
        try:
            root, sub, _, _ = find_output(uri)
        except BadInputError:
            root = None
        if root is not None:
            parent, _, name = uri.rstrip("/").rpartition("/")
            path = self.input_dir(parent) / name if sub else None
            if path is None or not path.is_file():
                raise BadInputError(f"{uri}: not a file of the finished output at {root}")
            return path
        digest = None
        if store.is_s3(uri):
            local = self.workdir / "inputs" / hashlib.sha256(uri.encode()).hexdigest()[:16]
            local = local / uri.rsplit("/", 1)[-1]
            with self._fetch():
                if dist.is_node_main():
                    if not store.exists(uri):
                        raise BadInputError(f"{uri}: no such object")
                    # hashed as it arrived: a second read of a large file is start-up time
                    digest = store.download_file(uri, local)
                dist.barrier()
        else:
            local = store.local_path(uri)
            if not local.is_file():
                raise BadInputError(f"{uri}: no such file")
        digest = digest or store.sha256_file(local)
        self.inputs[uri] = InputRef(uri=uri, kind="file", sha256=digest)
        return local

    def input_hub(self, name: str, revision: str | None) -> None:
        """Record a Hugging Face Hub id read by the stage (pinned by revision when given)."""
        ref = f"{name}@{revision or 'main'}"
        self.inputs[ref] = InputRef(uri=ref, kind="hub", sha256=sha256_json(ref))

    # progress -----------------------------------------------------------------------

    def log(self, step: int, **values: float) -> None:
        if self.metrics is None:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.metrics.log(record)
        print(json.dumps({"stage": self.stage, **record}, ensure_ascii=False), flush=True)

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sample answers of the policy at ``step`` (prompt, answer, reward, kl, ...): to
        samples.jsonl and the sinks, so drift and reward hacking can be read as it trains."""
        if self.metrics is not None:
            self.metrics.sample(step, rows)

    def progress(self, total: int, done: int = 0):
        """A progress bar over optimiser steps, on a terminal and on rank 0 only; the total
        also goes to ``_progress/status.json``, for the remaining-time estimate."""
        from tqdm import tqdm

        if self.metrics is not None:
            self.metrics.total = total
        if not self.startup:  # the first step comes next: the stage is set up
            ready = time.monotonic() - self.began
            self.startup = {
                "startup_s": round(ready, 2),
                "startup_inputs_s": round(self.fetching, 2),
            }
            # figures as key=value, as the finished line gives them
            dist.say_once(
                f"{self.stage}: ready for its first step: startup_s={ready:.1f}, "
                f"startup_inputs_s={self.fetching:.1f}"
            )

        return tqdm(
            total=total,
            initial=done,
            desc=self.stage,
            unit="step",
            file=sys.stderr,
            disable=not (dist.is_main() and sys.stderr.isatty()),
        )

    def continue_metrics(self, step: int) -> None:
        if self.metrics is not None:
            self.metrics.continue_from(step)

    def should_stop(self) -> bool:
        """True on every rank once any rank has received SIGTERM."""
        return dist.any_rank(self.stop_requested)

    def preempted(self, step: int) -> Preempted:
        return Preempted(f"{self.stage}: SIGTERM received, checkpoint saved at step {step}")


class Checkpoints:
    """Resumable state under ``<output>/_checkpoints/step-NNNNNNNN``: files first, COMMIT last."""

    def __init__(self, uri: str, local_root: Path, keep: int = 2) -> None:
        self.uri, self.local_root, self.keep = uri, local_root, keep

    def _step_uri(self, step: int) -> str:
        return store.join(self.uri, f"step-{step:08d}")

    def committed(self) -> list[int]:
        steps = []
        for info in store.list_files(self.uri):
            name, _, leaf = info.path.partition("/")
            if leaf == COMMIT and name.startswith("step-"):
                steps.append(int(name.removeprefix("step-")))
        return sorted(steps)

    def latest(self) -> int | None:
        """The newest complete checkpoint, the same answer on every rank."""
        steps = self.committed() if dist.is_main() else None
        steps = dist.broadcast_object(steps)
        return steps[-1] if steps else None

    def local_dir(self, step: int) -> Path:
        return self.local_root / f"step-{step:08d}"

    @contextmanager
    def writing(self, step: int) -> Iterator[Path]:
        """``local_dir(step)`` to write a checkpoint into. A full scratch disk stops the stage
        with the retryable error and a message that says so (torch reports it as an
        unexplained RuntimeError); the half-written folder goes, the checkpoint before it
        stays as it was, locally and in the store."""
        local = self.local_dir(step)
        try:
            yield local
        except (OSError, RuntimeError) as exc:
            if not scratch_full(exc, self.local_root):
                raise
            free = shutil.disk_usage(self.local_root).free
            if dist.is_node_main():  # the node's ranks share the folder
                shutil.rmtree(local, ignore_errors=True)
            raise TransientError(
                f"the scratch disk at {self.local_root} is full ({free // 2**20} MiB free) "
                f"while writing the checkpoint at step {step}: it was not saved, the one "
                "before it is intact; give the pod more ephemeral storage "
                "(or point KUBERLHF_WORKDIR at a larger volume)"
            ) from None

    def save(self, step: int) -> None:
        """Push ``local_dir(step)`` (written by every rank) and commit it; collective."""
        local = self.local_dir(step)
        dist.barrier()
        remote = self._step_uri(step)
        if dist.is_node_main():
            part = [
                FileEntry(
                    path=p.relative_to(local).as_posix(),
                    size=p.stat().st_size,
                    sha256=store.sha256_file(p),
                ).model_dump()
                for p in store.walk_dir(local)
            ]
            store.upload_dir(local, remote)
            node = os.environ.get("GROUP_RANK", os.environ.get("PET_NODE_RANK", "0"))
            store.write_text(store.join(remote, f"PART-{node}.json"), json.dumps(part))
        dist.barrier()
        if dist.is_main():
            # the parts of this run's nodes, not a PART an earlier attempt with more nodes
            # left in the folder
            nodes = dist.world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            parts = [f"PART-{node}.json" for node in range(max(nodes, 1))]
            commit = {"step": step, "time": _now(), "parts": parts}
            store.write_text(store.join(remote, COMMIT), json.dumps(commit))
            for old in self.committed()[: -self.keep]:
                store.delete(self._step_uri(old))
        dist.barrier()
        self.prune_local(keep=step)

    def prune_local(self, keep: int) -> None:
        """Remove this node's local checkpoint folders but ``keep``'s: once a checkpoint is
        committed in the store, scratch need not hold older ones (a large model's checkpoint
        is several times its weights)."""
        if not dist.is_node_main() or not self.local_root.is_dir():
            return
        for folder in self.local_root.glob("step-*"):
            if folder != self.local_dir(keep):
                shutil.rmtree(folder, ignore_errors=True)

    def restore(self, step: int) -> Path:
        """Download checkpoint ``step`` into ``local_dir(step)`` and verify it; collective."""
        local = self.local_dir(step)
        remote = self._step_uri(step)
        if dist.is_node_main():
            commit = json.loads(store.read_text(store.join(remote, COMMIT)))
            # a checkpoint committed before COMMIT named its parts: every PART in the folder
            parts = commit.get("parts") or [
                info.path for info in store.list_files(remote) if info.path.startswith("PART-")
            ]
            entries: list[tuple[FileEntry, str]] = []
            for name in parts:
                part = json.loads(store.read_text(store.join(remote, name)))
                entries += [(FileEntry.model_validate(e), store.join(remote, name)) for e in part]
            if not entries:
                raise BadInputError(f"{remote}: a committed checkpoint without files")
            for entry, where in entries:
                target = inside(local, entry.path, where)
                if target.is_file() and store.sha256_file(target) == entry.sha256:
                    continue
                if store.download_file(store.join(remote, entry.path), target) != entry.sha256:
                    raise BadInputError(f"{remote}/{entry.path}: checkpoint checksum mismatch")
        dist.barrier()
        return local


# --- the lifecycle ---------------------------------------------------------------------


def up_to_date(stage: str, config: StageConfig) -> Manifest | None:
    """The finished manifest when this exact config already ran on these exact inputs."""
    try:
        manifest = read_manifest(config.output)
    except BadInputError as exc:  # ours to write again: the run replaces it
        print(f"{stage}: {exc}; running it", file=sys.stderr, flush=True)
        return None
    if manifest is None or manifest.stage != stage or manifest.config_hash != config.config_hash():
        return None
    for ref in manifest.inputs:
        if current_input_hash(ref) != ref.sha256:
            return None
    try:
        require_finished(config.output)
    except BadInputError:
        return None
    return manifest


def current_input_hash(ref: InputRef) -> str | None:
    if ref.kind == "stage":
        return manifest_hash(ref.uri)
    if ref.kind == "hub":
        return ref.sha256
    if store.is_s3(ref.uri):
        if not store.exists(ref.uri):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return store.download_file(ref.uri, Path(tmp) / "f")
    path = store.local_path(ref.uri)
    return store.sha256_file(path) if path.is_file() else None


def input_hashes(config: StageConfig) -> list[str]:
    """The manifest hashes of the finished outputs the config names (any text value that is
    a local path or S3 URI inside one), sorted: what, besides the config, a stage's
    results depend on. Hub ids and plain files are not outputs and count by the config."""
    found: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and (store.is_s3(value) or os.path.exists(value)):
            try:
                found.add(find_output(value).digest)
            except BadInputError:
                return

    visit(config.model_dump(mode="json", exclude={"output"}))
    return sorted(found)


def scratch_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc``, met while writing below ``path``, is a full disk: the errno says so,
    or (torch's writer keeps no errno) less than 64 MiB is left there."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(path).free < 64 * 2**20
    except OSError:
        return False


def work_root() -> Path:
    """This user's scratch root, ``kuberlhf-<uid>`` (mode 0700) under ``KUBERLHF_WORKDIR`` or
    the temporary folder: another user of the node can neither read a stage's inputs and
    checkpoints there nor plant files for it to load."""
    base = Path(os.environ.get("KUBERLHF_WORKDIR") or tempfile.gettempdir())
    root = base / f"kuberlhf-{os.getuid()}"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = root.lstat()  # a symbolic link planted there is refused, not followed
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise BadInputError(
            f"{root}: the work folder is not a folder of this user's; set KUBERLHF_WORKDIR"
        )
    if info.st_mode & 0o077:
        root.chmod(0o700)
    return root


def run_key(config: StageConfig) -> str:
    """This config on these inputs (their manifests' hashes): what a stage's work folder and
    its tracking runs are keyed by, so a re-run on changed inputs shares neither."""
    return hashlib.sha256(
        json.dumps([config.config_hash(), input_hashes(config)]).encode()
    ).hexdigest()


def default_workdir(stage: str, config: StageConfig, key: str | None = None) -> Path:
    """The stage's local work folder, keyed by ``run_key``: a re-run on changed inputs
    starts from an empty folder, never from files of the old inputs."""
    return work_root() / f"{stage}-{(key or run_key(config))[:16]}"


def accelerator_metrics() -> dict[str, Any]:
    """What this rank's GPU did for the stage: its name and peak memory allocated. A stage
    whose models stayed on the CPU reports 0 GiB, which is how the GPU tests tell."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    used = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else 0.0
    return {"cuda_device": torch.cuda.get_device_name(), "cuda_peak_memory_gib": round(used, 3)}


def publish(ctx: StageContext, metrics: dict[str, Any], started_at: str) -> Manifest:
    """Replace whatever was at the output with what the stage made; the manifest goes last."""
    output = ctx.config.output
    if ctx.metrics is not None:
        ctx.metrics.sync()
        ctx.metrics.close_files()
    store.delete(store.join(output, MANIFEST))  # from here on the output reads as unfinished
    # A previous run's files that this one does not make (event files are named by host,
    # process and time) would sit beside the new ones: TensorBoard would read both.
    made = {path.relative_to(ctx.out_dir).as_posix() for path in store.walk_dir(ctx.out_dir)}
    store.prune(output, made, skip=(PROGRESS + "/", CHECKPOINTS + "/"))
    files = []
    for path in store.walk_dir(ctx.out_dir):
        rel = path.relative_to(ctx.out_dir).as_posix()
        files.append(FileEntry(path=rel, size=path.stat().st_size, sha256=store.sha256_file(path)))
        store.upload_file(path, store.join(output, rel))
    manifest = Manifest(
        stage=ctx.stage,
        config=ctx.config.model_dump(mode="json"),
        config_hash=ctx.config.config_hash(),
        code_version=code_version(),
        image=os.environ.get("KUBERLHF_IMAGE"),
        inputs=list(ctx.inputs.values()),
        files=files,
        metrics=metrics,
        started_at=started_at,
        finished_at=_now(),
    )
    text = manifest.model_dump_json(indent=2)
    (ctx.workdir / MANIFEST).write_text(text)  # for the sinks that keep it as an artifact
    store.write_text(store.join(output, MANIFEST), text)
    return manifest


def claim_output(stage: str, output: str) -> str | None:
    """Why ``output`` is not this stage's to replace (publishing removes everything under it
    that the run did not make), or None: it is empty, a previous output of this stage, or
    holds the progress or checkpoints of one of its runs."""
    files = store.list_files(output)
    if not files:
        return None
    try:
        manifest = read_manifest(output)
    except BadInputError:  # a manifest cut short: a run of a stage, replaced as such
        return None
    if manifest is not None:
        if manifest.stage == stage:
            return None
        return (
            f"{output}: holds the output of a {manifest.stage} stage, which this {stage} stage "
            "would replace; give it an output of its own"
        )
    if any(f.path.startswith((PROGRESS + "/", CHECKPOINTS + "/")) for f in files):
        return None
    return (
        f"{output}: holds {len(files)} files that no stage wrote (no {MANIFEST}, no "
        f"{PROGRESS}/, e.g. {files[0].path}); a stage replaces everything under its output: "
        "give it an empty folder or prefix"
    )


def run_stage(stage: str, config: StageConfig, run_fn, workdir: Path | None = None) -> Manifest:
    """Skip if up to date, else run ``run_fn(config, ctx) -> metrics`` and publish."""
    dist.init()
    finished = up_to_date(stage, config) if dist.is_main() else None
    finished = dist.broadcast_object(finished)
    if finished is not None:
        if dist.is_main():
            # a run killed after its manifest landed left its checkpoints behind
            store.delete(store.join(config.output, CHECKPOINTS))
            clear_progress(config.output)
            print(
                f"{stage}: up to date at {config.output} (config and inputs unchanged); skipped",
                flush=True,
            )
        return finished
    # nothing to do is done in any number of processes; work is not (a chart applied by
    # hand with several processes for a stage that shards nothing)
    if why := one_process_only(stage, dist.world_size()):
        raise BadInputError(why)
    # every rank stops alike when the output is not this stage's to replace
    refused = claim_output(stage, config.output) if dist.is_main() else None
    if dist.broadcast_object(refused) is not None:
        raise BadInputError(refused)

    key = run_key(config)  # reads the inputs' manifests: once, for the folder and the sinks
    ctx = StageContext(stage, config, workdir or default_workdir(stage, config, key), key)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum, frame):  # noqa: ARG001 - the signal API's signature
        ctx.stop_requested = True
        print(
            f"{stage}: SIGTERM received; checkpointing at the next step",
            file=sys.stderr,
            flush=True,
        )

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    started_at = _now()
    try:
        metrics = run_fn(config, ctx)
    except BaseException as exc:
        if ctx.metrics is not None:
            ctx.metrics.end(exc)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    metrics = {**metrics, **accelerator_metrics(), **ctx.startup}
    try:
        dist.barrier()
        manifest = publish(ctx, metrics, started_at) if dist.is_main() else None
        dist.barrier()
        # its checkpoints, and any other config's: they were for the output now replaced
        if dist.is_main():
            store.delete(store.join(config.output, CHECKPOINTS))
    except BaseException as exc:
        if ctx.metrics is not None:
            ctx.metrics.end(exc)
        raise
    if ctx.metrics is not None:
        ctx.metrics.finish(ctx.workdir / MANIFEST, "FINISHED")
        clear_progress(config.output)  # the output has them now
    return dist.broadcast_object(manifest)


def clear_progress(output: str) -> None:
    """Remove the live copy of metrics, samples, status and event files. (The rest of
    ``_progress`` stays: an endpoint's answers cached there are what a re-run with another
    config would otherwise pay for again.)"""
    for name in (METRICS, SAMPLES, STATUS, TENSORBOARD):
        store.delete(store.join(output, PROGRESS, name))
