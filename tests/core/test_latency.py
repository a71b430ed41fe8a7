"""gc_paused: no cyclic collection inside the window, a full one first when asked, overlapping
windows end together, and the collector's own state (off already) is kept."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from horde_services.core.latency import gc_paused


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_no_collection_inside_and_overlapping_windows_end_together() -> None:
    collections: list[str] = []

    def seen(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(phase)

    gc.callbacks.append(seen)
    try:
        with gc_paused(collect_first=True):
            assert collections == ["start"]  # the full collection before the window
            assert not gc.isenabled()
            with gc_paused():
                garbage = [Cycle() for _ in range(50_000)]  # far past the gen-0 threshold
                del garbage
            assert not gc.isenabled()  # the outer window is still open
            assert collections == ["start"]  # and nothing collected inside
        assert gc.isenabled()
    finally:
        gc.callbacks.remove(seen)


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with gc_paused():
        pass
    assert not gc.isenabled()
