"""Safe archive extraction: round trips, and every escape or bomb refused with nothing written."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from horde_services.executor.archive import (
    ArchiveError,
    clean_member_name,
    safe_extract,
    safe_extract_tar,
    safe_extract_zip,
    safe_write_single_file,
)

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- builders


def _tar_member(
    tar: tarfile.TarFile, name: str, data: bytes | None = None, **attrs: object
) -> None:
    info = tarfile.TarInfo(name)
    for key, value in attrs.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def make_tar(members: list[tuple[str, dict[str, object]]], *, mode: str = "w") -> io.BytesIO:
    """members: (name, attrs) where attrs may carry ``data`` and TarInfo fields."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for name, attrs in members:
            attrs = dict(attrs)
            data = attrs.pop("data", None)
            assert data is None or isinstance(data, bytes)
            _tar_member(tar, name, data, **attrs)
    buf.seek(0)
    return buf


def file_(data: bytes = b"x") -> dict[str, object]:
    return {"data": data, "mode": 0o644}


def symlink(target: str) -> dict[str, object]:
    return {"type": tarfile.SYMTYPE, "linkname": target}


def hardlink(target: str) -> dict[str, object]:
    return {"type": tarfile.LNKTYPE, "linkname": target}


def directory() -> dict[str, object]:
    return {"type": tarfile.DIRTYPE, "mode": 0o755}


def make_zip(members: list[tuple[str, bytes, int]]) -> io.BytesIO:
    """members: (name, data, unix mode incl. file type bits; 0 for a plain file)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    buf.seek(0)
    return buf


def tree(root: Path) -> dict[str, bytes | str]:
    """Relative path -> file content, or "dir" / "-> target" for directories and links."""
    result: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                result[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                result[rel] = "dir"
            else:
                result[rel] = path.read_bytes()
    return result


# --------------------------------------------------------------------------- round trips

_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)
_segment = _segment.filter(lambda s: s not in (".", ".."))
_paths = st.lists(_segment, min_size=1, max_size=4).map(lambda parts: "/".join(parts))
_trees = st.dictionaries(_paths, st.binary(max_size=2048), max_size=20).filter(
    # No path may be both a file and a directory prefix of another file.
    lambda files: (
        not any(other.startswith(name + "/") for name in files for other in files if other != name)
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_trees, fmt=st.sampled_from(["tar", "tar.gz", "zip"]))
def test_random_safe_trees_round_trip(files: dict[str, bytes], fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"in.{fmt}"
        if fmt == "zip":
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
        else:
            with tarfile.open(archive, "w:gz" if fmt == "tar.gz" else "w") as tar:
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        target = Path(tmp) / "out"
        result = safe_extract(archive, target)
        assert sorted(result.files) == sorted(files)
        assert result.total_bytes == sum(len(d) for d in files.values())
        for name, data in files.items():
            assert (target / name).read_bytes() == data


def test_gzip_tar_with_dirs_links_and_modes(tmp_path: Path) -> None:
    archive = make_tar(
        [
            ("./", directory()),
            ("./bin", directory()),
            ("./bin/run", {"data": b"#!/bin/sh\n", "mode": 0o4755}),
            ("./lib/data.txt", file_(b"data")),
            ("./lib/alias", symlink("data.txt")),
            ("./bin/up", symlink("../lib/data.txt")),
            ("./lib/hard", hardlink("./lib/data.txt")),
        ],
        mode="w:gz",
    )
    result = safe_extract_tar(archive, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(result.files) == ["bin/run", "lib/data.txt", "lib/hard"]
    assert (out / "lib" / "alias").read_bytes() == b"data"
    assert (out / "bin" / "up").read_bytes() == b"data"
    assert os.stat(out / "lib" / "hard").st_ino == os.stat(out / "lib" / "data.txt").st_ino
    run_mode = stat.S_IMODE(os.stat(out / "bin" / "run").st_mode)
    assert run_mode == 0o755  # set-uid dropped, x kept


def test_strip_components(tmp_path: Path) -> None:
    archive = make_tar([("output", directory()), ("output/a/b.txt", file_(b"b"))])
    result = safe_extract_tar(archive, tmp_path / "out", strip_components=1)
    assert result.files == ["a/b.txt"]
    assert (tmp_path / "out" / "a" / "b.txt").read_bytes() == b"b"


def test_zip_symlink_inside_is_kept(tmp_path: Path) -> None:
    archive = make_zip(
        [("a.txt", b"a", stat.S_IFREG | 0o644), ("link", b"a.txt", stat.S_IFLNK | 0o777)]
    )
    safe_extract_zip(archive, tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "link") == "a.txt"


# --------------------------------------------------------------------------- refusals

GOOD = ("good.txt", file_(b"fine"))

BAD_TARS: dict[str, tuple[list[tuple[str, dict[str, object]]], str]] = {
    "dotdot": ([GOOD, ("../evil", file_())], "'..' component"),
    "dotdot-inner": ([GOOD, ("a/../../evil", file_())], "'..' component"),
    "absolute": ([GOOD, ("/etc/evil", file_())], "absolute path"),
    "symlink-abs": ([GOOD, ("ln", symlink("/etc/passwd"))], "absolute target"),
    "symlink-up": ([GOOD, ("d/ln", symlink("../../etc"))], "points outside"),
    "symlink-via-symlink": (
        [GOOD, ("t", symlink(".")), ("s", symlink("t/.."))],
        "traverses another symlink",
    ),
    "symlink-via-later-symlink": (
        [GOOD, ("s", symlink("t/..")), ("t", symlink("."))],
        "traverses another symlink",
    ),
    "write-through-symlink": (
        [GOOD, ("d", directory()), ("ln", symlink("d")), ("ln/x", file_())],
        "passes through symlink",
    ),
    "hardlink-abs": ([GOOD, ("h", hardlink("/etc/passwd"))], "absolute path"),
    "hardlink-up": ([GOOD, ("h", hardlink("../outside"))], "'..' component"),
    "hardlink-missing": ([GOOD, ("h", hardlink("nope"))], "not an earlier regular file"),
    "hardlink-to-symlink": (
        [GOOD, ("s", symlink("good.txt")), ("h", hardlink("s"))],
        "not an earlier regular file",
    ),
    "char-device": ([GOOD, ("dev", {"type": tarfile.CHRTYPE})], "device file"),
    "block-device": ([GOOD, ("dev", {"type": tarfile.BLKTYPE})], "device file"),
    "fifo": ([GOOD, ("fifo", {"type": tarfile.FIFOTYPE})], "FIFO"),
    "duplicate": ([GOOD, GOOD], "duplicate"),
    "file-then-child": ([GOOD, ("good.txt/x", file_())], "not a directory"),
    "backslash": ([GOOD, ("..\\evil", file_())], "backslash"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARS))
@pytest.mark.parametrize("target_exists", [False, True])
def test_bad_tar_is_refused_and_nothing_written(
    case: str, target_exists: bool, tmp_path: Path
) -> None:
    members, message = BAD_TARS[case]
    target = tmp_path / "work" / "out"
    if target_exists:
        target.mkdir(parents=True)
    with pytest.raises(ArchiveError, match=message) as excinfo:
        safe_extract_tar(make_tar(members), target)
    # The message names the offending member, quoted or normalised.
    bad_name = members[-1][0]
    assert repr(bad_name) in str(excinfo.value) or f" {bad_name.strip('/')}" in str(excinfo.value)
    if target_exists:
        assert list(target.iterdir()) == []
    else:
        assert not target.exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path / "work" / "evil").exists()


def test_too_big_is_refused(tmp_path: Path) -> None:
    archive = make_tar([("a", file_(b"x" * 600)), ("b", file_(b"x" * 600))])
    with pytest.raises(ArchiveError, match="member 'b': total uncompressed size exceeds 1000"):
        safe_extract_tar(archive, tmp_path / "out", max_total_bytes=1000)
    assert not (tmp_path / "out").exists()


def test_too_many_is_refused(tmp_path: Path) -> None:
    archive = make_tar([(f"f{i}", file_()) for i in range(6)])
    with pytest.raises(ArchiveError, match="member 'f5': more than 5 members"):
        safe_extract_tar(archive, tmp_path / "out", max_files=5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("ok", b"1", 0), ("../evil", b"2", 0)], "'..' component"),
        ([("ok", b"1", 0), ("/abs", b"2", 0)], "absolute path"),
        ([("ok", b"1", 0), ("ln", b"/etc/passwd", stat.S_IFLNK | 0o777)], "absolute target"),
        ([("ok", b"1", 0), ("ln", b"../x", stat.S_IFLNK | 0o777)], "points outside"),
        ([("ok", b"1", 0), ("p", b"", stat.S_IFIFO | 0o644)], "FIFO"),
        ([("ok", b"1", 0), ("c", b"", stat.S_IFCHR | 0o644)], "device file"),
    ],
)
def test_bad_zip_is_refused(
    members: list[tuple[str, bytes, int]], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ArchiveError, match=message):
        safe_extract_zip(make_zip(members), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_bomb_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb", b"\0" * (4 << 20))
    with pytest.raises(ArchiveError, match="total uncompressed size"):
        safe_extract_zip(buf, tmp_path / "out", max_total_bytes=1 << 20)
    assert not (tmp_path / "out").exists()


def test_corrupt_archives(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a readable tar"):
        safe_extract_tar(io.BytesIO(b"definitely not a tar" * 100), tmp_path / "out")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ArchiveError):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_symlink_in_target_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "sub").symlink_to(elsewhere)
    with pytest.raises(ArchiveError, match="not a directory"):
        safe_extract_tar(make_tar([("first", file_()), ("sub/x", file_())]), target)
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in target.iterdir()) == ["sub"]  # "first" rolled back


def test_symlink_through_existing_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "ext").symlink_to("/")
    with pytest.raises(ArchiveError, match="traverses existing symlink ext"):
        safe_extract_tar(make_tar([("s", symlink("ext/etc"))]), target)
    assert sorted(p.name for p in target.iterdir()) == ["ext"]


def test_write_time_conflict_rolls_back(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_bytes(b"mine")
    archive = make_tar([("new/a.txt", file_(b"a")), ("keep.txt", file_(b"theirs"))])
    with pytest.raises(ArchiveError, match="already exists"):
        safe_extract_tar(archive, target)
    assert tree(target) == {"keep.txt": b"mine"}


# --------------------------------------------------------------------------- single files


def test_safe_write_single_file(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    path = safe_write_single_file(target, "a/b/c.bin", b"data")
    assert path == target / "a" / "b" / "c.bin" and path.read_bytes() == b"data"
    with pytest.raises(ArchiveError, match="already exists"):
        safe_write_single_file(target, "a/b/c.bin", b"again")
    safe_write_single_file(target, "a/b/c.bin", b"again", overwrite=True)
    assert path.read_bytes() == b"again"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../x", "'..' component"),
        ("a/../../x", "'..' component"),
        ("/etc/x", "absolute path"),
        ("", "empty name"),
        (".", "names the target directory"),
        ("a\x00b", "NUL"),
    ],
)
def test_safe_write_single_file_rejects_bad_names(name: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=message):
        safe_write_single_file(tmp_path / "vol", name, b"x")
    assert not (tmp_path / "x").exists()


def test_safe_write_single_file_does_not_follow_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    target.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    (target / "link").symlink_to(outside)
    (target / "dirlink").symlink_to(tmp_path)
    with pytest.raises(ArchiveError, match="not a regular file"):
        safe_write_single_file(target, "link", b"pwned", overwrite=True)
    with pytest.raises(ArchiveError, match="not a directory"):
        safe_write_single_file(target, "dirlink/pwned", b"pwned")
    assert outside.read_bytes() == b"precious"
    assert not (tmp_path / "pwned").exists()


def test_clean_member_name() -> None:
    assert str(clean_member_name("./a//b/./c")) == "a/b/c"
    assert clean_member_name("./") is None
    assert clean_member_name("top/", strip_components=1) is None
