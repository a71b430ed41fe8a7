"""Small helpers for building protobuf messages that every service uses."""

from __future__ import annotations

import time

from horde.v1 import common_pb2, job_pb2

from horde_services.core.errors import InvalidArgument

TERMINAL_STATES = frozenset(
    {
        common_pb2.JOB_STATE_COMPLETED,
        common_pb2.JOB_STATE_REJECTED,
        common_pb2.JOB_STATE_FAILED,
        common_pb2.JOB_STATE_HORDE_FAILED,
        common_pb2.JOB_STATE_CANCELLED,
    }
)


_MAX_CURSOR = 2**63 - 1  # a page position is a signed 64-bit row id


PLAIN_NAME_RULE = (
    "a plain file name is required (not '.' or '..', no '/', '\\' or NUL, at most 255 bytes)"
)


def plain_file_name(name: str) -> bool:
    """Whether `name` can only name a file right inside a directory (extra data, inline files)."""
    return (
        bool(name)
        and len(name.encode()) <= 255
        and name not in (".", "..")
        and not any(c in name for c in "/\\\x00")
    )


def parse_cursor(text: str) -> int | None:
    """A page cursor as the previous page returned it (decimal); None for the first page.
    InvalidArgument for anything else, including numbers no database row id can reach."""
    if not text:
        return None
    if text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= _MAX_CURSOR:
        return int(text)
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise InvalidArgument(f"malformed cursor {shown!r}: pass a next_cursor a page returned")


def state_name(state: int) -> str:
    return common_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def reason_name(reason: int) -> str:
    if reason == common_pb2.FAILURE_REASON_UNSPECIFIED:
        return ""
    return common_pb2.FailureReason.Name(reason).removeprefix("FAILURE_REASON_").lower()  # type: ignore[arg-type]


def stage_name(stage: int) -> str:
    if stage == common_pb2.STAGE_UNSPECIFIED:
        return ""
    return common_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()  # type: ignore[arg-type]


def event(
    job_uuid: str,
    state: common_pb2.JobState.ValueType,
    stage: common_pb2.Stage.ValueType,
    message: str = "",
    progress: float = -1.0,
) -> job_pb2.JobEvent:
    return job_pb2.JobEvent(
        job_uuid=job_uuid,
        state=state,
        stage=stage,
        timestamp_ns=time.time_ns(),
        message=message,
        progress=progress,
    )


def result(
    job_uuid: str,
    state: common_pb2.JobState.ValueType,
    reason: common_pb2.FailureReason.ValueType = common_pb2.FAILURE_REASON_UNSPECIFIED,
    stage: common_pb2.Stage.ValueType = common_pb2.STAGE_UNSPECIFIED,
    detail: str = "",
) -> job_pb2.JobResult:
    return job_pb2.JobResult(
        job_uuid=job_uuid, state=state, reason=reason, stage=stage, detail=detail
    )


# SubmitJob's upload handshake (validator/service.py): the validator's initial metadata says
# whether it takes the inline inputs the spec declares before the client sends any.
UPLOAD_METADATA_KEY = "horde-upload"
UPLOAD_ACCEPTED = (UPLOAD_METADATA_KEY, "accepted")
UPLOAD_REFUSED = (UPLOAD_METADATA_KEY, "refused")
