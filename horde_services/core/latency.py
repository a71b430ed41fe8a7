"""Holding the cyclic garbage collector off while a service times something.

Synthetic rounds are timed by the validator's clock: a pass of the cyclic collector in the middle
(tens to hundreds of ms over a large heap) is counted against honest executors (`make bench`'s
p99 timing error swung from about 60 to 200 ms with nothing but the heap's layout changed).
Reference counting still frees nearly everything while the collector is off; a round lasts at
most its longest deadline and grace. Windows may overlap (services sharing a process, as in
`horde dev up`): the collector runs again when the last one ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_open = 0  # windows open now
_was_enabled = True  # the collector's state when the first of them opened


@contextlib.contextmanager
def gc_paused(*, collect_first: bool = False) -> Iterator[None]:
    """No cyclic collection inside the block (`collect_first`: a full one just before it, for a
    caller whose clock has not started yet)."""
    global _open, _was_enabled
    if _open == 0:
        _was_enabled = gc.isenabled()
        if collect_first:
            gc.collect()
        gc.disable()
    _open += 1
    try:
        yield
    finally:
        _open -= 1
        if _open == 0 and _was_enabled:
            gc.enable()
