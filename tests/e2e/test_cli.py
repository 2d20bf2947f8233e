"""The CLI as a subprocess: help, check-config, bad configuration."""

from __future__ import annotations

import contextlib
import os
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


def test_serve_help_says_the_workers_admin_listeners_are_unix_sockets() -> None:
    text = " ".join(run("serve", "--help").stdout.split())
    assert "admin.port + K" not in text and "Unix socket" in text


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


STATIC = '[accounts.main]\nmode = "static"\ntoken = "t"\n'


def test_check_config_reports_every_problem_at_once_with_suggestions(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        "[server]\nprot = 8081\n[admin]\nport = 'x'\n"
        "[upstream]\nbase_url = 'https://api.kounta.com/v1'\n"
        "[accounts.main]\nmode = 'static'\ntokn = 't'\nclient_secret_fle = 'x'\n"
    )
    result = run("check-config", "--config", str(config))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("kounta-proxy: config error: ") for line in lines)
    text = result.stderr
    assert "server.prot: unknown key (did you mean 'port'?)" in text
    assert "admin.port: must be an integer, got a string" in text
    assert "upstream.base_url: must be an origin without a path" in text
    assert "'https://api.kounta.com'" in text
    assert "accounts.main.tokn: unknown key (did you mean 'token'?)" in text
    assert (
        "accounts.main.client_secret_fle: unknown key (did you mean 'client_secret_file'?)" in text
    )
    assert len(lines) == 5, text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "[server]\nport = 8080\n[admin]\nport = 8080\n",
            "admin.port: is the same as server.port (8080)",
        ),
        (
            "state_dir = '{blocker}/state'\n",
            "state_dir: {blocker}/state is not a writable directory: {blocker} is not a directory",
        ),
    ],
)
def test_check_config_refuses_what_serve_could_not_run(
    tmp_path: Path, content: str, message: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    config = tmp_path / "c.toml"
    config.write_text(content.format(blocker=blocker) + STATIC)
    result = run("check-config", "--config", str(config))
    assert result.returncode == 2, result.stdout
    assert message.format(blocker=blocker) in result.stderr
    # One line a problem (an unusable state_dir takes the cache directory under it along).
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("kounta-proxy: config error: ") for line in lines)
    assert len(lines) == (2 if "state_dir" in content else 1), lines


def test_check_config_creates_nothing_and_warns_of_a_missing_oauth_token(tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("oauth-secret-value-0001\n")
    state = tmp_path / "not-yet"
    config = tmp_path / "my config.toml"
    config.write_text(
        f"state_dir = '{state}'\n[accounts.shop]\nmode = 'oauth'\nclient_id = 'cid'\n"
        f"client_secret_file = '{secret}'\n"
    )
    result = run("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert not state.exists()
    assert f'client_secret_file = "{secret}"' in result.stdout  # loads back as it was
    assert "oauth-secret-value-0001" not in result.stdout + result.stderr
    (warning,) = result.stderr.strip().splitlines()
    assert warning.startswith("kounta-proxy: warning: account 'shop' has no token yet")
    assert warning.endswith(f"run: kounta-proxy authorize --account shop --config '{config}'")


def test_cache_purge_of_an_unknown_account_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"state_dir = '{tmp_path}'\n" + STATIC)
    (tmp_path / "cache").mkdir()
    result = run("cache", "purge", "--config", str(config), "--account", "mian")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "kounta-proxy: no account named 'mian' in the settings (accounts: main)"
    )
    result = run("cache", "purge", "--config", str(config), "--account", "main")
    assert (result.returncode, result.stdout.strip()) == (0, '{"purged": 0}')


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
            "KOUNTA_PROXY_UPSTREAM__FORWARD_HEADERS (upstream.forward_headers): X-Original-URL is never forwarded",
        ),
        (
            {"KOUNTA_PROXY_SERVER__HEADER_TIMEOUT": "0"},
            "KOUNTA_PROXY_SERVER__HEADER_TIMEOUT (server.header_timeout): must be greater",
        ),
        (
            {"KOUNTA_PROXY_AUTH__REFRESH_FLOOR": "-1"},
            "KOUNTA_PROXY_AUTH__REFRESH_FLOOR (auth.refresh_floor): must not be negative",
        ),
        (
            {"KOUNTA_PROXY_ADMIN__ALLOWED_HOSTS": "a b"},
            "KOUNTA_PROXY_ADMIN__ALLOWED_HOSTS (admin.allowed_hosts): must hold host",
        ),
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


def test_check_config_prints_a_file_that_loads_back_the_same(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    config = tmp_path / "c.toml"
    config.write_text(
        "[server]\nport = 9000\n\n"
        '[accounts.main]\nmode = "basic"\nclient_id = "cid"\n'
        f'client_secret_file = "{secret}"\n\n'
        '[accounts."shop.two"]\nmode = "static"\ntoken = "t0ken"\n'
    )
    env = {"KOUNTA_PROXY_STATE_DIR": str(tmp_path / "state")}
    first = run("check-config", "--config", str(config), env=env)
    assert first.returncode == 0, first.stderr
    assert "# refresh_floor: not set" in first.stdout  # never refresh_floor = ""
    assert f'client_secret_file = "{secret}"' in first.stdout
    printed = tmp_path / "printed.toml"
    printed.write_text(first.stdout)
    again = run("check-config", "--config", str(printed), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_check_config_says_first_when_no_file_is_read(tmp_path: Path) -> None:
    env = {"KOUNTA_PROXY_ACCOUNTS__MAIN__MODE": "static", "KOUNTA_PROXY_ACCOUNTS__MAIN__TOKEN": "t"}
    result = run("check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("kounta-proxy: no config file (kounta-proxy.toml not found")
    # With nothing else set either: the same line first, then the problem.
    bare = run("check-config", cwd=tmp_path)
    assert bare.returncode == 2
    assert bare.stderr.splitlines()[0] == first
    assert "no account configured" in bare.stderr.splitlines()[1]
    # A file found in the working directory: no such line.
    (tmp_path / "kounta-proxy.toml").write_text("")
    found = run("check-config", cwd=tmp_path, env=env)
    assert "no config file" not in found.stderr


def test_a_variable_with_one_underscore_too_few_is_named(tmp_path: Path) -> None:
    env = {"KOUNTA_PROXY_ACCOUNTS__MAIN__MODE": "static", "KOUNTA_PROXY_ACCOUNTS__MAIN__TOKEN": "t"}
    result = run("check-config", cwd=tmp_path, env={**env, "KOUNTA_PROXY_SERVER_PORT": "9000"})
    assert result.returncode == 2
    assert (
        "KOUNTA_PROXY_SERVER_PORT: unknown setting (did you mean KOUNTA_PROXY_SERVER__PORT?)"
        in result.stderr
    )
    assert "server_port" not in result.stderr


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("which", ["token_file", "config"])
def test_a_fifo_for_a_secret_or_the_config_is_one_line_not_a_hang(
    tmp_path: Path, command: str, which: str
) -> None:
    """Opening a FIFO with no writer blocks; a secret file or the config
    file that is not a regular file is refused in one line instead."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = tmp_path / "proxy.toml"
    config.write_text(f'[accounts.a]\nmode = "static"\ntoken_file = "{fifo}"\n')
    target = fifo if which == "config" else config
    try:
        result = subprocess.run(
            [COMMAND, command, "--config", str(target)], capture_output=True, text=True, timeout=10
        )
    finally:
        release(fifo)  # a reader still blocked in open() (the old code) gets EOF and ends
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "not a regular file (a FIFO)" in lines[0] and str(fifo) in lines[0]


def release(fifo: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
