"""One artifact store over S3 (any S3-compatible endpoint) and the local file system.

Every stage reads and writes by URI: ``s3://bucket/key/prefix`` or a local path
(``file://`` optional). Whole directories travel with multipart transfers and
sha256 checksums; transient S3 errors are retried with exponential back-off by
botocore's ``standard`` retry mode, and what is still failing after that is
raised as :class:`TransientError` so the stage exits with the retryable code.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.errors import BadInputError, TransientError
from jobs.secrets import check_url

_CHUNK = 1 << 20


class S3Settings(BaseSettings):
    """Where S3 is and who we are there; only ever read from the environment.

    The names are the ones every AWS SDK and every S3-compatible server's docs
    use, so a Kubernetes Secret written for any other tool works here too.
    """

    model_config = SettingsConfigDict(extra="ignore")

    endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    region: str = Field(
        "us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION")
    )
    access_key_id: SecretStr | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    session_token: SecretStr | None = Field(None, validation_alias="AWS_SESSION_TOKEN")
    max_attempts: int = Field(5, validation_alias="KUBERLHF_S3_MAX_ATTEMPTS", ge=1)
    connect_timeout_s: float = Field(5.0, validation_alias="KUBERLHF_S3_CONNECT_TIMEOUT")
    # A stalled answer is abandoned and retried after this long.
    read_timeout_s: float = Field(60.0, validation_alias="KUBERLHF_S3_READ_TIMEOUT", gt=0)
    multipart_threshold_mb: int = Field(16, validation_alias="KUBERLHF_S3_MULTIPART_MB", ge=5)
    # Self-hosted S3 (MinIO, Ceph, the test server) wants path-style addressing.
    addressing_style: str = Field("auto", validation_alias="KUBERLHF_S3_ADDRESSING_STYLE")

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_url(cls, url: str | None) -> str | None:
        try:
            return url and check_url(url)
        except ValueError as exc:  # said without the URL, which would print the credential
            raise BadInputError(f"AWS_ENDPOINT_URL: {exc}") from None


@dataclass(frozen=True)
class FileInfo:
    path: str  # relative to the directory it was listed under, '/'-separated
    size: int


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _HashedWrites:
    """A file that hashes what is written to it in the file's order, as it lands: a
    download's checksum without reading the file a second time (2.7 GB at 1.3B parameters,
    an optimiser checkpoint several times that). s3transfer writes the parts of a ranged
    download at their offsets in the order they arrive (``seek`` then ``write``, one IO
    thread): a write at the hashed end extends the checksum, and the parts that came early
    wait in memory until it reaches them. Where that is not the plain case, the checksum
    is left to a read of the finished file (:meth:`hexdigest`): bytes written again below
    the hashed end (a retried request, which may carry other bytes), or more than
    ``EARLY_LIMIT`` bytes waiting. (Said non-seekable, s3transfer would hand the writes
    over in order through its in-memory queue, but a one-request download's retry
    bypasses that queue, writing its bytes twice, and the queue's window of ten parts
    deadlocks where the first part schedules the rest, as it does under
    ``AWS_RESPONSE_CHECKSUM_VALIDATION=when_required``.)"""

    EARLY_LIMIT = 512 << 20

    def __init__(self, handle) -> None:
        self.handle, self.digest = handle, hashlib.sha256()
        self.at = self.hashed = self.waiting = 0
        self.early: dict[int, bytes] = {}
        self.exact = True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.at = self.handle.seek(offset, whence)
        return self.at

    def write(self, data) -> int:
        start = self.at
        written = self.handle.write(data)
        self.at += written
        if self.exact:
            self._take(start, bytes(data if written == len(data) else data[:written]))
        return written

    def _take(self, start: int, data: bytes) -> None:
        if start < self.hashed or start in self.early:
            self.exact, self.early = False, {}  # written again: read the file at the end
        elif start > self.hashed:
            self.waiting += len(data)
            self.early[start] = data
            if self.waiting > self.EARLY_LIMIT:
                self.exact, self.early = False, {}
        else:
            self.digest.update(data)
            self.hashed += len(data)
            while (ready := self.early.pop(self.hashed, None)) is not None:
                self.waiting -= len(ready)
                self.digest.update(ready)
                self.hashed += len(ready)

    def hexdigest(self, path: Path) -> str:
        """The sha256 of ``path``, the file written through this one once it is closed."""
        if self.exact and not self.early and self.hashed == path.stat().st_size:
            return self.digest.hexdigest()
        return sha256_file(path)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join URI segments with '/', the separator of both S3 keys and POSIX paths."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise BadInputError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
    return bucket, key.strip("/")


# --- the two back-ends -------------------------------------------------------------------


class _Local:
    def list(self, uri: str) -> list[FileInfo]:
        root = local_path(uri)
        if not root.is_dir():
            return []
        return sorted(
            (
                FileInfo(p.relative_to(root).as_posix(), p.stat().st_size)
                for p in root.rglob("*")
                if p.is_file()
            ),
            key=lambda f: f.path,
        )

    def exists(self, uri: str) -> bool:
        return local_path(uri).is_file()

    def read_bytes(self, uri: str) -> bytes:
        return local_path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, target)

    def put_file(self, src: Path, uri: str) -> None:
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp,
            open(src, "rb") as handle,
        ):
            shutil.copyfileobj(handle, tmp, _CHUNK)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, target)

    def get_file(self, uri: str, dst: Path) -> str:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # the kernel's copy, then one read to hash: faster than a copy through Python's
        # buffers that hashes on the way (0.7 s against 1.5-2.3 s for 0.7 GB on the 2-core
        # development machine)
        shutil.copyfile(local_path(uri), dst)
        return sha256_file(dst)

    def delete(self, uri: str) -> None:
        target = local_path(uri)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


MISSING = {"NoSuchKey", "404", "NotFound"}  # the codes S3 answers for an absent object


class _S3:
    def __init__(self, settings: S3Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if (settings.access_key_id is None) != (settings.secret_access_key is None):
            raise BadInputError(
                "S3 credentials: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither"
            )
        self.endpoint = settings.endpoint_url or f"AWS S3 ({settings.region})"
        self.max_attempts = settings.max_attempts
        session = boto3.session.Session(
            aws_access_key_id=_reveal(settings.access_key_id),
            aws_secret_access_key=_reveal(settings.secret_access_key),
            aws_session_token=_reveal(settings.session_token),
            region_name=settings.region,
        )
        if session.get_credentials() is None:
            raise BadInputError(
                "S3 credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(in Kubernetes, from a Secret) for " + self.endpoint
            )
        self.client = session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            config=Config(
                retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                s3={"addressing_style": settings.addressing_style},
            ),
        )
        threshold = settings.multipart_threshold_mb * 1024 * 1024
        self.transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)

    def _call(self, uri: str, fn, *args, **kwargs):
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError as PartRetriesExceededError

        try:
            return fn(*args, **kwargs)
        except (RetriesExceededError, PartRetriesExceededError) as exc:
            # a download read a body cut short (or stalled) on every attempt it makes
            # (download_fileobj raises s3transfer's error, which download_file wraps)
            raise TransientError(f"{uri}: S3 download failed after retries: {exc}") from None
        except S3UploadFailedError as exc:
            # upload_file wraps the service's answer in an error of its own: judge the answer.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, BotoCoreError | ClientError):
                raise self._translated(uri, cause) from None
            code = re.search(r"\((\w+)\)", str(exc))
            raise self._judged(uri, code.group(1) if code else "", 0, None) from None
        except (BotoCoreError, ClientError) as exc:
            raise self._translated(uri, exc) from None

    def _translated(self, uri: str, exc: Exception) -> Exception:
        """An S3 error as the stage's exit code needs it: the user's to fix (65) or worth a
        retry (75); an unknown answer of the service as it came."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return BadInputError(f"{uri}: S3 credentials missing ({exc})")
        if isinstance(exc, EndpointConnectionError):
            return TransientError(f"{uri}: cannot reach S3 endpoint {self.endpoint}: {exc}")
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return self._judged(uri, code, status, exc)
        return TransientError(f"{uri}: S3 transport error: {exc}")

    @staticmethod
    def _judged(uri: str, code: str, status: int, exc: Exception | None) -> Exception:
        if code in {
            "NoSuchBucket",
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "403",
            "InvalidBucketName",
        }:
            return BadInputError(f"{uri}: S3 refused the request: {code}")
        if code in MISSING:
            # listed or named by a manifest a moment ago: its writer is replacing it (an
            # upstream stage run again); a later attempt reads the new one
            return TransientError(f"{uri}: gone from S3 while being read ({code})")
        if exc is None or status >= 500 or code in {"SlowDown", "RequestTimeout", "Throttling"}:
            return TransientError(f"{uri}: S3 error {code or 'on upload'} after retries")
        return exc

    def list(self, uri: str) -> list[FileInfo]:
        bucket, prefix = _split_s3(uri)
        prefix = f"{prefix}/" if prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")

        def collect() -> list[FileInfo]:
            out = []
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append(FileInfo(obj["Key"][len(prefix) :], obj["Size"]))
            return out

        return sorted(self._call(uri, collect), key=lambda f: f.path)

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:  # not there is an answer here, not an error
                if exc.response.get("Error", {}).get("Code") in MISSING:
                    return False
                raise

        return self._call(uri, head)

    def read_bytes(self, uri: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        bucket, key = _split_s3(uri)

        def fetch() -> bytes:
            # botocore retries the request, not the reading of its body: a connection cut
            # mid-body (a truncated answer) is retried here, as s3transfer does for files.
            attempt = 1
            while True:
                response = self.client.get_object(Bucket=bucket, Key=key)
                try:
                    return response["Body"].read()
                except BotoCoreError:
                    if attempt >= self.max_attempts:
                        raise
                    attempt += 1

        return self._call(uri, fetch)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = _split_s3(uri)
        self._call(uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)

    def put_file(self, src: Path, uri: str) -> None:
        bucket, key = _split_s3(uri)
        self._call(uri, self.client.upload_file, str(src), bucket, key, Config=self.transfer)

    def get_file(self, uri: str, dst: Path) -> str:
        bucket, key = _split_s3(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        try:
            with open(tmp, "wb") as handle:
                target = _HashedWrites(handle)
                self._call(
                    uri, self.client.download_fileobj, bucket, key, target, Config=self.transfer
                )
        except BaseException:
            tmp.unlink(missing_ok=True)  # as download_file removed its own
            raise
        os.replace(tmp, dst)
        return target.hexdigest(dst)

    def delete(self, uri: str) -> None:
        bucket, prefix = _split_s3(uri)
        keys = [join(prefix, f.path) for f in self.list(uri)]
        if self.exists(uri):
            keys.append(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(
                uri,
                self.client.delete_objects,
                Bucket=bucket,
                Delete={"Objects": batch, "Quiet": True},
            )


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


@lru_cache(maxsize=1)
def _s3() -> _S3:
    return _S3(S3Settings())


def reset_clients() -> None:
    """Forget the cached S3 client (the environment changed: tests, a new Secret)."""
    _s3.cache_clear()


def _backend(uri: str) -> _Local | _S3:
    return _s3() if is_s3(uri) else _Local()


# --- the interface every stage uses --------------------------------------------------------


def list_files(uri: str) -> list[FileInfo]:
    """Every file below ``uri``, relative paths, sorted."""
    return _backend(uri).list(uri)


def exists(uri: str) -> bool:
    return _backend(uri).exists(uri)


def read_bytes(uri: str) -> bytes:
    return _backend(uri).read_bytes(uri)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    _backend(uri).write_bytes(uri, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(src: Path, uri: str) -> None:
    _backend(uri).put_file(src, uri)


def download_file(uri: str, dst: Path) -> str:
    """Copy ``uri`` to ``dst``; the sha256 of the bytes written (taken as they were)."""
    return _backend(uri).get_file(uri, dst)


def delete(uri: str) -> None:
    """Remove a file or everything below a prefix."""
    _backend(uri).delete(uri)


def prune(uri: str, keep: set[str], skip: tuple[str, ...] = ()) -> None:
    """Delete the files below ``uri`` but those in ``keep`` and those under ``skip``
    (relative paths): what a folder's previous writer left that this one does not make."""
    for info in list_files(uri):
        if info.path not in keep and not info.path.startswith(skip):
            delete(join(uri, info.path))


def walk_dir(local_dir: Path) -> Iterator[Path]:
    yield from sorted(p for p in local_dir.rglob("*") if p.is_file())


def upload_dir(local_dir: Path, uri: str, skip: tuple[str, ...] = ()) -> list[FileInfo]:
    """Copy every file below ``local_dir`` to ``uri``; returns what was sent."""
    sent = []
    for path in walk_dir(local_dir):
        rel = path.relative_to(local_dir).as_posix()
        if rel.startswith(skip):
            continue
        upload_file(path, join(uri, rel))
        sent.append(FileInfo(rel, path.stat().st_size))
    return sent


def download_dir(uri: str, local_dir: Path, only: list[str] | None = None) -> Path:
    """Copy the files below ``uri`` (or just ``only``, relative paths) into ``local_dir``."""
    names = only if only is not None else [f.path for f in list_files(uri)]
    for rel in names:
        download_file(join(uri, rel), local_dir / rel)
    return local_dir
