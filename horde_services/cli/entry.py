"""The `horde` console script. It loads the command line inside a Ctrl-C guard, so an interrupt
while the CLI's modules still load (about half a second) exits 130 quietly, as an interrupt of
any running command does, instead of printing a traceback."""

from __future__ import annotations


def main() -> int:
    try:
        from horde_services.cli.main import main as run

        return run()
    except KeyboardInterrupt:
        return 130
