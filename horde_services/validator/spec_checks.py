"""Checks every job spec passes before the validator stores it, organic or streaming.

What the executor would refuse later (a NUL byte it cannot pass to Docker, say) is refused here,
as the client's mistake: reaching the miner first would end the job as the network's fault
(horde_failed) and count against an honest miner. Sizes are bounded too: specs are stored and
listed back (ListJobs pages), so one client cannot make every listing too large to send.
"""

from __future__ import annotations

import re

from horde.v1 import job_pb2

MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 1024
# The whole spec (command, env, labels, input descriptions): far above any real one, and small
# enough that a page of ListJobs stays sendable.
MAX_SPEC_BYTES = 256 * 1024

# Image references never hold whitespace or control characters.
_NOT_IN_IMAGE = re.compile(r"[\s\x00-\x1f\x7f]")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Variables the executor sets for jobs: a client's value would only break the job (a streaming
# service listening on another port than the proxy dials waits out its start-up limit).
RESERVED_ENV = {
    "HORDE_PORT": "the streaming service's port, spec.streaming.port",
    "HORDE_EXTRA_DIR": "where extra data is placed",
    "HORDE_CHALLENGE": "a synthetic challenge",
}


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def is_sha256_hex(text: str) -> bool:
    return _SHA256_HEX.fullmatch(text) is not None


def spec_problem(spec: job_pb2.JobSpec) -> str | None:
    """The first thing wrong with the parts every job spec has, as "field: why"; None if none."""
    size = spec.ByteSize()
    if size > MAX_SPEC_BYTES:
        return (
            f"spec: {size} bytes, over the {MAX_SPEC_BYTES}-byte limit (send large data as inputs)"
        )
    if not spec.image.strip():
        return "spec.image: an image reference is required"
    if _NOT_IN_IMAGE.search(spec.image):
        return (
            f"spec.image: {shorten(spec.image)!r} is not an image reference (whitespace or "
            "control characters)"
        )
    for index, arg in enumerate(spec.command):
        if "\x00" in arg:
            return f"spec.command[{index}]: an argument cannot contain a NUL byte"
    for key, value in spec.env.items():
        if not key or "=" in key or "\x00" in key:
            return f"spec.env: invalid variable name {shorten(key)!r}"
        if key in RESERVED_ENV:
            return f"spec.env[{key!r}]: set by Horde itself ({RESERVED_ENV[key]})"
        if "\x00" in value:
            return f"spec.env[{shorten(key)!r}]: a value cannot contain a NUL byte"
    if len(spec.labels) > MAX_LABELS:
        return f"spec.labels: {len(spec.labels)} labels, at most {MAX_LABELS}"
    for key, value in spec.labels.items():
        if not key or len(key) > MAX_LABEL_KEY_CHARS:
            return f"spec.labels: a key must have 1 to {MAX_LABEL_KEY_CHARS} characters"
        if len(value) > MAX_LABEL_VALUE_CHARS:
            return (
                f"spec.labels[{shorten(key)!r}]: {len(value)} characters, at most "
                f"{MAX_LABEL_VALUE_CHARS}"
            )
    return None
