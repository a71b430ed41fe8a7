"""One process per state directory: an exclusive lock a service holds for as long as it runs.

A second service started on a directory another one uses would share its database and files and
"recover" from a crash that did not happen: a validator ends the live one's jobs as
``validator_restarted`` and empties its spool, an executor sweeps the live one's job containers
and directories. So a service takes ``DIR/<service>.lock`` with ``flock(LOCK_EX | LOCK_NB)``
before it touches anything there, and gives up (a ConfigError: exit status 2) when another
process holds it. The lock file says the holder's pid, for the message.

The kernel releases the lock when the holder exits, however it exits (``kill -9`` included), so a
leftover file never blocks a restart; the file itself is kept (removing it would let a newcomer
lock a fresh file while another process still holds the old one). Locks of different services
(``validator.lock``, ``executor.lock``, ...) do not conflict, so services that share a state dir
(``horde dev up``) each hold their own. flock locks belong to an open file, not to a process: a
second lock of the same file in the same process is refused too. The descriptor is not inherited
by child processes.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from horde_services.core.errors import ConfigError


class StateLock:
    """A held lock; ``release()`` (idempotent) gives it back before the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the lock

    async def aclose(self) -> None:
        """``release()`` as a ServiceApp closer."""
        self.release()


def lock_dir(
    directory: Path, service: str, *, setting: str = "state_dir", private: bool | None = None
) -> StateLock:
    """Take ``DIRECTORY/<service>.lock`` exclusively (made with the directory when missing).

    A directory made here is made mode 0700 when ``private`` (by default: when ``setting`` is
    ``state_dir``, whose database, spool and ledger are the service's alone, and should not be
    world-readable where no systemd UMask protects them); an existing directory keeps its mode.
    Not so for an executor's ``work_dir``, whose job directories the job containers read.

    Raises ConfigError naming ``setting`` when the directory cannot hold the lock file, or
    saying who holds it ("state_dir /x is in use by another validator (pid N)")."""
    if private is None:
        private = setting == "state_dir"
    directory = directory.resolve()
    path = directory / f"{service}.lock"
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileExistsError:  # a file (or a dangling link) where the directory should be
        raise ConfigError(
            f"invalid setting '{setting}': {directory} is not a directory (the {service} keeps "
            f"its lock file {path.name} there)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"invalid setting '{setting}': {directory}: {exc.strerror or exc} (the {service} "
            f"keeps its lock file {path.name} there)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise ConfigError(f"{setting} {directory} is in use by another {service}{who}") from None
    except OSError as exc:  # a file system without flock support
        os.close(fd)
        raise ConfigError(
            f"invalid setting '{setting}': {directory}: cannot lock {path.name}: "
            f"{exc.strerror or exc}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is only for the message of a process that finds the lock taken
    return StateLock(path, fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
