"""The artifact store: the same interface over a local folder and S3 over HTTP."""

from __future__ import annotations

import os

import pytest

from jobs import store
from jobs.errors import BadInputError, TransientError


def make_model_dir(root):
    """A model-shaped folder: a multi-megabyte weights file (multipart) and small files."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "model.safetensors").write_bytes(os.urandom(6 * 1024 * 1024 + 17))
    (root / "model" / "config.json").write_text('{"hidden_size": 64}')
    (root / "model" / "tokenizer.json").write_text('{"version": "1.0"}')
    return root / "model"


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store" / "run" / "model")
    monkeypatch.setenv("KUBERLHF_S3_MULTIPART_MB", "5")  # the smallest part S3 allows
    bucket = request.getfixturevalue("s3_env")
    store.reset_clients()
    return f"{bucket}/run/model"


def test_directory_round_trip_keeps_every_byte(tmp_path, target):
    source = make_model_dir(tmp_path / "src")

    sent = store.upload_dir(source, target)
    back = store.download_dir(target, tmp_path / "back")

    assert sorted(f.path for f in sent) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [f.path for f in store.list_files(target)] == sorted(f.path for f in sent)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert store.sha256_file(back / name) == store.sha256_file(source / name)


def test_s3_upload_of_a_large_file_is_multipart(s3_env, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("KUBERLHF_S3_MULTIPART_MB", "5")
    store.reset_clients()
    source = make_model_dir(tmp_path / "src")
    store.upload_dir(source, f"{s3_env}/m")

    bucket = s3_env.removeprefix("s3://")
    head = boto3.client("s3").head_object(Bucket=bucket, Key="m/model.safetensors")
    # S3 ETags of multipart objects end in -<number of parts>.
    assert head["ETag"].strip('"').endswith("-2")


def test_bytes_exist_and_delete(target):
    uri = store.join(target, "a/b.txt")
    assert not store.exists(uri)
    store.write_text(uri, "hello")
    assert store.exists(uri) and store.read_text(uri) == "hello"
    store.delete(target)
    assert store.list_files(target) == []


def test_unreachable_endpoint_is_transient_with_a_clear_message(s3_env, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("KUBERLHF_S3_MAX_ATTEMPTS", "2")
    store.reset_clients()
    with pytest.raises(TransientError, match="cannot reach S3 endpoint http://127.0.0.1"):
        store.list_files(f"{s3_env}/x")


def test_missing_credentials_is_a_user_error(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store.reset_clients()
    with pytest.raises(BadInputError, match="S3 credentials missing: set AWS_ACCESS_KEY_ID"):
        store.list_files(f"{s3_env}/x")


def test_half_given_credentials_are_refused(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store.reset_clients()
    with pytest.raises(BadInputError, match="set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        store.exists(f"{s3_env}/x")


def test_missing_bucket_is_a_user_error(s3_env):
    with pytest.raises(BadInputError, match="NoSuchBucket"):
        store.list_files("s3://no-such-bucket-here/x")


def test_settings_never_show_secrets(s3_env):
    settings = store.S3Settings()
    assert "test-secret-key" not in repr(settings)
    assert "test-secret-key" not in str(settings.model_dump())


def test_an_upload_s3_refuses_is_a_bad_input_not_a_traceback(s3_env, tmp_path):
    """upload_file wraps the service's answer in S3UploadFailedError; a missing bucket is
    the user's to fix (exit 65), like every other S3 call's."""
    from jobs.errors import BadInputError

    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 100)
    with pytest.raises(BadInputError, match="S3 refused the request: NoSuchBucket"):
        store.upload_file(source, "s3://no-such-bucket-for-kuberlhf/run/f.bin")
    store.upload_file(source, f"{s3_env}/run/f.bin")  # the same call into a real bucket
    assert store.read_bytes(f"{s3_env}/run/f.bin") == b"x" * 100


def test_an_object_gone_while_being_read_is_worth_a_retry(s3_env, tmp_path):
    """Named by a manifest or a listing a moment before, then deleted (its stage publishing
    again): a retry, not a traceback."""
    from jobs.errors import TransientError

    with pytest.raises(TransientError, match=r"run/gone\.bin: gone from S3 while being read"):
        store.read_bytes(f"{s3_env}/run/gone.bin")
    with pytest.raises(TransientError, match="gone from S3"):
        store.download_file(f"{s3_env}/run/gone.bin", tmp_path / "gone.bin")


def test_a_download_is_hashed_in_the_files_order_as_its_parts_land(tmp_path, monkeypatch):
    """s3transfer writes a ranged download's parts at their offsets as they arrive: the
    checksum is taken in the file's order all the same, without reading the file back; a
    part written again (a retried request, which may carry other bytes) or too much
    waiting out of order leaves it to a read of the finished file, never to a wrong sum."""
    import hashlib
    import random

    data = os.urandom(40_000)
    parts = [(at, data[at : at + 3000]) for at in range(0, len(data), 3000)]
    reads = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path: reads.append(path) or real(path))

    def download(order, again=(), limit=store._HashedWrites.EARLY_LIMIT):
        monkeypatch.setattr(store._HashedWrites, "EARLY_LIMIT", limit)
        path = tmp_path / f"f{len(reads)}-{random.random()}"
        with open(path, "wb") as handle:
            target = store._HashedWrites(handle)
            for at, piece in [*order, *again]:
                target.seek(at)
                target.write(piece)
        return target.hexdigest(path), path

    shuffled = random.Random(0).sample(parts, len(parts))
    digest, path = download(shuffled)
    assert digest == hashlib.sha256(data).hexdigest() and reads == []

    # written again below the hashed end, with other bytes: the sum is the file's
    digest, path = download(parts, again=[(0, b"x" * 3000)])
    assert digest == real(path) != hashlib.sha256(data).hexdigest() and reads == [path]
    digest, path = download(shuffled, limit=5000)  # too much waiting: read back
    assert digest == hashlib.sha256(data).hexdigest() and reads[-1] == path
    # written again ahead of the hashed end: a longer write over an early part, then a
    # shorter one at its own offset (the file holds y where the early part was)
    ahead = [parts[3], (parts[2][0], b"y" * 6000), (parts[2][0], b"z" * 3000), *parts[:2]]
    digest, path = download(ahead + parts[4:])
    assert digest == real(path) and reads[-1] == path


def test_a_download_of_many_parts_finishes_when_s3transfer_skips_its_size_probe(
    s3_env, tmp_path, monkeypatch
):
    """Under AWS_RESPONSE_CHECKSUM_VALIDATION=when_required (a usual setting for MinIO or
    Ceph) s3transfer fetches the first part before it knows the size, and that part
    schedules the rest: a target it writes through its in-memory queue (a non-seekable
    one), whose window is ten parts, deadlocked there on the eleventh. Twelve parts come
    down, checksum and bytes right."""
    import hashlib
    import threading

    monkeypatch.setenv("KUBERLHF_S3_MULTIPART_MB", "5")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    store.reset_clients()
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(12 * 5 * 2**20 - 100))
    store.upload_file(source, f"{s3_env}/run/big.bin")
    reads = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path: reads.append(path) or real(path))
    got: list = []
    worker = threading.Thread(
        target=lambda: got.append(store.download_file(f"{s3_env}/run/big.bin", tmp_path / "b")),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=120)
    assert got, "the download did not finish in 120 s"
    want = hashlib.sha256(source.read_bytes()).hexdigest()
    assert reads == []  # hashed as the parts landed, not read back
    assert got == [want] and real(tmp_path / "b") == want
    assert not (tmp_path / "b.part").exists()
