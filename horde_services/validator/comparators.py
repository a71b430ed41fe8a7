"""Comparators: is a miner's output the output the trusted instance gave for the same request?

Pluggable by name (`REGISTRY`); the validator picks one per image (``[spotcheck.comparators]``,
keyed by image reference or digest) and sha256 otherwise. The same code runs in
`horde evidence verify`, so a third party re-derives the verdict from the evidence alone.

* ``sha256``: byte-exact (deterministic jobs; DESIGN.md's default);
* ``numeric``: for jobs whose numbers may differ in the last bits (floating point on different
  hardware): both outputs are parsed as JSON (or, failing that, as whitespace-separated tokens);
  numbers must agree within ``rel_tol``/``abs_tol`` (``math.isclose``) and everything else (keys,
  strings, structure, non-numeric tokens) exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from horde_services.core.config import ComparatorSettings


@dataclass(frozen=True)
class Comparison:
    matched: bool
    detail: str


class Comparator(Protocol):
    @property
    def name(self) -> str:
        """Short description, stored with each verdict and in the evidence."""

    def compare(self, claimed: bytes, trusted: bytes) -> Comparison:
        """Does the miner's output `claimed` agree with the trusted instance's?"""


@dataclass(frozen=True)
class Sha256Comparator:
    @property
    def name(self) -> str:
        return "sha256"

    def compare(self, claimed: bytes, trusted: bytes) -> Comparison:
        a = hashlib.sha256(claimed).hexdigest()
        b = hashlib.sha256(trusted).hexdigest()
        if a == b:
            return Comparison(True, f"sha256 {a[:16]} matches")
        return Comparison(False, f"sha256 {a[:16]}... differs from the trusted {b[:16]}...")


class _Mismatch(Exception):
    pass


@dataclass(frozen=True)
class NumericComparator:
    rel_tol: float = 1e-6
    abs_tol: float = 1e-9

    @property
    def name(self) -> str:
        return f"numeric(rel_tol={self.rel_tol:g},abs_tol={self.abs_tol:g})"

    def compare(self, claimed: bytes, trusted: bytes) -> Comparison:
        try:
            self._same(_parse(claimed), _parse(trusted), "$")
        except _Mismatch as exc:
            return Comparison(False, str(exc))
        return Comparison(True, "numbers within tolerance, the rest equal")

    def _same(self, a: Any, b: Any, where: str) -> None:
        if _is_number(a) and _is_number(b):
            if not math.isclose(float(a), float(b), rel_tol=self.rel_tol, abs_tol=self.abs_tol):
                raise _Mismatch(f"{where}: {a!r} is not within tolerance of the trusted {b!r}")
            return
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                raise _Mismatch(f"{where}: {len(a)} items, the trusted output has {len(b)}")
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                self._same(x, y, f"{where}[{i}]")
            return
        if isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                raise _Mismatch(f"{where}: keys {sorted(a)} differ from {sorted(b)}")
            for key in a:
                self._same(a[key], b[key], f"{where}.{key}")
            return
        if a != b:
            raise _Mismatch(f"{where}: {str(a)[:80]!r} differs from the trusted {str(b)[:80]!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _token(t: str) -> Any:
    try:
        return float(t)
    except ValueError:
        return t


def _parse(data: bytes) -> Any:
    """JSON when it parses, else whitespace-separated tokens (numbers where they parse)."""
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return [_token(t) for t in text.split()]


REGISTRY: dict[str, Callable[[ComparatorSettings], Comparator]] = {
    "sha256": lambda s: Sha256Comparator(),
    "numeric": lambda s: NumericComparator(s.rel_tol, s.abs_tol),
}


def build(settings: ComparatorSettings | None) -> Comparator:
    if settings is None:
        return Sha256Comparator()
    return REGISTRY[settings.kind](settings)


def from_name(name: str) -> Comparator:
    """The comparator a verdict names (evidence records carry the name)."""
    if name == "sha256":
        return Sha256Comparator()
    if name.startswith("numeric(") and name.endswith(")"):
        params = dict(p.split("=", 1) for p in name[len("numeric(") : -1].split(",") if "=" in p)
        try:
            return NumericComparator(float(params["rel_tol"]), float(params["abs_tol"]))
        except (KeyError, ValueError):
            pass
    raise ValueError(f"unknown comparator {name!r}")


def for_image(
    comparators: dict[str, ComparatorSettings], image: str, image_digest: str
) -> Comparator:
    """The comparator configured for the image (by digest first, then by reference)."""
    from horde_services.executor.sandbox import normalise_image_ref

    if image_digest in comparators:
        return build(comparators[image_digest])
    ref = normalise_image_ref(image) if image else ""
    for key, settings in comparators.items():
        if key == image or (
            ref and not key.startswith("sha256:") and normalise_image_ref(key) == ref
        ):
            return build(settings)
    return Sha256Comparator()
