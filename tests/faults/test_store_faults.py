"""Every operation of the artifact store (all that any stage does with S3) under each fault
the proxy injects: one fault is retried away with the same result as a healthy store; a
fault that persists becomes the retryable error (exit 75), never a traceback or a wrong
answer."""

from __future__ import annotations

import hashlib
import os

import pytest

from jobs import store
from jobs.errors import TransientError
from tests.conftest import direct_client
from tests.faults.conftest import record
from tests.faults.proxy import Rule

# (a plain 503 is handled as 500 and SlowDown are: the proxy offers it, the store tests skip it)
STORE_FAULTS = ("500", "slowdown", "reset", "stall", "truncate", "500-after", "reset-after")


@pytest.fixture
def objects(proxy, s3_server, s3_env, tmp_path, monkeypatch):
    """A bucket with a small and an 11 MiB object (a three-part multipart upload at 5 MiB),
    local files to upload, and a direct client to the server behind the proxy to check
    what landed."""
    monkeypatch.setenv("KUBERLHF_S3_MULTIPART_MB", "5")
    monkeypatch.setenv("KUBERLHF_S3_MAX_ATTEMPTS", "3")
    # shorter stalls than the stage tests' (no training beside), with room for a healthy
    # answer from the in-process server on a loaded machine
    monkeypatch.setenv("KUBERLHF_S3_READ_TIMEOUT", "1.5")
    proxy.stall_s = 2.0
    store.reset_clients()
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(os.urandom(11 * 2**20))
    small.write_bytes(os.urandom(3000))
    store.upload_file(small, f"{s3_env}/in/small")
    store.upload_file(big, f"{s3_env}/in/big")
    direct = direct_client(s3_server)
    return {"root": s3_env, "big": big, "small": small, "direct": direct, "tmp": tmp_path}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def landed(o, key: str) -> str | None:
    """What the server holds at ``key`` (asked directly, not through the proxy)."""
    bucket = o["root"].removeprefix("s3://")
    try:
        return sha(o["direct"].get_object(Bucket=bucket, Key=key)["Body"].read())
    except o["direct"].exceptions.NoSuchKey:
        return None


def downloaded(o, name: str) -> str:
    """The checksum a download reports, where it is that of the file it wrote (its parts
    hashed as they land: a retried part's bytes must be neither hashed nor written twice)."""
    target = o["tmp"] / f"got-{name}"
    reported = store.download_file(f"{o['root']}/in/{name}", target)
    written = store.sha256_file(target)
    return reported if reported == written else f"reported {reported}, wrote {written}"


# Each operation, and what it must come to: the same as on a healthy store.
OPS = {
    "list_files": (
        lambda o: [(f.path, f.size) for f in store.list_files(f"{o['root']}/in")],
        lambda o: [("big", o["big"].stat().st_size), ("small", o["small"].stat().st_size)],
    ),
    "exists": (lambda o: store.exists(f"{o['root']}/in/small"), lambda o: True),
    "read_bytes": (
        lambda o: sha(store.read_bytes(f"{o['root']}/in/small")),
        lambda o: sha(o["small"].read_bytes()),
    ),
    "write_bytes": (
        lambda o: (store.write_bytes(f"{o['root']}/out/w", b"w" * 999), landed(o, "out/w"))[1],
        lambda o: sha(b"w" * 999),
    ),
    "upload_file": (
        lambda o: (store.upload_file(o["small"], f"{o['root']}/out/s"), landed(o, "out/s"))[1],
        lambda o: sha(o["small"].read_bytes()),
    ),
    "upload_file (multipart)": (
        lambda o: (store.upload_file(o["big"], f"{o['root']}/out/b"), landed(o, "out/b"))[1],
        lambda o: sha(o["big"].read_bytes()),
    ),
    "download_file": (
        lambda o: downloaded(o, "small"),
        lambda o: sha(o["small"].read_bytes()),
    ),
    "download_file (ranged)": (
        lambda o: downloaded(o, "big"),
        lambda o: sha(o["big"].read_bytes()),
    ),
    "delete": (
        lambda o: (store.delete(f"{o['root']}/in/small"), landed(o, "in/small"))[1],
        lambda o: None,
    ),
}


READS = {"list_files", "read_bytes", "download_file", "download_file (ranged)"}


def rule(kind: str, name: str, **how) -> Rule:
    # A truncated body needs a body: it is cut from GET answers, the ones that carry data.
    # A download asks for the object's size first (HEAD): its fault goes to the GETs that
    # fetch the bytes, whose retries the checksum taken as they land must survive.
    get = kind == "truncate" or name.startswith("download_file")
    return Rule(kind, method="GET" if get else ".*", **how)


@pytest.mark.parametrize("kind", STORE_FAULTS)
def test_one_fault_on_any_operation_is_retried_to_the_same_result(kind, proxy, objects):
    for name, (operation, expected) in OPS.items():
        if kind == "truncate" and name not in READS:
            continue  # no GET among their requests: no body to truncate
        want = expected(objects)
        proxy.set_rules(rule(kind, name, nth=1))
        got = operation(objects)
        proxy.set_rules()
        assert proxy.events and proxy.events[-1].kind == kind, f"{name}: no {kind} injected"
        proxy.events.clear()
        assert got == want, f"{name} after one {kind}"
        record(f"{kind} on the first request", f"store.{name}", "retried: same result")


@pytest.mark.parametrize("kind", STORE_FAULTS)
def test_a_fault_that_persists_is_the_retryable_error(kind, proxy, objects):
    # a read and a write (a truncated body only comes with a read: then two reads)
    names = ("read_bytes", "download_file (ranged)" if kind == "truncate" else "upload_file")
    for name in names:
        operation, _ = OPS[name]
        proxy.set_rules(rule(kind, name, nth=1, times=1000))
        with pytest.raises(TransientError, match="s3://") as caught:
            operation(objects)
        proxy.set_rules()
        record(f"{kind} on every request", f"store.{name}", f"exit 75: {caught.value}"[:90])
