"""Coming back to a job from the CLI (`horde job watch`, `horde job download`, `horde job run`
stopped by SIGTERM or SIGHUP) and where outputs went, as a user runs it against a real
`horde dev up` network (real Docker)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import pytest
from cli_support import BIN, horde

BASE = "horde/base:latest"
# A job writing /output/a.txt and /output/sub/b.txt.
WRITES = (
    "import os; os.makedirs('/output/sub'); open('/output/a.txt', 'w').write('A'); "
    "open('/output/sub/b.txt', 'w').write('BB')"
)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "horde"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def until_running(proc: subprocess.Popen[str]) -> str:
    """Read the progress lines ("<uuid> <state> [<stage>] ...") until the job runs: its uuid."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if " running " in line:
            return line.split()[0]
    raise AssertionError("the command ended before the job ran")


def output_line(path: str, data: bytes) -> str:
    return f"output {path} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}...)"


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (temporary ones included) by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def state(dev: Path, job_uuid: str) -> str:
    out = horde("job", "status", "--dev", str(dev), "--json", job_uuid)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["state"])


def left_running(dev: Path, tmp_path: Path, sig: signal.Signals = signal.SIGTERM) -> str:
    """`horde job run` of a long job, stopped by `sig` once the job runs: the job's uuid."""
    proc = start("job", "run", "--dev", str(dev), "--output", str(tmp_path / "out"), BASE,
                 "--", "sleep", "300")  # fmt: skip
    job_uuid = until_running(proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err == (
        f"horde job run: stopped by {sig.name}: job {job_uuid} was not cancelled; follow it "
        f"again with `horde job watch {job_uuid} --output {tmp_path / 'out'}`, or cancel it "
        f"with `horde job cancel {job_uuid}`\n"
    )
    return job_uuid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_sigterm_and_sighup_leave_the_job_running_and_say_how_to_come_back(
    dev: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    job_uuid = left_running(dev, tmp_path, sig)
    assert state(dev, job_uuid) == "running"  # not cancelled
    assert horde("job", "cancel", "--dev", str(dev), job_uuid).returncode == 0


def test_watch_follows_a_running_job_and_ctrl_c_leaves_it_running(
    dev: Path, tmp_path: Path
) -> None:
    job_uuid = left_running(dev, tmp_path)
    out = horde("job", "download", "--dev", str(dev), "--output", str(tmp_path / "d"), job_uuid)
    assert out.returncode == 1
    assert out.stderr == (
        f"horde job download: job {job_uuid} has not finished (running); follow it with "
        f"`horde job watch {job_uuid} --output {tmp_path / 'd'}`\n"
    )

    watch = start("job", "watch", "--dev", str(dev), job_uuid)
    assert until_running(watch) == job_uuid  # its past events first
    watch.send_signal(signal.SIGINT)
    out_text, err = watch.communicate(timeout=60)
    assert watch.returncode == 130
    assert out_text == ""
    assert err.endswith(
        f"\nhorde job watch: interrupted: job {job_uuid} was not cancelled; follow it again "
        f"with `horde job watch {job_uuid}`, or cancel it with `horde job cancel {job_uuid}`\n"
    )
    assert state(dev, job_uuid) == "running"

    watch = start("job", "watch", "--dev", str(dev), "--json", job_uuid)
    # As JSON nothing shows progress: the job is cancelled once the watch is attached or not,
    # the watch ends with the result either way.
    cancel = horde("job", "cancel", "--dev", str(dev), job_uuid)
    assert cancel.returncode == 0, cancel.stderr
    out_text, err = watch.communicate(timeout=60)
    assert watch.returncode == 1, err  # as `run`: a cancelled job is 1
    assert json.loads(out_text)["state"] == "cancelled"


def test_watch_and_download_fetch_a_finished_jobs_outputs_again(dev: Path, tmp_path: Path) -> None:
    run = horde("job", "run", "--dev", str(dev), "--json", BASE, "--", "python3", "-c", WRITES)
    assert run.returncode == 0, run.stderr
    job_uuid = json.loads(run.stdout)["job_uuid"]
    expected = {"a.txt": b"A", "sub/b.txt": b"BB"}

    w = tmp_path / "w"
    out = horde("job", "watch", "--dev", str(dev), "--output", str(w), job_uuid)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == [f"{job_uuid} completed", "exit code 0"]
    for path, data in expected.items():
        assert f"{output_line(path, data)} -> {w / path}" in lines
    assert files(w) == expected  # and nothing else: no temporary file

    out = horde("job", "watch", "--dev", str(dev), "--json", "--output", str(tmp_path / "wj"),
                job_uuid)  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["state"] == "completed" and "outputs_not_written" not in doc
    assert {o["path"]: o["written_to"] for o in doc["outputs"]} == {
        path: str(tmp_path / "wj" / path) for path in expected
    }
    assert files(tmp_path / "wj") == expected

    d = tmp_path / "d"
    out = horde("job", "download", "--dev", str(dev), "--output", str(d), job_uuid)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(
        f"{output_line(path, data)} -> {d / path}\n" for path, data in expected.items()
    )
    assert out.stderr == ""
    assert files(d) == expected
    (d / "a.txt").write_text("changed")
    out = horde("job", "download", "--dev", str(dev), "--json", "--output", str(d), job_uuid)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["job_uuid"] == job_uuid and doc["state"] == "completed"
    assert [(o["path"], o["written_to"]) for o in doc["outputs"]] == [
        (path, str(d / path)) for path in expected
    ]
    assert files(d) == expected  # fetched again, in place of what was there


def test_the_summary_marks_outputs_not_written(dev: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    (out_dir / "a.txt").mkdir(parents=True)  # where the job's /output/a.txt would go
    why = f"Is a directory ({out_dir / 'a.txt'})"
    run = horde("job", "run", "--dev", str(dev), "--output", str(out_dir), BASE, "--", "python3",
                "-c", WRITES)  # fmt: skip
    assert run.returncode == 1
    job_uuid = run.stdout.split()[0]
    lines = run.stdout.splitlines()
    assert f"{output_line('a.txt', b'A')} not written: {why}" in lines
    assert f"{output_line('sub/b.txt', b'BB')} -> {out_dir / 'sub/b.txt'}" in lines
    assert f"horde job run: output a.txt not written: {why}\n" in run.stderr
    assert files(out_dir) == {"sub/b.txt": b"BB"}

    for cmd in ("watch", "download"):
        out = horde("job", cmd, "--dev", str(dev), "--json", "--output", str(out_dir), job_uuid)
        assert out.returncode == 1, (cmd, out.stderr)
        doc = json.loads(out.stdout)
        marks = {o["path"]: (o["written_to"], o.get("not_written")) for o in doc["outputs"]}
        assert marks == {
            "a.txt": (None, why),
            "sub/b.txt": (str(out_dir / "sub/b.txt"), None),
        }, cmd
        assert doc["outputs_not_written"] == {"a.txt": why}
        assert out.stderr.endswith(f"horde job {cmd}: output a.txt not written: {why}\n")
    out = horde("job", "download", "--dev", str(dev), "--output", str(out_dir), job_uuid)
    assert out.returncode == 1
    assert out.stdout == (
        f"{output_line('sub/b.txt', b'BB')} -> {out_dir / 'sub/b.txt'}\n"
        f"{output_line('a.txt', b'A')} not written: {why}\n"
    )
    assert files(out_dir) == {"sub/b.txt": b"BB"}
