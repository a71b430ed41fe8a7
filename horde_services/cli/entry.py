"""The `horde` console script. It loads the command line inside a Ctrl-C guard, so an interrupt
while the CLI's modules still load (about half a second) exits 130 quietly, as an interrupt of
any running command does, instead of printing a traceback. Standard input, output or error
closed by whoever started it (`<&-`, some daemon tools) are opened on /dev/null first: a
descriptor the process then opens would land on 0, 1 or 2, where the event loop refuses it
(uvloop aborts the process)."""

from __future__ import annotations

import os
import sys


def _standard_fds() -> None:
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            spare = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: `fd` itself
            if spare != fd:
                os.dup2(spare, fd)
                os.close(spare)
        if getattr(sys, name) is None:  # Python found it closed at start-up
            setattr(sys, name, open(fd, mode, closefd=False))


def main() -> int:
    _standard_fds()
    try:
        from horde_services.cli.main import main as run

        return run()
    except KeyboardInterrupt:
        return 130
