"""A stored response's metadata (:class:`Entry`): what every tier keeps beside the body."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.cache.fields import HeaderItems, Headers
from proxy.cache.keys import vary_value


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored response's metadata (the body is stored beside it)."""

    status: int
    headers: HeaderItems  # the upstream's form, without UNSTORED_HEADERS
    account: str
    path: str
    request_time: float
    response_time: float
    initial_age: float  # RFC 9111 4.2.3 corrected_initial_age
    fresh_for: float  # freshness lifetime, RFC 9111 4.2.1
    stale_if_error: float
    stale_while_revalidate: float
    strict: bool  # no-cache / must-revalidate: never used unvalidated once stale
    vary: tuple[tuple[str, str | None], ...]  # extra Vary names and the values stored with
    size: int

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None

    @property
    def etag(self) -> str | None:
        return self.header("ETag")

    @property
    def last_modified(self) -> str | None:
        return self.header("Last-Modified")

    def age(self, now: float) -> float:
        """RFC 9111 4.2.3 current_age."""
        return self.initial_age + max(0.0, now - self.response_time)

    def staleness(self, now: float) -> float:
        return self.age(now) - self.fresh_for

    def selects(self, headers: Headers) -> bool:
        """RFC 9111 4.1: the request's values of the stored Vary names match (normalised)."""
        return all(vary_value(headers, name) == value for name, value in self.vary)
