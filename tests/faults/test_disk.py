"""A scratch disk that fills up while a checkpoint is being written: a clear error, the
retryable exit code, and the checkpoint before it intact, so a rescheduled pod resumes."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from jobs import store
from jobs.errors import EXIT_RETRY
from tests.faults.conftest import Attempt, configs, record
from tests.faults.proxy import Rule

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs of its own, as a pod's emptyDir with a size limit (needs root)."""
    mount = tmp_path / "scratch"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_scratch_disk_during_a_checkpoint_is_retryable_and_keeps_the_last_one(
    proxy, inputs, s3_env, small_disk, tmp_path
):
    config = {**configs(inputs)["sft"], "output": f"{s3_env}/sft"}
    run = Attempt("sft", config, tmp_path, "full", workdir=small_disk)

    def fill() -> None:  # once the step-2 checkpoint has committed, the disk fills up
        free = shutil.disk_usage(small_disk).free
        with open(small_disk / "filler", "wb") as handle:
            handle.write(b"\0" * (free - 256 * 1024))

    proxy.set_rules(
        Rule("act", method="PUT", path=r"_checkpoints/\w+/step-\d+/COMMIT$", nth=1), action=fill
    )
    code, err = run.finish()
    proxy.set_rules()
    assert code == EXIT_RETRY, err[-3000:]
    assert "scratch disk" in err and "is full" in err and "step 4" in err, err[-2000:]
    assert "Traceback" not in err
    # <run key>/step-N/...
    committed = [f.path.split("/", 1)[1] for f in store.list_files(f"{s3_env}/sft/_checkpoints")]
    assert "step-00000002/COMMIT" in committed
    assert not any(path.startswith("step-00000004") for path in committed)
    record("scratch disk full writing a checkpoint", "sft", "exit 75, clear error; last one kept")

    os.unlink(small_disk / "filler")  # a pod with room: resumes from the step-2 checkpoint
    run = Attempt("sft", config, tmp_path, "room", workdir=small_disk)
    code, err = run.finish()
    assert code == 0, err[-3000:]
    assert "resumed from the checkpoint at step 2" in run.stdout
    record("then a pod with room", "sft", "resumed from the checkpoint before; finished")
