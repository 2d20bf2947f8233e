import os
from pathlib import Path
from typing import Any

import pytest

from proxy.headers import DEFAULT_FORWARDED
from proxy.settings import ConfigError, ConfigErrors, Secret, Settings, load, masked, to_toml

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kounta-proxy.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load(None, NO_ENV)
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8080
    assert settings.upstream.base_url == "https://api.kounta.com"
    assert settings.server.max_body_size == 10 * 1024 * 1024


def test_file_then_env_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 9000
        [upstream]
        connect_timeout = 2
        [accounts.main]
        mode = "static"
        token = "from-file"
        """,
    )
    env = {
        "KOUNTA_PROXY_SERVER__PORT": "9100",
        "KOUNTA_PROXY_ACCOUNTS__MAIN__TOKEN": "from-env",
        "OTHER": "x",
    }
    settings = load(path, env)
    assert settings.server.port == 9100
    assert settings.upstream.connect_timeout == 2.0
    assert settings.accounts["main"].token.reveal() == "from-env"
    assert settings.account_name == "main"


def test_secret_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    path = write(
        tmp_path,
        f'[accounts.a]\nmode = "basic"\nclient_id = "id"\nclient_secret_file = "{secret}"\n',
    )
    settings = load(path, NO_ENV)
    assert settings.accounts["a"].client_secret.reveal() == "s3cr3t-value"


def test_secret_file_from_env(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("tok")
    env = {"KOUNTA_PROXY_ACCOUNTS__A__TOKEN_FILE": str(secret)}
    assert load(write(tmp_path, ""), env).accounts["a"].token.reveal() == "tok"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nprot = 1\n", {}, "server.prot: unknown key"),
        ('[server]\nport = "80"\n', {}, "server.port: must be an integer, got a string"),
        ("[server]\nport = 70000\n", {}, "server.port: must be between 0 and 65535"),
        (
            "",
            {"KOUNTA_PROXY_SERVER__PORT": "eighty"},
            "KOUNTA_PROXY_SERVER__PORT (server.port): must be an integer, got 'eighty'",
        ),
        (
            '[upstream]\nbase_url = "ftp://x"\n',
            {},
            "upstream.base_url: must be an absolute http(s) URL",
        ),
        (
            '[upstream]\nbase_url = "http://api.kounta.com"\n',
            {},
            "upstream.base_url: must use https",
        ),
        ('[upstream]\nca_bundle = "/nope.pem"\n', {}, "upstream.ca_bundle: no such file"),
        ("[upstream]\nread_timeout = 0\n", {}, "upstream.read_timeout: must be greater than 0"),
        (
            "[upstream]\nkeepalive_timeout = -1\n",
            {},
            "upstream.keepalive_timeout: must not be negative",
        ),
        (
            "[upstream]\nkeepalive_timeout = nan\n",
            {},
            "upstream.keepalive_timeout: must be a number of seconds, got nan",
        ),
        (
            "",
            {"KOUNTA_PROXY_UPSTREAM__KEEPALIVE_TIMEOUT": "4s"},
            "KOUNTA_PROXY_UPSTREAM__KEEPALIVE_TIMEOUT (upstream.keepalive_timeout): must be a "
            "number, got '4s'",
        ),
        ('[log]\nlevel = "loud"\n', {}, "log.level: must be one of"),
        ('[accounts.a]\nmode = "static"\n', {}, "accounts.a.token: is required"),
        (
            '[accounts.a]\nmode = "basic"\nclient_secret_file = "/nonexistent/secret"\n',
            {},
            "accounts.a.client_secret_file: cannot read secret file",
        ),
        ("server = 3\n", {}, "server: must be a table, got an integer"),
        ("[server\n", {}, "is not valid TOML"),
        ('default_account = "x"\n', {}, "default_account: names no account"),
    ],
)
def test_bad_configuration_names_key_and_problem(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "absent.toml", NO_ENV)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.state_dir = "x"  # type: ignore[misc]


def test_secrets_are_masked_in_repr_and_dump(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[accounts.a]\nmode = "basic"\nclient_id = "id"\nclient_secret = "hunter2-secret"\n',
    )
    settings = load(path, NO_ENV)
    assert "hunter2-secret" not in repr(settings)
    dumped = to_toml(masked(settings))
    assert "hunter2-secret" not in dumped
    assert 'client_secret = "********"' in dumped
    assert "[accounts.a]" in dumped


def test_secret_type() -> None:
    s = Secret("x")
    assert str(s) == "Secret('********')" and s.reveal() == "x" and s == Secret("x") and bool(s)
    assert not Secret("")


OAUTH = """
[accounts.main]
mode = "oauth"
client_id = "id"
client_secret = "secret"
"""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KOUNTA_PROXY_SHARED__BACKEND": "redis"},
            "shared.token_key: is required with backend = 'redis' (it encrypts tokens and "
            "authenticates cache records in Redis); make one with `openssl rand",
        ),
        (
            {
                "KOUNTA_PROXY_SHARED__BACKEND": "redis",
                "KOUNTA_PROXY_SHARED__TOKEN_KEY": "G6lVdQ8yOXcSi9q3IPa7dxUiZ1r9JTJOOjRbySCXGHs=",
                "KOUNTA_PROXY_SHARED__TOKEN_KEY_PREVIOUS": "short",
            },
            "KOUNTA_PROXY_SHARED__TOKEN_KEY_PREVIOUS (shared.token_key_previous): must be a "
            "Fernet key",
        ),
        (
            {"KOUNTA_PROXY_SHARED__BACKEND": "redis", "KOUNTA_PROXY_SHARED__TOKEN_KEY": "short"},
            "KOUNTA_PROXY_SHARED__TOKEN_KEY (shared.token_key): must be a Fernet key",
        ),
        (
            {"KOUNTA_PROXY_SHARED__BACKEND": "redis", "KOUNTA_PROXY_SHARED__URL": "http://x"},
            "KOUNTA_PROXY_SHARED__URL (shared.url): must be a redis://, rediss:// or unix:// URL",
        ),
        (
            {"KOUNTA_PROXY_SHARED__REPLICAS": "0"},
            "KOUNTA_PROXY_SHARED__REPLICAS (shared.replicas): must be at least 1",
        ),
        (
            {"KOUNTA_PROXY_SHARED__TIMEOUT": "0"},
            "KOUNTA_PROXY_SHARED__TIMEOUT (shared.timeout): must be greater than 0",
        ),
    ],
)
def test_shared_settings_refuse_bad_values_in_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, OAUTH), env)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_every_redis_setup_needs_a_token_key_not_only_oauth_accounts(tmp_path: Path) -> None:
    """Cache records and messages are authenticated with a key derived from it."""
    static = '[accounts.main]\nmode = "static"\ntoken = "t"\n'
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, static), {"KOUNTA_PROXY_SHARED__BACKEND": "redis"})
    assert str(caught.value).startswith("shared.token_key: is required with backend = 'redis'")
    assert "shared.token_key_file" in str(caught.value) and "\n" not in str(caught.value)


def test_shared_token_key_from_a_file_is_a_masked_secret(tmp_path: Path) -> None:
    key = tmp_path / "token.key"
    key.write_text("G6lVdQ8yOXcSi9q3IPa7dxUiZ1r9JTJOOjRbySCXGHs=\n")
    env = {"KOUNTA_PROXY_SHARED__BACKEND": "redis", "KOUNTA_PROXY_SHARED__TOKEN_KEY_FILE": str(key)}
    settings = load(write(tmp_path, OAUTH), env)
    assert settings.shared.token_key.reveal().startswith("G6lV")
    assert "G6lV" not in to_toml(masked(settings))


def test_hardening_defaults(tmp_path: Path) -> None:
    settings = load(write(tmp_path, '[accounts.a]\nmode = "static"\ntoken = "t"\n'), NO_ENV)
    assert (settings.server.header_timeout, settings.server.max_connections) == (10.0, 1000)
    assert settings.admin.allowed_hosts == ("localhost", "127.0.0.1", "::1", "[::1]")
    assert settings.auth.floor_for(settings.accounts["a"]) == 30.0
    assert {"accept", "x-page", "user-agent"} <= settings.upstream.forwarded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[upstream]\nforward_headers = ['Accept']\n", "must include Content-Type"),
        (
            "[upstream]\nforward_headers = ['X-Forwarded-Host']\n",
            "X-Forwarded-Host is never forwarded",
        ),
        ("[upstream]\nforward_headers = ['Bad Name']\n", "must hold header names"),
        (
            "[upstream]\nforward_headers = ['Accept-Encoding']\n",
            "Accept-Encoding is never forwarded",  # the proxy asks for gzip itself
        ),
        ("[server]\nmax_connections = 0\n", "server.max_connections: must be at least 1"),
        (f"[admin]\nsocket = '/tmp/{'s' * 100}.sock'\n", "admin.socket: must be at most 104 bytes"),
        ("[accounts.a]\nmode = 'static'\ntoken = 't'\nrefresh_floor = -2\n", "refresh_floor"),
    ],
)
def test_hardening_settings_are_checked(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), NO_ENV)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_caller_key_header_is_never_forwarded(tmp_path: Path) -> None:
    text = "[inbound]\nkey_header = 'X-Secret'\n[upstream]\nforward_headers = [{}]\n"
    names = ", ".join(f"'{n}'" for n in ("X-Secret", *DEFAULT_FORWARDED))
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text.format(names)), NO_ENV)
    assert "caller key header X-Secret" in str(info.value)


def test_printed_settings_load_back_the_same(tmp_path: Path) -> None:
    # check-config's TOML is a settings file: every setting, unset ones (None) included.
    secret = tmp_path / "secret"
    secret.write_text("from-a-file")
    path = write(
        tmp_path,
        f"""
        [server]
        port = 9000
        [accounts.main]
        mode = "static"
        token = "t0ken"
        [accounts.other]
        mode = "basic"
        client_id = "c\\"i\\\\d\\t\\u007f é"
        client_secret_file = "{secret}"
        [[cache.rules]]
        path = "/v1/*"
        fresh_for = 30
        """,
    )
    settings = load(path, NO_ENV)
    assert settings.accounts["main"].refresh_floor is None
    printed = to_toml(masked(settings, files=True))
    again = load(write(tmp_path, printed), NO_ENV)
    assert masked(again) == masked(settings)
    # The secret read from a file is read from that file again, not a mask.
    assert again.accounts["other"].client_secret.reveal() == "from-a-file"
    assert again.accounts["main"].token.reveal() == "********"  # masked: the only change
    assert to_toml(masked(again, files=True)) == printed
    assert again.accounts["other"].client_id == 'c"i\\d\t\x7f é'


@pytest.mark.parametrize(
    ("env", "message"),
    [
        # One underscore where two belong: the variable, and the one it may have meant.
        (
            {"KOUNTA_PROXY_SERVER_PORT": "9000"},
            "KOUNTA_PROXY_SERVER_PORT: unknown setting (did you mean KOUNTA_PROXY_SERVER__PORT?)",
        ),
        (
            {"KOUNTA_PROXY_ACCOUNTS__MAIN__CLIENT_SECRETFILE": "/x"},
            "KOUNTA_PROXY_ACCOUNTS__MAIN__CLIENT_SECRETFILE: unknown setting",
        ),
        ({"KOUNTA_PROXY_SERVR__PORT": "1"}, "KOUNTA_PROXY_SERVR__PORT: unknown setting"),
        (
            {"KOUNTA_PROXY_SERVER__PORT": "eighty"},
            "KOUNTA_PROXY_SERVER__PORT (server.port): must be an integer, got 'eighty'",
        ),
        (
            {"KOUNTA_PROXY_SERVER__PORT": "70000"},
            "KOUNTA_PROXY_SERVER__PORT (server.port): must be between 0 and 65535",
        ),
    ],
)
def test_a_bad_variable_is_named(env: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, ""), env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_variables_problem_keeps_the_settings_path_as_its_key(tmp_path: Path) -> None:
    env = {"KOUNTA_PROXY_SERVER__PORT": "x", "KOUNTA_PROXY_ADMIN__PORT": "y"}
    with pytest.raises(ConfigErrors) as info:
        load(write(tmp_path, ""), env)
    assert [p.key for p in info.value.problems] == ["admin.port", "server.port"]
    assert str(info.value) == "KOUNTA_PROXY_ADMIN__PORT (admin.port): must be an integer, got 'y'"


def test_connection_limits_from_a_file(tmp_path: Path) -> None:
    # Settings for body deadlines and idle keep-alive connections
    text = '[server]\nkeepalive_timeout = 5\n[accounts.a]\nmode = "static"\ntoken = "t"\n'
    settings = load(write(tmp_path, text), NO_ENV)
    assert settings.server.keepalive_timeout == 5.0
    assert load(write(tmp_path, text.replace("= 5", "= 75")), NO_ENV) != settings
    with pytest.raises(ConfigError, match="keepalive_timeout"):
        load(write(tmp_path, text.replace("= 5", "= 0")), NO_ENV)
    assert (settings.server.body_timeout, settings.server.body_min_rate) == (30.0, 100.0)
    body = text.replace("keepalive_timeout = 5", "body_timeout = 5\nbody_min_rate = 0")
    server = load(write(tmp_path, body), NO_ENV).server
    assert (server.body_timeout, server.body_min_rate) == (5.0, 0.0)
    with pytest.raises(ConfigError, match="body_timeout"):
        load(write(tmp_path, body.replace("body_timeout = 5", "body_timeout = 0")), NO_ENV)
    with pytest.raises(ConfigError, match="body_min_rate"):
        load(write(tmp_path, body.replace("body_min_rate = 0", "body_min_rate = -1")), NO_ENV)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: os.mkfifo(p), "not a regular file (a FIFO)"),
        (lambda p: p.mkdir(), "not a regular file (a directory)"),
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file (a character device)"),
        (lambda p: p.write_bytes(b"k" * (2 * 1024**2)), "larger than 1048576 bytes"),
    ],
    ids=["fifo", "directory", "device", "huge"],
)
def test_a_secret_file_that_is_not_a_small_regular_file_is_refused_at_once(
    tmp_path: Path, make: Any, reason: str
) -> None:
    """Never a blocking open (a FIFO waits for a writer) or an endless read."""
    secret = tmp_path / "secret"
    make(secret)
    text = f'[accounts.a]\nmode = "static"\ntoken_file = "{secret}"\n'
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), NO_ENV)
    assert info.value.key == "accounts.a.token_file"
    assert f"cannot read secret file {secret}: {reason}" in str(info.value)


def test_a_misspelt_key_does_not_hide_a_bad_value_in_the_same_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[accounts.main]\nmode = "static"\ntoken = "abcdefghijklmnop"\n\n'
        '[[cache.rules]]\npath = "/v1/companies/*"\nfresh_fro = 10\nfresh_for = -3\n'
    )
    with pytest.raises(ConfigErrors) as caught:
        load(path, {})
    text = "\n".join(caught.value.lines())
    assert "cache.rules[0].fresh_fro: unknown key" in text
    assert "cache.rules[0].fresh_for: must not be negative" in text


def test_the_webhook_delivery_grace_is_a_setting(tmp_path: Path) -> None:
    base = '[accounts.main]\nmode = "static"\ntoken = "abcdefghijklmnop"\n\n[webhooks]\n'
    assert load(write(tmp_path, base), NO_ENV).webhooks.delivery_grace == 10.0
    settings = load(write(tmp_path, base + "delivery_grace = 2.5\n"), NO_ENV)
    assert settings.webhooks.delivery_grace == 2.5
    with pytest.raises(ConfigError, match=r"webhooks\.delivery_grace: must not be negative"):
        load(write(tmp_path, base + "delivery_grace = -1\n"), NO_ENV)
