"""Who is calling, and on which account's behalf."""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.settings import Settings


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    account: str


class Callers:
    """Maps an inbound request to a caller. Until caller keys exist: the default account."""

    # Headers that identify the caller to the proxy and must never reach Kounta.
    header_names: frozenset[str] = frozenset()

    def __init__(self, settings: Settings) -> None:
        self.default = Caller("anonymous", settings.account_name)

    def identify(self, headers: CIMultiDictProxy[str]) -> Caller:
        return self.default
