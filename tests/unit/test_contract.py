"""The stage contract: manifest last, unfinished outputs never read, re-runs skipped by hash."""

from __future__ import annotations

import json

import pytest

from jobs import contract, store
from jobs.contract import (
    COMMIT,
    Checkpoints,
    StageContext,
    download_finished,
    manifest_hash,
    read_manifest,
    require_finished,
    run_stage,
    up_to_date,
)
from jobs.data import stage as data
from jobs.errors import BadInputError, TransientError
from tests.conftest import FIXTURES


def data_config(output: str, uri: str, **options) -> data.Config:
    return data.Config(
        output=output,
        sources=[{"name": "a", "format": "alpaca", "uri": uri}],
        min_tokens=0,
        dedup_threshold=None,
        eval_fraction=0,
        **options,
    )


@pytest.fixture(params=["local", "s3"])
def out_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env") + "/store"


def test_manifest_lists_every_file_with_size_and_checksum(out_root, tmp_path):
    config = data_config(store.join(out_root, "data"), str(FIXTURES / "alpaca.jsonl"))
    manifest = run_stage("data", config, data.run, workdir=tmp_path / "w")

    assert manifest.stage == "data" and manifest.config_hash == config.config_hash()
    events = [f.path for f in manifest.files if f.path.startswith("tensorboard/")]
    assert len(events) == 1 and events[0].startswith("tensorboard/events.out.tfevents.")
    assert {f.path for f in manifest.files} - set(events) == {
        "sft/train.jsonl",
        "prompts/train.jsonl",
        "metrics.jsonl",
    }
    assert manifest.inputs[0].kind == "file"
    back = download_finished(config.output, tmp_path / "back")
    assert back == manifest
    assert read_manifest(config.output) == manifest


def test_a_download_is_verified_as_it_lands_not_read_again(out_root, tmp_path, monkeypatch):
    """An input (a finished output) and a checkpoint are checked against their recorded
    checksums once: from S3 from the bytes as they arrive, no file read back to hash it (a
    1.3B model's 2.7 GB, an optimiser checkpoint several times that; before, each was read
    back after its download), from a local store each copy read once; a file whose bytes
    differ from the record is still refused."""
    config = data_config(store.join(out_root, "data"), str(FIXTURES / "alpaca.jsonl"))
    manifest = run_stage("data", config, data.run, workdir=tmp_path / "w")
    checkpoints = Checkpoints(store.join(out_root, "_checkpoints"), tmp_path / "local")
    (checkpoints.local_dir(10)).mkdir(parents=True)
    (checkpoints.local_dir(10) / "state.pt").write_bytes(b"state" * 1000)
    checkpoints.save(10)

    hashed = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path: hashed.append(path) or real(path))
    assert download_finished(config.output, tmp_path / "read") == manifest
    restored = Checkpoints(checkpoints.uri, tmp_path / "elsewhere").restore(10)
    assert (restored / "state.pt").read_bytes() == b"state" * 1000
    copies = [tmp_path / "read" / f.path for f in manifest.files]
    copies.append(tmp_path / "elsewhere" / "step-00000010" / "state.pt")
    assert hashed == ([] if store.is_s3(out_root) else copies)
    for entry in manifest.files:
        assert real(tmp_path / "read" / entry.path) == entry.sha256

    # bytes altered in the store (the same size): refused, as they land
    rows = store.join(config.output, "sft/train.jsonl")
    store.write_text(rows, store.read_text(rows).replace("a", "b", 1))
    with pytest.raises(BadInputError, match="sft/train.jsonl: checksum does not match"):
        download_finished(config.output, tmp_path / "again")
    store.write_bytes(store.join(checkpoints.uri, "step-00000010", "state.pt"), b"STATE" * 1000)
    with pytest.raises(BadInputError, match="state.pt: checkpoint checksum mismatch"):
        Checkpoints(checkpoints.uri, tmp_path / "third").restore(10)


def test_a_stage_records_how_long_it_took_to_its_first_step_and_the_fetching_in_it(
    tmp_path, monkeypatch, capsys
):
    """Issue 11 found about 35 s before a 1.3B stage's first step, with nothing to say
    where they went: the stage says, and its manifest keeps, the seconds from its start to
    its first step and the share of them spent fetching and verifying its inputs."""
    import time

    upstream = str(tmp_path / "up")
    run_stage("data", data_config(upstream, str(FIXTURES / "alpaca.jsonl")), data.run, tmp_path)
    real = store.download_file

    def slow(uri, dst):
        time.sleep(0.1)
        return real(uri, dst)

    monkeypatch.setattr(store, "download_file", slow)
    ctx = StageContext("sft", data_config(str(tmp_path / "out"), upstream), tmp_path / "r")
    files = len(read_manifest(upstream).files)
    ctx.input_dir(upstream)
    time.sleep(0.3)  # the models and engines
    ctx.progress(10).close()
    fetched, ready = ctx.startup["startup_inputs_s"], ctx.startup["startup_s"]
    assert 0.1 * files <= fetched and fetched + 0.29 <= ready  # (both rounded to 0.01 s)
    said = capsys.readouterr().out
    assert f"sft: ready for its first step: startup_s={ready:.1f}, startup_inputs_s=" in said
    ctx.progress(10).close()  # a second bar (PPO's inner ones) changes nothing
    assert ctx.startup == {"startup_s": ready, "startup_inputs_s": fetched}


def test_rerun_with_same_config_and_inputs_is_skipped(out_root, tmp_path, capsys):
    config = data_config(store.join(out_root, "data"), str(FIXTURES / "alpaca.jsonl"))
    first = run_stage("data", config, data.run, workdir=tmp_path / "w1")
    second = run_stage("data", config, data.run, workdir=tmp_path / "w2")

    assert second == first
    assert "up to date" in capsys.readouterr().out
    assert not (tmp_path / "w2").exists()  # nothing ran


def test_changed_config_or_input_is_not_skipped(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text((FIXTURES / "alpaca.jsonl").read_text())
    config = data_config(str(tmp_path / "out"), str(source))
    first = run_stage("data", config, data.run, workdir=tmp_path / "w1")

    changed = data_config(str(tmp_path / "out"), str(source), template="raw")
    second = run_stage("data", changed, data.run, workdir=tmp_path / "w2")
    assert second.config_hash != first.config_hash

    source.write_text(source.read_text().splitlines()[0] + "\n")
    third = run_stage("data", changed, data.run, workdir=tmp_path / "w3")
    assert third.inputs[0].sha256 != second.inputs[0].sha256
    assert third.metrics["kept"] == 1


def test_the_work_folder_is_this_users_and_changes_with_the_inputs(tmp_path, monkeypatch):
    import os
    import stat

    from jobs.contract import default_workdir

    monkeypatch.setenv("KUBERLHF_WORKDIR", str(tmp_path / "scratch"))
    source = tmp_path / "a.jsonl"
    source.write_text((FIXTURES / "alpaca.jsonl").read_text())
    run_stage("data", data_config(str(tmp_path / "data"), str(source)), data.run)
    # A later stage's config names the data output; the same config after the data output
    # was re-made from other rows must not get the same work folder (its files would be
    # the old inputs' results).
    downstream = data_config(str(tmp_path / "out"), str(tmp_path / "data" / "sft" / "train.jsonl"))
    before = default_workdir("data", downstream)
    assert default_workdir("data", downstream) == before  # stable for the same inputs
    source.write_text(source.read_text().splitlines()[0] + "\n")
    run_stage("data", data_config(str(tmp_path / "data"), str(source)), data.run)
    after = default_workdir("data", downstream)
    assert after != before and after.parent == before.parent
    root = after.parent
    assert root.name == f"kuberlhf-{os.getuid()}" and root.parent == tmp_path / "scratch"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_stage_killed_mid_upload_leaves_no_manifest(out_root, tmp_path, monkeypatch):
    config = data_config(store.join(out_root, "data"), str(FIXTURES / "alpaca.jsonl"))
    run_stage("data", config, data.run, workdir=tmp_path / "w1")  # a finished earlier output
    changed = data_config(config.output, str(FIXTURES / "alpaca.jsonl"), template="raw")

    real_upload = store.upload_file

    def dying_upload(src, uri):
        if "/_progress/" not in uri:  # the first file of the output itself: the pod dies
            raise KeyboardInterrupt("killed")
        real_upload(src, uri)

    monkeypatch.setattr(store, "upload_file", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        run_stage("data", changed, data.run, workdir=tmp_path / "w2")

    assert read_manifest(config.output) is None
    with pytest.raises(BadInputError, match="not a finished stage output"):
        require_finished(config.output)


def test_an_output_whose_checksum_does_not_match_is_never_read(tmp_path):
    config = data_config(str(tmp_path / "out"), str(FIXTURES / "alpaca.jsonl"))
    run_stage("data", config, data.run, workdir=tmp_path / "w")
    target = tmp_path / "out" / "sft" / "train.jsonl"
    text = target.read_text()
    target.write_text(text.replace("a", "b", 1))  # same size, other bytes

    with pytest.raises(BadInputError, match="sft/train.jsonl: checksum does not match"):
        download_finished(config.output, tmp_path / "read")


def test_an_input_published_again_while_it_is_read(tmp_path, monkeypatch):
    """What a stage downloads and the manifest hash it records (what decides whether its
    output is up to date) come from one reading of the input's manifest."""
    source = tmp_path / "a.jsonl"
    source.write_text((FIXTURES / "alpaca.jsonl").read_text())
    upstream = str(tmp_path / "up")
    run_stage("data", data_config(upstream, str(source)), data.run, workdir=tmp_path / "w1")
    first, first_rows = manifest_hash(upstream), (tmp_path / "up/sft/train.jsonl").read_text()

    def publish_again(*_: object) -> None:
        again = data_config(upstream, str(source), template="raw")
        run_stage("data", again, data.run, workdir=tmp_path / "w2")

    # published again after the stage read the manifest, before it downloaded the files:
    # a retry (the stage reads the new output), not a broken output (exit 65)
    real_download = store.download_file

    def download(uri, dst):
        monkeypatch.setattr(store, "download_file", real_download)
        publish_again()
        return real_download(uri, dst)

    monkeypatch.setattr(store, "download_file", download)
    reader = StageContext("data", data_config(str(tmp_path / "out"), str(source)), tmp_path / "r")
    with pytest.raises(TransientError, match="up: the output was published again while"):
        reader.input_dir(upstream)
    assert manifest_hash(upstream) != first

    # published again just after the download: the stage records the manifest it read
    run_stage("data", data_config(upstream, str(source)), data.run, workdir=tmp_path / "w3")
    first = manifest_hash(upstream)
    real_finished = contract.download_finished

    def finished_then_published(*args, **kwargs):
        got = real_finished(*args, **kwargs)
        publish_again()
        return got

    monkeypatch.setattr(contract, "download_finished", finished_then_published)
    reader = StageContext("data", data_config(str(tmp_path / "out"), str(source)), tmp_path / "s")
    local = reader.input_dir(upstream)
    assert manifest_hash(upstream) != first
    assert (local / "sft/train.jsonl").read_text() == first_rows
    assert reader.inputs[upstream].sha256 == first


@pytest.mark.parametrize("path", ["../../escaped.jsonl", "/tmp/escaped.jsonl", "sft/../../x"])
def test_a_manifest_path_outside_its_output_is_refused(tmp_path, path):
    config = data_config(str(tmp_path / "out"), str(FIXTURES / "alpaca.jsonl"))
    run_stage("data", config, data.run, workdir=tmp_path / "w")
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["path"] = path  # a tampered (or hostile) manifest
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BadInputError, match="manifest.json: file path .* is not a relative path"):
        download_finished(config.output, tmp_path / "read" / "here")
    assert not (tmp_path / "escaped.jsonl").exists() and not (tmp_path / "read").exists()


def test_a_checkpoint_part_path_outside_its_folder_is_refused(tmp_path):
    checkpoints = Checkpoints(str(tmp_path / "store" / "_checkpoints"), tmp_path / "local")
    local = checkpoints.local_dir(10)
    local.mkdir(parents=True)
    (local / "state.pt").write_text("state")
    checkpoints.save(10)
    [part] = (tmp_path / "store" / "_checkpoints" / "step-00000010").glob("PART-*")
    entries = json.loads(part.read_text())
    entries[0]["path"] = "../../../planted.pt"
    part.write_text(json.dumps(entries))
    with pytest.raises(BadInputError, match="PART-.*: file path '../../../planted.pt' is not"):
        Checkpoints(checkpoints.uri, tmp_path / "elsewhere" / "a").restore(10)
    assert not (tmp_path / "planted.pt").exists()


def test_a_downstream_stage_refuses_an_unfinished_input(tmp_path):
    (tmp_path / "half" / "sft").mkdir(parents=True)
    (tmp_path / "half" / "sft" / "train.jsonl").write_text("{}\n")
    config = data_config(str(tmp_path / "out"), str(tmp_path / "half" / "sft" / "train.jsonl"))
    ctx = StageContext("data", config, tmp_path / "w")
    with pytest.raises(BadInputError, match="half: not inside a finished stage output"):
        ctx.input_dir(str(tmp_path / "half"))


def test_checkpoints_without_commit_marker_are_ignored(out_root, tmp_path):
    checkpoints = Checkpoints(store.join(out_root, "_checkpoints"), tmp_path / "local", keep=2)
    for step in (10, 20, 30):
        local = checkpoints.local_dir(step)
        local.mkdir(parents=True)
        (local / "state.pt").write_text(f"state at {step}")
        checkpoints.save(step)
    assert checkpoints.committed() == [20, 30]  # the oldest was pruned

    # A checkpoint whose upload was cut short: data but no commit marker.
    store.write_text(store.join(out_root, "_checkpoints", "step-00000040", "state.pt"), "partial")
    assert checkpoints.latest() == 30

    restored = Checkpoints(checkpoints.uri, tmp_path / "elsewhere").restore(30)
    assert (restored / "state.pt").read_text() == "state at 30"
    commit = json.loads(store.read_text(store.join(checkpoints.uri, "step-00000030", COMMIT)))
    assert commit["step"] == 30


def test_scratch_holds_only_the_newest_committed_checkpoint(tmp_path):
    checkpoints = Checkpoints(str(tmp_path / "store" / "_checkpoints"), tmp_path / "local")
    for step in (10, 20, 30):
        local = checkpoints.local_dir(step)
        local.mkdir(parents=True)
        (local / "state.pt").write_bytes(b"x" * 1000)
        checkpoints.save(step)
        assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [f"step-{step:08d}"]
    assert checkpoints.committed() == [20, 30]  # the store keeps two, scratch one


def test_a_run_of_another_config_does_not_resume_this_ones_checkpoints(tmp_path):
    """An interrupted run leaves checkpoints; the user changes the config (or the inputs are
    made again) and runs the stage: it starts afresh, and the old run's checkpoints stay for
    the old config, whose run resumes them."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    old = data_config(str(tmp_path / "out"), str(source))
    new = old.model_copy(update={"seed": old.seed + 1})
    first = StageContext("data", old, tmp_path / "w1")
    local = first.checkpoints.local_dir(900)
    local.mkdir(parents=True)
    (local / "state.pt").write_text("the old config's step 900")
    first.checkpoints.save(900)

    changed = StageContext("data", new, tmp_path / "w2")
    assert changed.checkpoints.latest() is None
    local = changed.checkpoints.local_dir(100)
    local.mkdir(parents=True)
    (local / "state.pt").write_text("the new config's step 100")
    changed.checkpoints.save(100)  # and it is kept: not pruned as older than step 900
    assert changed.checkpoints.committed() == [100]

    again = StageContext("data", old, tmp_path / "w3")
    assert again.checkpoints.latest() == 900
    restored = again.checkpoints.restore(900)
    assert (restored / "state.pt").read_text() == "the old config's step 900"


def test_a_manifest_cut_short_is_run_again_not_a_crash(tmp_path):
    """A node that died while writing the manifest (or an older schema): the stage runs
    again and replaces it; a stage reading it as input names the file."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "a b c", "input": "", "output": "d e f"}\n')
    config = data_config(str(tmp_path / "out"), str(source))
    run_stage("data", config, data.run, workdir=tmp_path / "w")
    manifest = tmp_path / "out" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(BadInputError, match=r"out/manifest.json: not a readable manifest"):
        read_manifest(str(tmp_path / "out"))
    assert up_to_date("data", config) is None
    run_stage("data", config, data.run, workdir=tmp_path / "w2")
    assert read_manifest(str(tmp_path / "out")).stage == "data"


def test_a_stage_does_not_replace_what_it_did_not_write(tmp_path):
    """Publishing removes everything under the output that the run did not make: an output
    pointed at a folder of other files, or at another stage's output, is refused before
    anything is written, and the files stay."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"instruction": "a b c", "input": "", "output": "d e f"}\n')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    config = data_config(str(tmp_path / "mine"), str(source))
    with pytest.raises(BadInputError, match=r"mine: holds 1 files that no stage wrote"):
        run_stage("data", config, data.run, workdir=tmp_path / "w")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"

    made = data_config(str(tmp_path / "data"), str(source))
    run_stage("data", made, data.run, workdir=tmp_path / "w2")
    with pytest.raises(BadInputError, match=r"data: holds the output of a data stage"):
        run_stage("other", made, lambda config, ctx: {}, workdir=tmp_path / "w3")
    assert read_manifest(str(tmp_path / "data")).stage == "data"


def test_a_checkpoint_restores_only_the_parts_of_the_run_that_committed_it(tmp_path):
    """An earlier attempt with two nodes left a PART-1 (and its files) in the step's folder
    before it died; a one-node run commits that step: its restore takes its own files."""
    checkpoints = Checkpoints(str(tmp_path / "store" / "_checkpoints"), tmp_path / "local")
    folder = tmp_path / "store" / "_checkpoints" / "step-00000010"
    folder.mkdir(parents=True)
    (folder / "rank1.pt").write_text("the other attempt's")
    stale = [{"path": "rank1.pt", "size": 19, "sha256": "0" * 64}]  # and not its sha256
    (folder / "PART-1.json").write_text(json.dumps(stale))
    local = checkpoints.local_dir(10)
    local.mkdir(parents=True)
    (local / "rank0.pt").write_text("this run's")
    checkpoints.save(10)
    restored = Checkpoints(checkpoints.uri, tmp_path / "elsewhere").restore(10)
    assert sorted(p.name for p in restored.iterdir()) == ["rank0.pt"]


def test_a_plain_s3_file_is_read_once_its_checksum_taken_as_it_arrives(
    s3_env, tmp_path, monkeypatch
):
    """Issue 11: start-up time went to copying and hashing inputs. A plain S3 file is hashed
    on its way down, not read a second time after (the manifest still records its sha256)."""
    import hashlib

    source = tmp_path / "rows.jsonl"
    source.write_bytes((FIXTURES / "alpaca.jsonl").read_bytes())
    uri = f"{s3_env}/plain/rows.jsonl"
    store.upload_file(source, uri)
    hashed: list = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path: hashed.append(path) or real(path))
    ctx = StageContext("data", data_config(f"{s3_env}/out", uri), tmp_path / "r")

    local = ctx.input_file(uri)

    assert local.read_bytes() == source.read_bytes()
    assert ctx.inputs[uri].sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert local not in hashed
