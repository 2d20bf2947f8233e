"""``kounta-proxy webhooks sync|list|remove`` as a process, against the sandbox's webhooks
resource on a real socket, through the account's credentials and budget."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from proxy.sandbox.webhooks import SANDBOX_HOOKS
from tests.conftest import TOKEN, Sandbox

SECRET = "cli-hook-secret-0123456789"


def config(tmp_path: Path, sandbox: Sandbox, subscribe: str) -> Path:
    secret = tmp_path / "hook-secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
state_dir = "{tmp_path / "state"}"
[upstream]
base_url = "{sandbox.url}"
[accounts.main]
mode = "static"
token = "{TOKEN}"
[webhooks]
secret_file = "{secret}"
subscribe = {subscribe}
"""
    )
    return path


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "webhooks", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


ADDRESS = "http://127.0.0.1:9466"
HOOK_URL = f"{ADDRESS}/webhooks/kounta/main"


async def test_sync_is_idempotent_reports_refused_topics_and_remove_cleans_up(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    path = config(tmp_path, sandbox, '["products/updated", "orders/completed", "bogus/topic"]')
    hooks = sandbox.app[SANDBOX_HOOKS]
    base = ("--config", str(path), "--account", "main", "--address", ADDRESS)
    code, out, err = await cli("sync", *base, "--dry-run")
    assert code == 0, err
    assert "create products/updated (dry run)" in out and hooks.records == {}
    code, out, err = await cli("sync", *base)
    assert code == 0, err
    assert "create products/updated" in out and "create orders/completed" in out
    assert "refused, skipped" in out and "bogus/topic" in out
    assert sorted(h["topic"] for h in hooks.records.values()) == [
        "orders/completed",
        "products/updated",
    ]
    for hook in hooks.records.values():
        assert hook["address"] == HOOK_URL
        assert hook["headers"] == {"Authorization": f"Bearer {SECRET}"}
        assert hook["format"] == "json"
    served = sandbox.state.served(method="POST")
    code, out, err = await cli("sync", *base)
    assert code == 0, err
    # Nothing changes; only the refused topic is asked for again (and refused again).
    assert out.count("unchanged") == 2 and "refused, skipped" in out
    assert sandbox.state.served(method="POST") == served + 1
    assert sandbox.state.served(method="PUT") == 0
    code, out, err = await cli("list", *base)
    assert code == 0 and "(this proxy)" in out and SECRET not in out + err
    code, out, err = await cli("remove", *base)
    assert code == 0, err
    assert hooks.records == {}


@pytest.mark.parametrize(
    ("address", "message"),
    [("http://hooks.example.com", "https"), ("", "no address"), ("ftp://x", "absolute URL")],
)
async def test_a_bad_address_is_one_line(
    tmp_path: Path, sandbox: Sandbox, address: str, message: str
) -> None:
    path = config(tmp_path, sandbox, "[]")
    code, _, err = await cli("sync", "--config", str(path), "--address", address)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
