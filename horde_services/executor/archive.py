"""Safe unpacking of job inputs and outputs (tar, tar.gz/bz2/xz, zip).

Archives come from users and from job containers, so every member is treated as hostile:

* names must be relative, free of ``..``, NUL and backslashes, and may not pass through a symlink
  member (otherwise a later member could be written through the link);
* symlinks must be relative and resolve inside the target without traversing another symlink
  (lexical resolution is only sound when no symlink sits in the middle of the path); hardlinks
  must point at a regular file member that appears earlier in the same archive;
* device files, FIFOs and unknown member types are refused;
* total uncompressed size and member count are capped, and the size cap is enforced again while
  writing, because a zip's declared sizes can lie;
* every member is validated before the first byte is written, and on any error everything this
  call created is removed again, so the target is left as it was found.

Writes never follow a pre-existing symlink in the target: parents are checked with ``lstat`` and
files are opened with ``O_NOFOLLOW | O_EXCL``.
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

import structlog

log = structlog.get_logger(__name__)

DEFAULT_MAX_TOTAL_BYTES = 1 << 30
DEFAULT_MAX_FILES = 10_000
_MAX_NAME_BYTES = 4096
_MAX_COMPONENT_BYTES = 255
_COPY_CHUNK = 1 << 20


class ArchiveError(Exception):
    """An archive (or a single file name) was refused; the message names the offending member."""


class _Kind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"


@dataclass(frozen=True)
class _Entry:
    """One validated member; ``source`` is the handle used to read a file's data."""

    path: PurePosixPath
    kind: _Kind
    size: int = 0
    mode: int = 0o644
    link: str = ""
    source: object = None


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction wrote: regular files (relative POSIX paths, hardlinks included)."""

    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    members: int = 0


def clean_member_name(name: str, *, strip_components: int = 0) -> PurePosixPath | None:
    """Validate an archive member name and return it as a relative path.

    Returns None for names that denote the archive root itself (``.``, ``./``) or that vanish
    under ``strip_components``. Raises ArchiveError for anything that could escape the target.
    """
    if not name:
        raise ArchiveError("member with an empty name")
    if "\x00" in name:
        raise ArchiveError(f"member {name!r}: name contains NUL")
    if "\\" in name:
        raise ArchiveError(f"member {name!r}: name contains a backslash")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        raise ArchiveError(f"member {name[:64]!r}...: name too long")
    if name.startswith("/"):
        raise ArchiveError(f"member {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name!r}: '..' component")
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT_BYTES:
            raise ArchiveError(f"member {name!r}: path component too long")
    parts = parts[strip_components:]
    if not parts:
        return None
    return PurePosixPath(*parts)


def _check_symlink_target(path: PurePosixPath, target: str, symlinks: set[PurePosixPath]) -> None:
    if not target:
        raise ArchiveError(f"symlink {path}: empty target")
    if "\x00" in target:
        raise ArchiveError(f"symlink {path}: target contains NUL")
    if target.startswith("/"):
        raise ArchiveError(f"symlink {path} -> {target}: absolute target")
    # Walk the target lexically from the link's directory. A symlink in the middle of the walk
    # would make the lexical answer wrong, so that is refused outright.
    stack = list(path.parent.parts)
    comps = [c for c in target.split("/") if c not in ("", ".")]
    for i, comp in enumerate(comps):
        if comp == "..":
            if not stack:
                raise ArchiveError(f"symlink {path} -> {target}: points outside the target")
            stack.pop()
        else:
            stack.append(comp)
        if i < len(comps) - 1 and stack and PurePosixPath(*stack) in symlinks:
            raise ArchiveError(
                f"symlink {path} -> {target}: traverses another symlink {PurePosixPath(*stack)}"
            )


def _validate(
    raw: Sequence[tuple[str, _Kind | str, int, int, str, object]],
    *,
    max_total_bytes: int,
    max_files: int,
    strip_components: int,
) -> list[_Entry]:
    """Turn raw (name, kind, size, mode, link, source) tuples into validated entries."""
    entries: list[_Entry] = []
    seen: dict[PurePosixPath, _Kind] = {}
    symlinks: set[PurePosixPath] = set()
    total = 0
    count = 0
    for name, kind, size, mode, link, source in raw:
        if not isinstance(kind, _Kind):
            raise ArchiveError(f"member {name!r}: {kind} not allowed")
        path = clean_member_name(name, strip_components=strip_components)
        if path is None:
            if kind is _Kind.DIR:
                continue
            raise ArchiveError(f"member {name!r}: not a directory but names the archive root")
        count += 1
        if count > max_files:
            raise ArchiveError(f"member {name!r}: more than {max_files} members")
        if size < 0:
            raise ArchiveError(f"member {name!r}: negative size")
        total += size
        if total > max_total_bytes:
            raise ArchiveError(
                f"member {name!r}: total uncompressed size exceeds {max_total_bytes} bytes"
            )
        for parent in reversed(list(path.parents)[:-1]):
            pkind = seen.get(parent)
            if pkind is _Kind.SYMLINK:
                raise ArchiveError(f"member {name!r}: path passes through symlink {parent}")
            if pkind is not None and pkind is not _Kind.DIR:
                raise ArchiveError(f"member {name!r}: parent {parent} is not a directory")
        previous = seen.get(path)
        if previous is not None:
            if previous is _Kind.DIR and kind is _Kind.DIR:
                continue
            raise ArchiveError(f"member {name!r}: duplicate entry")
        if kind is _Kind.SYMLINK:
            symlinks.add(path)
        elif kind is _Kind.HARDLINK:
            try:
                target = clean_member_name(link, strip_components=strip_components)
            except ArchiveError as exc:
                raise ArchiveError(f"hardlink {name!r} -> {link!r}: {exc}") from None
            if target is None or seen.get(target) is not _Kind.FILE:
                raise ArchiveError(
                    f"hardlink {name!r} -> {link!r}: target is not an earlier regular file member"
                )
            link = str(target)
        seen[path] = kind
        entries.append(_Entry(path, kind, size, mode, link, source))
    # Targets are checked against every symlink of the archive, not just earlier ones: the order
    # of members must not matter.
    for entry in entries:
        if entry.kind is _Kind.SYMLINK:
            _check_symlink_target(entry.path, entry.link, symlinks)
    # A file member that is also used as a directory by a later member was caught above only when
    # the file came first; check the other order too.
    for entry in entries:
        if entry.kind is not _Kind.DIR:
            for parent in list(entry.path.parents)[:-1]:
                if seen.get(parent, _Kind.DIR) is not _Kind.DIR:
                    raise ArchiveError(f"member {entry.path}: parent {parent} is not a directory")
    return entries


class _Writer:
    """Creates entries under ``root`` and remembers what it created so it can undo it."""

    def __init__(self, root: Path, max_total_bytes: int) -> None:
        self.root = root
        self.created: list[Path] = []
        self.root_created = False
        self.written = 0
        self.max_total_bytes = max_total_bytes

    def prepare_root(self) -> None:
        if self.root.is_symlink():
            raise ArchiveError(f"target {self.root} is a symlink")
        if self.root.exists():
            if not self.root.is_dir():
                raise ArchiveError(f"target {self.root} is not a directory")
        else:
            self.root.mkdir(parents=True)
            self.root_created = True

    def _ensure_dir(self, rel: PurePosixPath) -> Path:
        current = self.root
        for part in rel.parts:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                self.created.append(current)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(
                    f"{rel}: {current.relative_to(self.root)} exists and is not a directory"
                )
        return current

    def mkdir(self, rel: PurePosixPath) -> None:
        self._ensure_dir(rel)

    def write_file(self, rel: PurePosixPath, stream: IO[bytes], size: int, mode: int) -> None:
        parent = self._ensure_dir(rel.parent)
        dest = parent / rel.name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(dest, flags, 0o600)
        except FileExistsError:
            raise ArchiveError(f"member {rel}: already exists in the target") from None
        self.created.append(dest)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = stream.read(_COPY_CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                self.written += len(chunk)
                if written > size or self.written > self.max_total_bytes:
                    raise ArchiveError(f"member {rel}: more data than its declared size")
                out.write(chunk)
        if written != size:
            raise ArchiveError(f"member {rel}: truncated ({written} of {size} bytes)")
        # Keep permission bits a job may rely on (x), drop set-id/sticky and group/other write.
        os.chmod(dest, (mode & 0o755) | 0o600)

    def hardlink(self, rel: PurePosixPath, target: PurePosixPath) -> None:
        parent = self._ensure_dir(rel.parent)
        dest = parent / rel.name
        source = self.root.joinpath(*target.parts)
        try:
            os.link(source, dest, follow_symlinks=False)
        except FileExistsError:
            raise ArchiveError(f"member {rel}: already exists in the target") from None
        self.created.append(dest)

    def symlink(self, rel: PurePosixPath, target: str) -> None:
        parent = self._ensure_dir(rel.parent)
        dest = parent / rel.name
        # The archive was checked against its own symlinks; a target that pre-existed may hold
        # others, which would make the link's lexical resolution wrong.
        walk = list(rel.parent.parts)
        comps = [c for c in target.split("/") if c not in ("", ".")]
        for comp in comps[:-1]:
            if comp == "..":
                walk.pop()
                continue
            walk.append(comp)
            if self.root.joinpath(*walk).is_symlink():
                raise ArchiveError(
                    f"symlink {rel} -> {target}: traverses existing symlink {'/'.join(walk)}"
                )
        try:
            os.symlink(target, dest)
        except FileExistsError:
            raise ArchiveError(f"member {rel}: already exists in the target") from None
        self.created.append(dest)

    def rollback(self) -> None:
        if self.root_created:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in reversed(self.created):
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
            except OSError as exc:  # pragma: no cover - best effort
                log.warning("archive.rollback_failed", path=str(path), error=str(exc))


def _write_all(
    entries: list[_Entry],
    target_dir: Path,
    max_total_bytes: int,
    open_member: Callable[[_Entry], IO[bytes]],
) -> ExtractResult:
    writer = _Writer(target_dir, max_total_bytes)
    try:
        writer.prepare_root()
        files: list[str] = []
        # Symlinks last: nothing is ever written after a link exists, so even a link the
        # validation got wrong could not redirect a write.
        for entry in sorted(entries, key=lambda e: e.kind is _Kind.SYMLINK):
            if entry.kind is _Kind.DIR:
                writer.mkdir(entry.path)
            elif entry.kind is _Kind.FILE:
                with open_member(entry) as stream:
                    writer.write_file(entry.path, stream, entry.size, entry.mode)
                files.append(str(entry.path))
            elif entry.kind is _Kind.HARDLINK:
                writer.hardlink(entry.path, PurePosixPath(entry.link))
                files.append(str(entry.path))
            else:
                writer.symlink(entry.path, entry.link)
    except ArchiveError:
        writer.rollback()
        raise
    except BaseException as exc:
        writer.rollback()
        if isinstance(exc, (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile)):
            raise ArchiveError(f"extraction failed: {exc}") from exc
        raise
    return ExtractResult(files=files, total_bytes=writer.written, members=len(entries))


def _tar_kind(member: tarfile.TarInfo) -> _Kind | str:
    if member.isdir():
        return _Kind.DIR
    if member.issym():
        return _Kind.SYMLINK
    if member.islnk():
        return _Kind.HARDLINK
    if member.isreg():
        return _Kind.FILE
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return f"member type {member.type!r}"


def _open_tar(source: Path | BinaryIO) -> tarfile.TarFile:
    try:
        if isinstance(source, Path):
            return tarfile.open(source, mode="r:*")
        return tarfile.open(fileobj=source, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"not a readable tar archive: {exc}") from exc


def safe_extract_tar(
    source: Path | BinaryIO,
    target_dir: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    strip_components: int = 0,
) -> ExtractResult:
    """Extract a (possibly compressed) tar archive into ``target_dir`` safely."""
    with _open_tar(source) as tar:
        entries = _tar_entries(tar, max_total_bytes, max_files, strip_components)

        def open_member(entry: _Entry) -> IO[bytes]:
            assert isinstance(entry.source, tarfile.TarInfo)
            stream = tar.extractfile(entry.source)
            if stream is None:
                raise ArchiveError(f"member {entry.path}: no data")
            return stream

        return _write_all(entries, target_dir, max_total_bytes, open_member)


def check_tar(
    source: Path | BinaryIO,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
) -> None:
    """Raise ArchiveError for a tar archive safe_extract_tar would refuse for its members (a
    link out, a device, too many files or bytes), extracting nothing: `horde job run` checks a
    directory's tar before it uploads it."""
    with _open_tar(source) as tar:
        _tar_entries(tar, max_total_bytes, max_files, 0)


def _tar_entries(
    tar: tarfile.TarFile, max_total_bytes: int, max_files: int, strip_components: int
) -> list[_Entry]:
    """The archive's members, validated (ArchiveError for the first one refused)."""
    try:
        members = _iter_tar_members(tar, max_files)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"corrupt tar archive: {exc}") from exc
    raw = [
        (m.name, _tar_kind(m), m.size if m.isreg() else 0, m.mode, m.linkname, m) for m in members
    ]
    return _validate(
        raw,
        max_total_bytes=max_total_bytes,
        max_files=max_files,
        strip_components=strip_components,
    )


def _iter_tar_members(tar: tarfile.TarFile, max_files: int) -> list[tarfile.TarInfo]:
    # tar.getmembers() would read every header of a hostile archive with millions of entries
    # into memory; stop one past the cap so _validate can name the offending member.
    members: list[tarfile.TarInfo] = []
    for member in _tar_iter(tar):
        members.append(member)
        if len(members) > max_files + 1:
            break
    return members


def _tar_iter(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        member = tar.next()
        if member is None:
            return
        yield member


def _zip_kind(info: zipfile.ZipInfo) -> _Kind | str:
    mode = info.external_attr >> 16
    if info.is_dir():
        return _Kind.DIR
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFLNK:
        return _Kind.SYMLINK
    if fmt in (0, stat.S_IFREG):
        return _Kind.FILE
    if fmt == stat.S_IFDIR:
        return _Kind.DIR
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        return "device file"
    if fmt == stat.S_IFIFO:
        return "FIFO"
    return f"file mode {oct(fmt)}"


def safe_extract_zip(
    source: Path | BinaryIO,
    target_dir: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    strip_components: int = 0,
    max_symlink_target_bytes: int = 4096,
) -> ExtractResult:
    """Extract a zip archive into ``target_dir`` safely (Unix symlinks honoured, checked)."""
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files + 1:
            infos = infos[: max_files + 1]
        raw: list[tuple[str, _Kind | str, int, int, str, object]] = []
        for info in infos:
            kind = _zip_kind(info)
            link = ""
            if kind is _Kind.SYMLINK:
                if info.file_size > max_symlink_target_bytes:
                    raise ArchiveError(f"symlink {info.filename!r}: target too long")
                try:
                    link = zf.read(info).decode("utf-8")
                except (UnicodeDecodeError, zipfile.BadZipFile, OSError) as exc:
                    raise ArchiveError(f"symlink {info.filename!r}: unreadable target") from exc
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            size = info.file_size if kind is _Kind.FILE else 0
            raw.append((info.filename, kind, size, mode, link, info))
        entries = _validate(
            raw,
            max_total_bytes=max_total_bytes,
            max_files=max_files,
            strip_components=strip_components,
        )

        def open_member(entry: _Entry) -> IO[bytes]:
            assert isinstance(entry.source, zipfile.ZipInfo)
            return zf.open(entry.source)

        return _write_all(entries, target_dir, max_total_bytes, open_member)


def safe_extract(
    archive: Path,
    target_dir: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    strip_components: int = 0,
) -> ExtractResult:
    """Extract a tar (plain or compressed) or zip archive, detected by content."""
    kwargs = {
        "max_total_bytes": max_total_bytes,
        "max_files": max_files,
        "strip_components": strip_components,
    }
    if zipfile.is_zipfile(archive):
        return safe_extract_zip(archive, target_dir, **kwargs)
    return safe_extract_tar(archive, target_dir, **kwargs)


def safe_write_single_file(
    target_dir: Path, relative_name: str, data: bytes, *, overwrite: bool = False
) -> Path:
    """Write ``data`` at ``target_dir/relative_name`` with the same path rules as archives.

    Missing parent directories are created; no existing symlink is ever followed. An existing
    regular file is replaced only with ``overwrite=True`` (atomically, via a temporary file).
    """
    rel = clean_member_name(relative_name)
    if rel is None:
        raise ArchiveError(f"file name {relative_name!r} names the target directory itself")
    writer = _Writer(target_dir, max_total_bytes=len(data))
    writer.prepare_root()
    try:
        parent = writer._ensure_dir(rel.parent)
        dest = parent / rel.name
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise ArchiveError(f"file {rel}: exists and is not a regular file")
            if not overwrite:
                raise ArchiveError(f"file {rel}: already exists in the target")
        tmp = parent / f".{rel.name}.horde-tmp-{os.getpid()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o644)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except BaseException:
        writer.rollback()
        raise
    return dest
