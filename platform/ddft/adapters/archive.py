"""An uploaded adapter's files out of a multipart form or an archive (tar, tar.gz, zip), in memory.

Archives are never extracted to disk: members are read as bytes, through a size cap, and anything
that is not a plain file at the top level (or in one folder) is refused: links, devices, absolute
paths, '..', a second folder. Refusals are ddft.errors' kinds with a code and the fix.
"""

from __future__ import annotations

import io
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import PurePosixPath

from ddft.adapters.files import REQUIRED
from ddft.errors import BadArgument, Invalid, TooLarge

DEFAULT_MAX_BYTES = 1 << 30  # a 7B LM with r=128 on q/k/v/o in fp32 is ~0.5 GiB
TAR_OVERHEAD = 1 << 20  # tar headers and padding on top of the members' own bytes


def unpack(
    files: dict[str, bytes] | None = None,
    archive: bytes | None = None,
    content_type: str = "",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, bytes]:
    """{file name: bytes} from multipart files (base names kept) or a .tar/.tar.gz/.zip archive."""
    if (files is None) == (archive is None):
        raise BadArgument(code="bad_upload", detail="send either the adapter's files or one archive of them")
    if files is not None:
        out: dict[str, bytes] = {}
        for raw, data in files.items():
            name = PurePosixPath(str(raw).replace("\\", "/")).name  # a client's path says nothing to us
            if name in ("", ".", "..") or name in out:
                raise Invalid(
                    code="bad_upload",
                    detail=f"file name {raw!r} is empty or given twice; send {list(REQUIRED)} once each",
                )
            out[name] = bytes(data)
        check_total(sum(map(len, out.values())), max_bytes)
        return out
    if archive[:2] == b"\x1f\x8b":
        archive = _gunzip(archive, max_bytes + TAR_OVERHEAD)
        return _flatten(_tar_members(archive, max_bytes))
    if archive[257:262] == b"ustar":
        return _flatten(_tar_members(archive, max_bytes))
    if archive[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _flatten(_zip_members(archive, max_bytes))
    raise Invalid(
        code="bad_archive",
        detail=f"the upload ({content_type or 'no content type'}) is not a .tar, .tar.gz "
        "or .zip archive; send one of those, or the two files as multipart form data",
    )


def check_total(total: int, max_bytes: int) -> None:
    """An adapter's files may hold at most max_bytes (unpacked, and again when validated)."""
    if total > max_bytes:
        raise TooLarge(
            code="too_large",
            detail=f"the adapter's files hold {total} bytes, over the limit of {max_bytes}; "
            "lower the rank or target fewer modules",
        )


def _bad_archive(why: str) -> Invalid:
    return Invalid(
        code="bad_archive",
        detail=f"{why}; archive only the adapter folder's regular files, with "
        "relative paths (e.g. `tar czf adapter.tar.gz -C my-adapter .`)",
    )


def _gunzip(data: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, cap + 1)  # never inflate more than the cap: a gzip bomb stops here
    except zlib.error as err:
        raise _bad_archive(f"the gzip stream is corrupt ({err})") from None
    if len(out) > cap:
        raise TooLarge(
            code="too_large", detail=f"the archive inflates past {cap} bytes; lower the rank or target fewer modules"
        )
    if not d.eof:
        raise _bad_archive("the gzip stream is truncated")
    return out


def _check_path(name: str) -> None:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in norm.split("/") or "\x00" in norm:
        raise _bad_archive(f"member {name!r} has an absolute path or '..'")


def _tar_members(data: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = tf.getmembers()
            for m in members:
                _check_path(m.name)
                if m.issym() or m.islnk():
                    raise _bad_archive(f"member {m.name!r} is a link")
                if not (m.isfile() or m.isdir()):
                    raise _bad_archive(f"member {m.name!r} is not a regular file")
            files = [m for m in members if m.isfile()]
            check_total(sum(m.size for m in files), max_bytes)  # sizes from the headers, before reading
            return [(m.name, tf.extractfile(m).read(m.size)) for m in files]
    except (tarfile.TarError, EOFError, OSError) as err:
        raise _bad_archive(f"the tar archive is unreadable ({err})") from None


def _zip_members(data: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            for i in infos:
                _check_path(i.filename)
                kind = stat.S_IFMT(i.external_attr >> 16)  # the unix file type, when a unix zip recorded one
                if kind == stat.S_IFLNK:
                    raise _bad_archive(f"member {i.filename!r} is a link")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise _bad_archive(f"member {i.filename!r} is not a regular file")
                if i.flag_bits & 0x1:
                    raise _bad_archive(f"member {i.filename!r} is encrypted")
            files = [i for i in infos if not i.is_dir()]
            check_total(sum(i.file_size for i in files), max_bytes)
            out, left = [], max_bytes
            for i in files:
                with zf.open(i) as f:
                    blob = f.read(left + 1)  # declared sizes can lie: never read past what's left
                if len(blob) > left:
                    raise TooLarge(
                        code="too_large",
                        detail=f"the archive inflates past {max_bytes} bytes; lower the rank or target fewer modules",
                    )
                left -= len(blob)
                out.append((i.filename, blob))
            return out
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError) as err:
        raise _bad_archive(f"the zip archive is unreadable ({err})") from None


def _flatten(members: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """Files at the top level or in one folder -> {base name: bytes}."""
    out: dict[str, bytes] = {}
    folders = set()
    for path, data in members:
        parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or parts[0] == "__MACOSX":  # macOS Finder's resource forks
            continue
        if len(parts) > 2:
            raise _bad_archive(f"member {path!r} is nested too deep: files must sit at the top level or in one folder")
        folders.add(tuple(parts[:-1]))
        if len(folders) > 1 or parts[-1] in out:
            raise _bad_archive(f"member {path!r} is in a second folder or repeats a name: keep one adapter per archive")
        out[parts[-1]] = data
    return out
