"""Reading a `horde dev up` network's endpoints (kept light: client commands import it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENDPOINTS = "endpoints.json"


class DevEnvError(Exception):
    """`--dev DIR` names no running network, or its endpoints file is damaged."""


@dataclass(frozen=True)
class DevEnv:
    """What client commands read from `--dev DIR`."""

    state_dir: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, state_dir: Path) -> DevEnv:
        path = state_dir / ENDPOINTS
        if not path.is_file():
            raise DevEnvError(
                f"{path} not found: start a local network with "
                f"`horde dev up --state-dir {state_dir}`"
            )
        try:
            env = cls(state_dir, json.loads(path.read_text()))
            # What client commands read, read once here: a damaged file fails with one line.
            for service in ("validator", "gateway"):
                env.address(service)
                env.identity(service)
            env.client_key  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DevEnvError(
                f"{path} is not a readable `horde dev up` endpoints file ({exc!r}): start the "
                f"local network again with `horde dev up --state-dir {state_dir}`"
            ) from None
        return env

    def address(self, service: str) -> str:
        return str(self.data["services"][service]["address"])

    def identity(self, service: str) -> str:
        return str(self.data["services"][service]["identity"])

    @property
    def client_key(self) -> Path:
        return Path(self.data["client_key"])
