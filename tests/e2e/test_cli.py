"""The CLI as a subprocess: help, check-config, bad configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_demo import COMMAND


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", ["serve", "sandbox", "demo", "check-config"])
def test_help_for_each_command(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0
    assert f"usage: kounta-proxy {command}" in result.stdout


def test_python_dash_m_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert result.stdout.startswith("kounta-proxy ")


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[accounts.main]\nmode = "basic"\nclient_id = "cid"\nclient_secret = "very-secret-value"\n'
    )
    result = run("check-config", "--config", str(config), env={"KOUNTA_PROXY_SERVER__PORT": "9999"})
    assert result.returncode == 0, result.stderr
    assert "very-secret-value" not in result.stdout
    assert 'client_secret = "********"' in result.stdout
    assert "port = 9999" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[server]\nport = 'eighty'\n", "server.port: must be an integer, got a string"),
        ("[upstrem]\n", "upstrem: unknown key"),
        (
            "[upstream]\nbase_url = 'https://'\n",
            "upstream.base_url: must be an absolute http(s) URL",
        ),
        (
            "[accounts.a]\nmode = 'static'\ntoken_file = '/no/such/file'\n",
            "accounts.a.token_file: cannot read secret file /no/such/file",
        ),
    ],
)
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, command: str, content: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = run(command, "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert lines[0].startswith("kounta-proxy: config error: ")


def test_missing_config_file(tmp_path: Path) -> None:
    result = run("serve", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "config file not found" in result.stderr


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_no_accounts_says_what_to_add(tmp_path: Path, command: str) -> None:
    result = run(command, cwd=tmp_path)
    assert result.returncode == 2
    assert "no account configured" in result.stderr


def test_check_config_warns_when_the_admin_listener_is_exposed(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[accounts.main]\nmode = "static"\ntoken = "t"\n')
    quiet = run("check-config", "--config", str(config))
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
    exposed = run("check-config", "--config", str(config), env={"KOUNTA_PROXY_ADMIN__HOST": "::"})
    assert exposed.returncode == 0, exposed.stderr
    assert exposed.stderr.count("\n") == 1  # one line
    assert "warning: admin.host '::' is reachable beyond loopback" in exposed.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KOUNTA_PROXY_UPSTREAM__FORWARD_HEADERS": "Accept,X-Original-URL"},
            "upstream.forward_headers: X-Original-URL is never forwarded",
        ),
        ({"KOUNTA_PROXY_SERVER__HEADER_TIMEOUT": "0"}, "server.header_timeout: must be greater"),
        ({"KOUNTA_PROXY_AUTH__REFRESH_FLOOR": "-1"}, "auth.refresh_floor: must not be negative"),
        ({"KOUNTA_PROXY_ADMIN__ALLOWED_HOSTS": "a b"}, "admin.allowed_hosts: must hold host"),
    ],
)
def test_new_limits_are_validated_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[accounts.main]\nmode = "static"\ntoken = "t"\n')
    result = run("check-config", "--config", str(config), env=env)
    assert result.returncode != 0
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
