"""Reading a `horde dev up` network's endpoints (kept light: client commands import it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENDPOINTS = "endpoints.json"


@dataclass(frozen=True)
class DevEnv:
    """What client commands read from `--dev DIR`."""

    state_dir: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, state_dir: Path) -> DevEnv:
        path = state_dir / ENDPOINTS
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: start a local network with "
                f"`horde dev up --state-dir {state_dir}`"
            )
        return cls(state_dir, json.loads(path.read_text()))

    def address(self, service: str) -> str:
        return str(self.data["services"][service]["address"])

    def identity(self, service: str) -> str:
        return str(self.data["services"][service]["identity"])

    @property
    def client_key(self) -> Path:
        return Path(self.data["client_key"])
