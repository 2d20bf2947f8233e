"""The house rule on size: no module of the proxy is longer than 600 lines. One that grows
past it is split by what it does (docs/design.md names the rooms), not trimmed."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def test_every_module_of_the_proxy_is_at_most_600_lines() -> None:
    lengths = {
        p: len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.glob("proxy/**/*.py")
    }
    assert lengths, "no modules found"
    longer = {str(p.relative_to(ROOT)): n for p, n in sorted(lengths.items()) if n > MAX_LINES}
    assert longer == {}
