"""One URI API over the store: ``file://`` (a local folder, the embedded default) and ``s3://``.

Keys are "/"-separated and relative to the store root. S3 settings fall back to the usual AWS
environment variables and boto3's own credential chain, so AWS and MinIO both work.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

# What only the platform reads (DESIGN.md's store layout): adapters (tenants' included), bases,
# training runs and the tenants' hashed keys. Nothing a request names is ever read from here.
PRIVATE_KEYS = ("adapters/", "models/", "runs/", "tenants.json")
# S3's answers to a conditional write that another writer won: 412, or 409 while one is in flight
_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_MISSING = ("NoSuchKey", "404", "NotFound")  # S3's answers for a key that isn't there
NOT_FOUND_HINT = "check the URI, or create it first (e.g. run `make demo`)"


class StoreError(Exception):
    """A store operation failed; the message names the URI and what to do."""


def _clean_key(key: str) -> str:
    key = str(key).replace("\\", "/")
    if key.startswith("/") or "://" in key:
        raise StoreError(f"store key {key!r} must be relative to the store root")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StoreError(f"store key {key!r} must not contain '..'")
    return "/".join(parts)


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _bookkeeping(name: str) -> bool:
    """_Local's own files, never objects: temp files of atomic writes (".<name>.<random>.tmp") and
    the lock files of updates (".<name>.lock")."""
    return name.startswith(".") and name.endswith((".tmp", ".lock"))


def _gone_is_fine(func, path, exc_info) -> None:
    """rmtree's error hook: a file a concurrent delete already removed is no error."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def _code(err) -> str:
    """The error code of a botocore ClientError ("" if it carries none)."""
    return str(err.response.get("Error", {}).get("Code", ""))


def _json_bytes(obj: Any) -> bytes:
    """How the store writes JSON: indented, keys sorted, a final newline."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _folder(prefix: str, key: str) -> bool:
    """A listing's prefix written with a final "/" (and not the root): the folder's objects only."""
    return bool(key) and str(prefix).replace("\\", "/").endswith("/")


def _under(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + "/")


class _Local:
    def __init__(self, root: str):
        self.root = pathlib.Path(root)

    def path(self, key: str) -> pathlib.Path:
        return self.root / key if key else self.root

    @contextmanager
    def errors(self, url: str):
        try:
            yield
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreError(f"{url} not found: {NOT_FOUND_HINT}") from None
        except OSError as e:
            raise StoreError(f"{url}: {e.strerror or e}") from None

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    @staticmethod
    def _tempfile(dst: pathlib.Path) -> tuple[int, str]:
        """A temp file beside dst; its folder is made again if a concurrent delete pruned it."""
        for attempt in range(5):
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
            except FileNotFoundError:
                if attempt == 4:
                    raise

    def _atomic(self, key: str, fill) -> None:
        dst = self.path(key)
        fd, tmp = self._tempfile(dst)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            os.replace(tmp, dst)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise

    def put(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda f: f.write(data))

    def create(self, key: str, data: bytes) -> bool:
        """Write only if nothing is there: a hard link of a finished temp file is atomic and
        fails when the name exists, so a reader never sees half a file and two creators never both win."""
        dst = self.path(key)
        fd, tmp = self._tempfile(dst)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.link(tmp, dst)
            return True
        except FileExistsError:
            return False
        finally:
            pathlib.Path(tmp).unlink(missing_ok=True)

    def update(self, key: str, change) -> bytes:
        """Read-change-write under an exclusive flock of a lock file beside the object: writers in
        any process on this file system take turns; readers see the old or the new object whole."""
        import fcntl

        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst.parent / f".{dst.name}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                new = change(dst.read_bytes() if dst.is_file() else None)
                self.put(key, new)
                return new
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def size(self, key: str) -> int | None:
        p = self.path(key)
        return p.stat().st_size if p.is_file() else None

    def put_file(self, src: pathlib.Path, key: str) -> None:
        def fill(f):
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, 1 << 20)

        self._atomic(key, fill)

    def get_file(self, key: str, dst: pathlib.Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path(key), dst)

    def keys(self, prefix: str, folder: bool = False) -> list[str]:
        p = self.path(prefix)
        if p.is_file():
            return [] if folder else [prefix]
        # os.walk skips folders that vanish mid-walk (a concurrent delete), where rglob raises
        return [
            (pathlib.Path(d) / f).relative_to(self.root).as_posix()
            for d, _, files in os.walk(p)
            for f in files
            if not _bookkeeping(f)
        ]

    def entries(self, prefix: str, folder: bool = False) -> list[tuple[str, int, str]]:
        out = []
        for key in self.keys(prefix, folder):
            try:
                st = self.path(key).stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            out.append((key, st.st_size, str(st.st_mtime_ns)))
        return out

    def exists(self, key: str) -> bool:
        return bool(self.keys(key))

    def delete(self, prefix: str) -> None:
        p = self.path(prefix)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, onerror=_gone_is_fine)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
            (p.parent / f".{p.name}.lock").unlink(missing_ok=True)
        for parent in p.parents:  # no empty folders left behind (S3 has none to leave)
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): stop here
                break

    def copy(self, src: str, dst: str) -> None:
        self.put_file(self.path(src), dst)


class _S3:
    def __init__(self, bucket: str, prefix: str, endpoint_url, region, access_key_id, secret_access_key):
        self.bucket, self.prefix = bucket, prefix
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.access_key_id = access_key_id or os.environ.get("AWS_ACCESS_KEY_ID")
        self.secret_access_key = secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY")
        self.session_token = None if access_key_id else os.environ.get("AWS_SESSION_TOKEN")
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    @property
    def where(self) -> str:
        return self.endpoint_url or f"AWS S3 (region {self.region or 'default'})"

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            opts: dict[str, Any] = dict(
                connect_timeout=5, read_timeout=120, retries={"max_attempts": 3, "mode": "standard"}
            )
            if self.endpoint_url:  # MinIO & co: path-style, checksums only when required
                opts.update(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                aws_session_token=self.session_token,
                config=Config(**opts),
            )
        return self._client

    def full(self, key: str) -> str:
        return _join(self.prefix, key)

    @contextmanager
    def errors(self, url: str):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except ClientError as e:
            code, msg = _code(e), e.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                text = (
                    f"bucket '{self.bucket}' does not exist at {self.where} (for {url}): create it "
                    f"(e.g. `aws s3 mb s3://{self.bucket}` or the MinIO console) or fix store.uri"
                )
            elif code in _MISSING:
                text = f"{url} not found: {NOT_FOUND_HINT}"
            elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
                text = (
                    f"access denied to {url} at {self.where} ({code}): check store.access_key_id/"
                    f"secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                )
            else:
                text = f"S3 error {code} on {url} at {self.where}: {msg or e}"
            raise StoreError(text) from None
        except NoCredentialsError:
            raise StoreError(
                f"no S3 credentials for {url}: set store.access_key_id/secret_access_key "
                f"or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from None
        except BotoCoreError as e:
            raise StoreError(
                f"cannot reach S3 endpoint {self.where} for {url}: {e} -- check endpoint_url "
                f"(or AWS_ENDPOINT_URL) and that the server (e.g. MinIO) is running"
            ) from None

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.full(key))["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.full(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        """S3's conditional write (If-None-Match: *): 412 when the key exists, 409 when another
        conditional write to it is in flight; either way this one lost."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.full(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if _code(e) in _LOST_RACE:
                return False
            raise

    def update(self, key: str, change) -> bytes:
        """Optimistic read-change-write: the write is conditional on the ETag that was read (or on
        there being no object), and a lost race reads again and retries."""
        from botocore.exceptions import ClientError

        for _ in range(50):
            try:
                got = self.client.get_object(Bucket=self.bucket, Key=self.full(key))
                old, condition = got["Body"].read(), {"IfMatch": got["ETag"]}
            except ClientError as e:
                if _code(e) not in _MISSING:
                    raise
                old, condition = None, {"IfNoneMatch": "*"}
            new = change(old)
            try:
                self.client.put_object(Bucket=self.bucket, Key=self.full(key), Body=new, **condition)
                return new
            except ClientError as e:
                if _code(e) not in _LOST_RACE:
                    raise
        raise StoreError(f"{self.full(key)}: 50 concurrent writers in a row won over this one; try again")

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.full(key))["ContentLength"])
        except ClientError as e:
            if _code(e) in _MISSING:
                return None
            raise

    def put_file(self, src: pathlib.Path, key: str) -> None:
        self.client.upload_file(str(src), self.bucket, self.full(key))

    def get_file(self, key: str, dst: pathlib.Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self.full(key), str(dst))

    def _objects(self, prefix: str, folder: bool = False):
        """Listed objects under prefix (including directory markers ending in '/'). S3 matches
        prefixes by characters, so listing "a/b" also sends a/b-2/..., a/b2/... (filtered out here);
        `folder` lists "a/b/" only: the objects under the folder, without its siblings' (nor an
        object named "a/b" itself)."""
        base = self.full(prefix)
        ask = base + "/" if folder and base else base
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=ask):
            for obj in page.get("Contents", []):
                if _under(obj["Key"].rstrip("/"), base):
                    yield obj

    def _iter(self, prefix: str):
        return (obj["Key"] for obj in self._objects(prefix))

    def keys(self, prefix: str, folder: bool = False) -> list[str]:
        return [key for key, _, _ in self.entries(prefix, folder)]

    def entries(self, prefix: str, folder: bool = False) -> list[tuple[str, int, str]]:
        n = len(self.prefix) + 1 if self.prefix else 0
        return [
            (o["Key"][n:], o["Size"], o.get("ETag", "").strip('"'))
            for o in self._objects(prefix, folder)
            if not o["Key"].endswith("/")
        ]

    def exists(self, key: str) -> bool:
        return any(True for _ in self._iter(key))

    def delete(self, prefix: str) -> None:
        keys = list(self._iter(prefix))
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            )

    def copy(self, src: str, dst: str) -> None:
        self.client.copy({"Bucket": self.bucket, "Key": self.full(src)}, self.bucket, self.full(dst))


class Store:
    """A store rooted at ``uri``: a plain path, ``file:///abs/path`` or ``s3://bucket/prefix``."""

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ):
        uri = str(uri)
        self._creds = dict(
            endpoint_url=endpoint_url, region=region, access_key_id=access_key_id, secret_access_key=secret_access_key
        )
        if uri.startswith("s3://"):
            bucket, _, prefix = uri[len("s3://") :].partition("/")
            if not bucket:
                raise StoreError(f"store uri {uri!r} has no bucket: use s3://bucket/prefix")
            self.scheme, prefix = "s3", _clean_key(prefix)
            self._b: _Local | _S3 = _S3(bucket, prefix, **self._creds)
            self.uri = f"s3://{_join(bucket, prefix)}"
        else:
            if uri.startswith("file://"):
                uri = urllib.parse.unquote(uri[len("file://") :])
                if not uri.startswith("/"):
                    raise StoreError(f"file store uri must be absolute: use file:///abs/path, got file://{uri}")
            elif "://" in uri:
                raise StoreError(f"store uri {uri!r}: use a path, file:///abs/path or s3://bucket/prefix")
            root = os.path.abspath(os.path.expanduser(uri))
            self.scheme, self._b, self.uri = "file", _Local(root), f"file://{root}"

    @classmethod
    def from_config(cls, cfg) -> Store:
        secret = getattr(cfg, "secret_access_key", None)
        if hasattr(secret, "get_secret_value"):  # pydantic SecretStr
            secret = secret.get_secret_value()
        return cls(
            cfg.uri,
            endpoint_url=getattr(cfg, "endpoint_url", None),
            region=getattr(cfg, "region", None),
            access_key_id=getattr(cfg, "access_key_id", None),
            secret_access_key=secret,
        )

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Store) and (self.uri, self._creds) == (other.uri, other._creds)

    def __hash__(self) -> int:
        return hash(self.uri)

    def url(self, key: str = "") -> str:
        return _join(self.uri, _clean_key(key))

    def child(self, key: str) -> Store:
        return Store(self.url(key), **self._creds)

    # -- objects -------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        k = _clean_key(key)
        with self._b.errors(self.url(k)):
            return self._b.get(k)

    def size(self, key: str) -> int | None:
        """The object's size in bytes (a HEAD on S3: nothing fetched), None when there is none."""
        k = _clean_key(key)
        with self._b.errors(self.url(k)):
            return self._b.size(k) if k else None

    def write_bytes(self, key: str, data: bytes) -> None:
        k = _clean_key(key)
        if not k:
            raise StoreError(f"cannot write to the store root {self.uri}: give a key")
        with self._b.errors(self.url(k)):
            self._b.put(k, bytes(data))

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist, atomically against every other writer; False
        when it already existed (nothing written). The store's one compare-and-set."""
        k = _clean_key(key)
        if not k:
            raise StoreError(f"cannot write to the store root {self.uri}: give a key")
        with self._b.errors(self.url(k)):
            return self._b.create(k, bytes(data))

    def create_json(self, key: str, obj: Any) -> bool:
        return self.create_bytes(key, _json_bytes(obj))

    def update_json(self, key: str, change: Callable[[Any], Any]) -> Any:
        """Apply `change` (None when there is no object -> the new value) to the JSON at `key` as
        one atomic step against every other writer, in any process: none of them loses an update.
        `change` may run more than once (a lost race re-reads); an exception in it writes nothing."""
        k = _clean_key(key)

        def on_bytes(old: bytes | None) -> bytes:
            try:
                value = None if old is None else json.loads(old)
            except json.JSONDecodeError as e:
                raise StoreError(f"{self.url(k)} is not valid JSON: {e}") from None
            return _json_bytes(change(value))

        with self._b.errors(self.url(k)):
            return json.loads(self._b.update(k, on_bytes))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_bytes(key))
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.url(key)} is not valid JSON: {e}") from None

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, _json_bytes(obj))

    # -- prefixes ------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        k = _clean_key(key)
        with self._b.errors(self.url(k)):
            return self._b.exists(k)

    def list(self, prefix: str = "") -> list[str]:
        """Every key under prefix, sorted: "a/b" is the object a/b and the objects under a/b/ (never
        a/b2/...); "a/b/" (a final "/") only those under the folder, which on S3 is one listing of
        exactly them, where "a/b" also pages through a/b2/..., a/b-x/... to skip them."""
        p = _clean_key(prefix)
        with self._b.errors(self.url(p)):
            return sorted(self._b.keys(p, _folder(prefix, p)))

    def entries(self, prefix: str = "") -> list[tuple[str, int, str]]:
        """(key, size, change tag) of every object under prefix, sorted (a final "/" as in list);
        the tag is the ETag on S3 and the modification time on file://, so a fingerprint needs no
        object reads."""
        p = _clean_key(prefix)
        with self._b.errors(self.url(p)):
            return sorted(self._b.entries(p, _folder(prefix, p)))

    def delete(self, prefix: str) -> None:
        p = _clean_key(prefix)
        with self._b.errors(self.url(p)):
            self._b.delete(p)

    def upload_dir(self, local_dir, key: str) -> None:
        src, k = pathlib.Path(local_dir), _clean_key(key)
        if not src.is_dir():
            raise StoreError(f"cannot upload {src} to {self.url(k)}: not a directory")
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            dst = _join(k, f.relative_to(src).as_posix())
            with self._b.errors(self.url(dst)):
                self._b.put_file(f, dst)

    def download_dir(self, key: str, local_dir) -> pathlib.Path:
        k, dst = _clean_key(key), pathlib.Path(local_dir)
        keys = self.list(k)
        if not keys:
            raise StoreError(f"{self.url(k)} not found (nothing stored there): {NOT_FOUND_HINT}")
        for name in keys:
            rel = name[len(k) + 1 :] if k and name != k else (name if not k else pathlib.PurePosixPath(k).name)
            with self._b.errors(self.url(name)):
                self._b.get_file(name, dst / rel)
        return dst

    def copy_prefix(self, src_key: str, dst_key: str) -> None:
        src, dst = _clean_key(src_key), _clean_key(dst_key)
        keys = self.list(src)
        if not keys:
            raise StoreError(f"cannot copy {self.url(src)}: not found: {NOT_FOUND_HINT}")
        for name in keys:
            target = dst if name == src else _join(dst, name[len(src) :].lstrip("/"))
            with self._b.errors(self.url(name)):
                self._b.copy(name, target)

    # -- integration ---------------------------------------------------------------------------
    def local_path(self, key: str = "") -> pathlib.Path | None:
        return self._b.path(_clean_key(key)) if isinstance(self._b, _Local) else None

    def pyarrow_fs(self):
        """(pyarrow FileSystem, root path in it): picklable, for Ray Data and Ray Train's storage_filesystem."""
        import pyarrow.fs as pafs

        b = self._b
        if isinstance(b, _Local):
            return pafs.LocalFileSystem(), str(b.root)
        opts: dict[str, Any] = dict(region=b.region or "us-east-1")
        if b.access_key_id and b.secret_access_key:
            opts.update(access_key=b.access_key_id, secret_key=b.secret_access_key, session_token=b.session_token)
        if b.endpoint_url:
            ep = urllib.parse.urlparse(b.endpoint_url if "://" in b.endpoint_url else f"http://{b.endpoint_url}")
            opts.update(endpoint_override=ep.netloc, scheme=ep.scheme or "https")
        return pafs.S3FileSystem(**opts), _join(b.bucket, b.prefix)

    def fs_path(self, key: str = ""):
        fs, root = self.pyarrow_fs()
        return fs, _join(root, _clean_key(key))
