"""`horde job` as a user runs it, against a real `horde dev up` network (real Docker)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from cli_support import BIN, horde

from horde_services.cli.client import shown
from horde_services.core.identity import create_key_file, load_key_file

BASE = "horde/base:latest"


def test_job_output_comes_out_verbatim_into_a_pipe(dev: Path) -> None:
    code = "import sys; print('x' * 100); print('a\\tb'); sys.stdout.write('\\x1b[2Jend')"
    out = horde("job", "run", "--dev", str(dev), BASE, "--", "python3", "-c", code)
    assert out.returncode == 0, out.stderr
    assert "x" * 100 + "\na\tb\n\x1b[2Jend\n" in out.stdout  # not re-wrapped, not re-spaced


def test_binary_output_is_given_whole_in_base64_and_a_completed_jobs_note_shown(
    dev: Path,
) -> None:
    """Bytes that are no UTF-8 text: the text says so, --json carries them whole in base64
    (the `stdout` text has replacement characters). A completed job's detail (here: a symlink
    under /output that is not returned) is shown as a note."""
    code = (
        "import os, sys; sys.stdout.buffer.write(bytes(range(256))); "
        "open('/output/f.txt', 'w').write('f'); os.symlink('f.txt', '/output/alias')"
    )
    doc = json.loads(
        horde("job", "run", "--dev", str(dev), "--json", BASE, "--", "python3", "-c", code).stdout
    )
    assert doc["state"] == "completed", doc
    assert base64.b64decode(doc["stdout_base64"]) == bytes(range(256))
    assert "stderr_base64" not in doc  # (empty: text)
    assert "\ufffd" in doc["stdout"]
    text = horde("job", "run", "--dev", str(dev), BASE, "--", "python3", "-c", code)
    assert text.returncode == 0, text.stderr
    assert "--- stdout (not UTF-8 text: its bytes are stdout_base64 in --json)\n" in text.stdout
    assert (
        "note: 1 entry under /output not returned (only regular files are): alias (a symlink)\n"
        in text.stdout
    )


def test_control_characters_are_escaped_on_a_terminal_only() -> None:
    text = "ok\tline\n\x1b]0;title\x07\x1b[2J\r\x9b"
    assert shown(text, terminal=False) == text
    assert shown(text, terminal=True) == "ok\tline\n\\x1b]0;title\\x07\\x1b[2J\\x0d\\x9b"


def test_ctrl_c_cancels_the_running_job(dev: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "horde"), "job", "run", "--dev", str(dev), BASE, "--", "sleep", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    job_uuid = ""
    while True:  # progress lines: "<uuid> <state> [<stage>] ..."
        line = proc.stderr.readline()
        assert line, "horde job run ended before the job ran"
        if " running " in line:
            job_uuid = line.split()[0]
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"interrupted: job {job_uuid} cancelled" in err
    assert "Traceback" not in err
    status = horde("job", "status", "--dev", str(dev), "--json", job_uuid)
    assert json.loads(status.stdout)["state"] == "cancelled"
    again = horde("job", "cancel", "--dev", str(dev), "--json", job_uuid)
    assert json.loads(again.stdout) == {
        "job_uuid": job_uuid,
        "state": "cancelled",
        "already_ended": False,
    }


def test_cancelling_a_finished_job_says_nothing_was_cancelled(dev: Path) -> None:
    run = horde("job", "run", "--dev", str(dev), "--json", BASE, "--", "true")
    job_uuid = json.loads(run.stdout)["job_uuid"]
    out = horde("job", "cancel", "--dev", str(dev), job_uuid)
    assert out.returncode == 0
    assert out.stdout.strip() == f"{job_uuid} completed (it had already ended: nothing to cancel)"


def test_an_output_that_cannot_be_written_here_is_reported(dev: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    (out_dir / "a.txt").mkdir(parents=True)  # where the job's /output/a.txt would go
    code = "open('/output/a.txt', 'w').write('A'); open('/output/b.txt', 'w').write('B')"
    out = horde(
        "job", "run", "--dev", str(dev), "--output", str(out_dir), BASE, "--", "python3", "-c", code
    )
    assert out.returncode == 1
    assert "output a.txt not written: Is a directory" in out.stderr
    assert (out_dir / "b.txt").read_text() == "B"  # the others still arrive
    assert "Traceback" not in out.stderr


def test_usage_problems_are_one_line_exit_2(dev: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x.txt").write_text("1")
    (b / "x.txt").write_text("2")
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    bad_key = tmp_path / "key.json"
    bad_key.write_text("{")
    cases = [
        (["job", "list", "--dev", str(dev), "--limit", "-1"], "--limit"),
        (["job", "run", "--dev", str(dev), "--timeout", "-5", BASE], "--timeout"),
        (["job", "run", "--dev", str(dev), "--output", str(a_file), BASE], "--output"),
        (
            [
                "job",
                "run",
                "--dev",
                str(dev),
                "--input",
                str(a / "x.txt"),
                "--input",
                str(b / "x.txt"),
                BASE,
            ],
            "would land under /volume beside the same name",
        ),
        (["job", "run", "--dev", str(dev), "--key", str(bad_key), BASE], str(bad_key)),
        # Without a port the channel would dial 443; a bad identity would only come back from
        # the server as a refusal.
        (["job", "list", "--dev", str(dev), "--validator", "localhost"], "HOST:PORT is required"),
        (
            ["job", "list", "--dev", str(dev), "--validator-identity", "garbage"],
            "--validator-identity: invalid identity 'garbage'",
        ),
        (["job", "run", "--dev", str(dev), "--label", "team", BASE], "--label 'team': expected"),
        (["job", "run", "--dev", str(dev), "--label", "=ml", BASE], "--label '=ml': expected"),
    ]
    for argv, needle in cases:
        out = horde(*argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)


def test_status_text_names_the_reason_and_exit_code(dev: Path) -> None:
    run = horde("job", "run", "--dev", str(dev), "--json", BASE, "--", "sh", "-c", "exit 3")
    job_uuid = json.loads(run.stdout)["job_uuid"]
    out = horde("job", "status", "--dev", str(dev), job_uuid)
    assert out.stdout.startswith(f"{job_uuid} failed {BASE} (nonzero_exit in execution")
    assert out.stdout.rstrip().endswith("exit code 3")


def test_unreachable_validator_is_not_called_a_refusal(tmp_path: Path) -> None:
    key = tmp_path / "client.json"
    assert horde("keys", "new", "--kind", "ed25519", "--out", str(key)).returncode == 0
    started = time.monotonic()
    out = horde(
        "job", "run", "--validator", "127.0.0.1:1", "--validator-identity",
        "ed25519:" + "11" * 32, "--key", str(key), BASE,
    )  # fmt: skip
    assert out.returncode == 2
    assert "cannot reach the validator at 127.0.0.1:1: UNAVAILABLE" in out.stderr
    assert time.monotonic() - started < 60


def test_the_validators_refusals_exit_1(dev: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.json"  # a key the validator has not enrolled
    create_key_file(stranger, "ed25519")
    unknown = "00000000-0000-0000-0000-000000000000"
    not_enrolled = (
        f"PERMISSION_DENIED: {load_key_file(stranger).identity} is not an enrolled client"
    )
    cases = [
        (["list", "--key", str(stranger)], not_enrolled),
        (["status", "--key", str(stranger), unknown], not_enrolled),
        (["cancel", "--key", str(stranger), unknown], not_enrolled),
        (["run", "--key", str(stranger), BASE, "--", "true"], not_enrolled),
        (["status", unknown], f"NOT_FOUND: no job {unknown}"),
        (["cancel", unknown], f"NOT_FOUND: no job {unknown}"),
        (["watch", unknown], f"NOT_FOUND: no job {unknown}"),
        (["download", "--output", str(tmp_path / "out"), unknown], f"NOT_FOUND: no job {unknown}"),
        (["watch", "--key", str(stranger), unknown], not_enrolled),
        (["status", "not-a-uuid"], "INVALID_ARGUMENT: job_uuid 'not-a-uuid' is not a UUID"),
        (
            ["run", "--label", "k=" + "x" * 1025, BASE, "--", "true"],
            "INVALID_ARGUMENT: spec.labels['k']: 1025 characters, at most 1024",
        ),
    ]
    for words, why in cases:
        out = horde("job", words[0], "--dev", str(dev), *words[1:])
        lead = "validator refused the job: " if words[0] == "run" else ""
        assert out.returncode == 1, (words, out.stderr)
        assert out.stderr == f"horde job {words[0]}: {lead}{why}\n", words


def test_the_wrong_validator_identity_is_a_usage_error_naming_both(dev: Path) -> None:
    """A validator identity that is not the one answering at the address (a copy-paste slip):
    exit 2, saying which identity answers there and which option to check, not the validator's
    "refusal" (exit 1)."""
    endpoints = json.loads((dev / "endpoints.json").read_text())
    validator = endpoints["services"]["validator"]
    wrong = "ed25519:" + "22" * 32
    target = [
        "--validator", validator["address"], "--validator-identity", wrong,
        "--key", endpoints["client_key"],
    ]  # fmt: skip
    for words in (["list"], ["run", BASE, "--", "true"]):
        out = horde("job", words[0], *target, *words[1:])
        assert out.returncode == 2, (words, out.stderr)
        assert out.stderr == (
            f"horde job {words[0]}: the validator at {validator['address']} is "
            f"{validator['identity']}, not {wrong}: check the validator's identity you gave "
            "(--validator-identity), or the address\n"
        ), words


def test_labels_are_kept_with_the_job_and_shown(dev: Path) -> None:
    run = horde(
        "job", "run", "--dev", str(dev), "--json", "--label", "team=ml", "--label", "note=a b,c",
        "--label", "run=1", "--label", "run=2", "--label", "nl=x\ny", "--label", "empty=",
        BASE, "--", "true",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    labelled = json.loads(run.stdout)["job_uuid"]
    plain_run = horde("job", "run", "--dev", str(dev), "--json", BASE, "--", "true")
    plain = json.loads(plain_run.stdout)["job_uuid"]
    labels = {"empty": "", "nl": "x\ny", "note": "a b,c", "run": "2", "team": "ml"}

    status = json.loads(horde("job", "status", "--dev", str(dev), "--json", labelled).stdout)
    assert status["labels"] == labels
    assert list(status["labels"]) == sorted(labels)  # in key order, whatever the map's
    assert (
        json.loads(horde("job", "status", "--dev", str(dev), "--json", plain).stdout)["labels"]
        == {}
    )
    listed = horde("job", "list", "--dev", str(dev), "--json")
    rows = {r["job_uuid"]: r["labels"] for r in json.loads(listed.stdout)}
    assert rows[labelled] == labels and rows[plain] == {}

    text = horde("job", "list", "--dev", str(dev))
    assert text.returncode == 0, text.stderr
    lines = {line.split()[0]: line for line in text.stdout.splitlines()}
    # Lined up after the image, in key order; a newline in a label stays escaped, in one line.
    assert lines[labelled] == (
        f"{labelled}  completed{' ' * 26}{BASE}  empty=,nl=x\\x0ay,note=a b,c,run=2,team=ml"
    )
    assert lines[plain] == f"{plain}  completed{' ' * 26}{BASE}"  # nothing after the image
    # `job status` as text: a line of its own, the same form.
    said = horde("job", "status", "--dev", str(dev), labelled).stdout.splitlines()
    assert said[1:] == ["labels: empty=,nl=x\\x0ay,note=a b,c,run=2,team=ml"], said
    said = horde("job", "status", "--dev", str(dev), plain).stdout.splitlines()
    assert len(said) == 1 and said[0].startswith(f"{plain} completed"), said


def test_status_into_a_closed_pipe_exits_quietly_with_141(dev: Path) -> None:
    run = horde("job", "run", "--dev", str(dev), "--json", BASE, "--", "true")
    job_uuid = json.loads(run.stdout)["job_uuid"]
    for words in (["status", "--json", job_uuid], ["list", "--json"], ["list"]):
        reader, writer = os.pipe()
        os.close(reader)  # `| head -c 10` once head has gone
        try:
            out = subprocess.run(
                [str(BIN / "horde"), "job", words[0], "--dev", str(dev), *words[1:]],
                stdout=writer,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        finally:
            os.close(writer)
        assert out.returncode == 141, (words, out.stderr)
        assert out.stderr == "", words
