"""bench.fleet's own arithmetic (the bench prints numbers; nothing here asserts a rate)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.fleet import (
    arguments,
    bucket_quantile,
    classes,
    classes_settings,
    sandbox_config,
    settings_for,
)
from bench.fleet_processes import replica_config
from proxy import cli
from proxy.settings.load import load


def test_bucket_quantile_interpolates_as_prometheus_does() -> None:
    # 10 observations: 4 at or under 0.1 s, 9 at or under 0.5 s, 1 above 1 s.
    buckets = [(0.1, 4.0), (0.5, 9.0), (1.0, 9.0), (math.inf, 10.0)]
    assert bucket_quantile(buckets, 0.2) == 0.05  # rank 2 of 4 in (0, 0.1]
    assert bucket_quantile(buckets, 0.5) == 0.1 + 0.4 * (1 / 5)
    assert bucket_quantile(buckets, 0.99) == 1.0  # in +Inf: the highest finite bound
    assert bucket_quantile([], 0.5) is None
    assert bucket_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5) is None


def test_the_classes_workload_has_no_cache_rule_and_classed_callers(tmp_path: object) -> None:
    args = arguments(["--batch", "2", "--interactive", "3", "--reserve", "0.2"])
    assert classes(args) and not classes(arguments([]))
    settings = classes_settings("http://127.0.0.1:1", str(tmp_path), args)
    assert settings.cache.rules == ()
    assert settings.budget.reserve == 0.2
    priorities = sorted((n, c.priority) for n, c in settings.callers.items())
    assert priorities == [
        ("batch0", "batch"),
        ("batch1", "batch"),
        ("till0", "interactive"),
        ("till1", "interactive"),
        ("till2", "interactive"),
    ]


def test_token_ttl_makes_the_account_oauth_against_a_short_lived_sandbox(tmp_path: object) -> None:
    args = arguments(["--token-ttl", "10", "--rotate-refresh"])
    settings = settings_for("http://127.0.0.1:1", str(tmp_path), args)
    account = settings.accounts["main"]
    assert account.mode == "oauth" and account.token_url == "http://127.0.0.1:1/v1/token"
    config = sandbox_config(args)
    assert config.access_token_lifetime == 10 and config.rotate_refresh_tokens
    assert account.refresh_token.reveal() in config.refresh_tokens
    static = arguments([])
    assert (
        settings_for("http://127.0.0.1:1", str(tmp_path), static).accounts["main"].mode == "static"
    )
    assert sandbox_config(static).access_token_lifetime == 3600


def test_rotation_without_a_token_ttl_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        arguments(["--rotate-refresh"])
    assert "--rotate-refresh needs --token-ttl" in capsys.readouterr().err


def test_the_sandbox_command_takes_a_token_lifetime_and_rotation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = cli.parser().parse_args(
        ["sandbox", "--token-ttl", "2.5", "--rotate-refresh", "--refresh-token", "r1"]
    )
    config = cli.sandbox_config(args)
    assert (config.access_token_lifetime, config.rotate_refresh_tokens) == (2.5, True)
    assert config.refresh_tokens == ("r1",)
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args(["sandbox", "--token-ttl", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert "--token-ttl: must be a positive number of seconds" in err[-1]


def test_processes_give_each_replica_the_in_process_runs_settings(tmp_path: Path) -> None:
    """bench.fleet --processes writes each `serve` a TOML file: loaded as serve loads it, it
    holds what the in-process run builds (callers and classes, no cache rule, the reserve)
    plus the shared budget in Redis."""
    args = arguments(["--processes", "--batch", "2", "--interactive", "3", "--replicas", "3",
                      "--reserve", "0.2"])  # fmt: skip
    config = tmp_path / "replica0.toml"
    config.write_text(replica_config(args, "http://127.0.0.1:1", "redis://127.0.0.1:2/0",
                                     tmp_path / "r0", 3, 4))  # fmt: skip
    loaded = load(config, env={})
    built = classes_settings("http://127.0.0.1:1", str(tmp_path), args)
    assert {n: (c.key.reveal(), c.priority) for n, c in loaded.callers.items()} == {
        n: (c.key.reveal(), c.priority) for n, c in built.callers.items()
    }
    assert loaded.cache.rules == () and loaded.budget.reserve == 0.2
    assert (loaded.server.port, loaded.admin.port) == (3, 4)
    shared = loaded.shared
    assert (shared.backend, shared.replicas, shared.key_prefix) == ("redis", 3, args.key_prefix)
    assert shared.token_key.reveal() == args.token_key
