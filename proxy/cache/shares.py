"""Each account's share of a local cache tier (pure bookkeeping, no I/O).

With one LRU for all accounts, one account's large reads evict every other account's
entries. A :class:`Ledger` keeps the bytes each account holds in one tier (memory or disk),
oldest first, and names the account's own oldest keys to evict once the account is past its
share: ``size * cache_share / sum(cache_share)`` (``[accounts.NAME] cache_share``, 1 each by
default). The tier's global limit still applies besides (diskcache's ``size_limit``, the
memory LRU's byte cap). With one account a ledger is inactive and costs nothing.

The store calls :meth:`Ledger.add` when it holds a key, :meth:`Ledger.remove` when it
drops one, :meth:`Ledger.touch` when an entry is used (memory tier: least recently used),
:meth:`Ledger.older` for the disk's records found after start-up (older than every key added
since) and :meth:`Ledger.clear` on a purge of everything. A ledger is used from one thread only
(the memory tier's from the event loop, the disk tier's from the store's worker).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping


class Ledger:
    """Bytes held per account in one tier, oldest first, against each account's share."""

    def __init__(self, size: int = 0, weights: Mapping[str, float] | None = None) -> None:
        weights = dict(weights or {})
        # One account (or none known) is the whole tier: nothing to keep apart.
        self.active = size > 0 and len(weights) > 1
        whole = sum(weights.values()) or 1.0
        self.limits = {account: int(size * w / whole) for account, w in weights.items()}
        # An account no longer configured (entries of an earlier configuration): weight 1.
        self.default = int(size / whole)
        self.keys: dict[str, OrderedDict[str, int]] = {}
        self.owner: dict[str, str] = {}
        self.held: dict[str, int] = {}

    def limit(self, account: str) -> int:
        return self.limits.get(account, self.default)

    def add(self, key: str, account: str, size: int) -> list[str]:
        """Count ``key`` (``size`` bytes) for ``account``, newest; the keys to evict so the
        account stays within its share (its oldest first, ``key`` itself last)."""
        if not self.active:
            return []
        self.remove(key)
        keys = self.keys.setdefault(account, OrderedDict())
        keys[key] = size
        self.owner[key] = account
        self.held[account] = self.held.get(account, 0) + size
        victims: list[str] = []
        limit = self.limit(account)
        while self.held[account] > limit and keys:
            oldest = next(iter(keys))
            victims.append(oldest)
            self.remove(oldest)
        return victims

    def older(self, rows: Iterable[tuple[str, str, int]]) -> list[str]:
        """Count keys stored before every key counted so far (``rows``: key, account, size,
        newest first); a key counted already is left as it is. The keys to evict so each
        account stays within its share (its oldest first)."""
        if not self.active:
            return []
        accounts = set()
        for key, account, size in rows:
            if key in self.owner:
                continue
            keys = self.keys.setdefault(account, OrderedDict())
            keys[key] = size
            keys.move_to_end(key, last=False)
            self.owner[key] = account
            self.held[account] = self.held.get(account, 0) + size
            accounts.add(account)
        victims: list[str] = []
        for account in sorted(accounts):
            keys = self.keys[account]
            while self.held[account] > self.limit(account) and keys:
                oldest = next(iter(keys))
                victims.append(oldest)
                self.remove(oldest)
        return victims

    def touch(self, key: str) -> None:
        """``key`` was used: it is evicted last of its account (least recently used)."""
        account = self.owner.get(key)
        if account is not None:
            self.keys[account].move_to_end(key)

    def remove(self, key: str) -> None:
        account = self.owner.pop(key, None)
        if account is None:
            return
        self.held[account] -= self.keys[account].pop(key)

    def clear(self) -> None:
        self.keys.clear()
        self.owner.clear()
        self.held.clear()

    def status(self) -> dict[str, dict[str, int]]:
        """Bytes held and the share, per account (for stats)."""
        return {
            account: {"bytes": self.held.get(account, 0), "share": self.limit(account)}
            for account in sorted({*self.limits, *self.held})
        }
