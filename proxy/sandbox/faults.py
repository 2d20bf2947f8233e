"""Injected faults: latency, canned status answers and dropped connections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal["latency", "status", "drop"]


@dataclass
class Fault:
    kind: FaultKind
    # None means "until cleared".
    remaining: int | None
    path_prefix: str = "/"
    seconds: float = 0.0
    status: int = 500
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "remaining": self.remaining,
            "path_prefix": self.path_prefix,
        }
        if self.kind == "latency":
            out["seconds"] = self.seconds
        elif self.kind == "status":
            out["status"] = self.status
            out["content_type"] = self.content_type
        return out


@dataclass
class FaultPlan:
    """What to do to one request, decided when it arrives."""

    latency: float = 0.0
    status: Fault | None = None
    drop: bool = False


class FaultSet:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        if fault.remaining is not None and fault.remaining <= 0:
            raise ValueError("count must be positive or None")
        if not fault.path_prefix.startswith("/"):
            raise ValueError("path_prefix must start with '/'")
        self._faults.append(fault)

    def clear(self) -> None:
        self._faults.clear()

    def active(self) -> list[Fault]:
        return list(self._faults)

    def plan(self, path: str) -> FaultPlan:
        """Consume the faults that apply to a request for `path`.

        Every matching latency fault adds up; only the first matching status or
        drop fault is used (and consumed) since a request can be answered once.
        """
        result = FaultPlan()
        terminal_taken = False
        for fault in self._faults:
            if not path.startswith(fault.path_prefix):
                continue
            if fault.kind == "latency":
                result.latency += fault.seconds
            elif terminal_taken:
                continue
            elif fault.kind == "status":
                result.status = fault
                terminal_taken = True
            else:
                result.drop = True
                terminal_taken = True
            if fault.remaining is not None:
                fault.remaining -= 1
        self._faults = [f for f in self._faults if f.remaining is None or f.remaining > 0]
        return result
