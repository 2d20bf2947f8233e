"""docker-compose.yml: every container hardened and limited, nothing published beyond loopback,
secrets as compose secrets, and the scale profile's replicas sharing one Redis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.ops_tools import prometheus_tool
from tests.promql import ROOT, load_yaml

COMPOSE = ROOT / "docker-compose.yml"
STATE_DIR = "/var/lib/kounta-proxy"


def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def proxies() -> dict[str, dict[str, Any]]:
    """The services that run the proxy itself (the image's default command)."""
    return {
        name: s
        for name, s in services().items()
        if s.get("image", "").startswith("kounta-proxy:") and "entrypoint" not in s
    }


def test_the_file_is_valid_against_the_compose_specification() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    done = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(services()))
def test_every_container_is_hardened_and_limited(name: str) -> None:
    service = services()[name]
    assert service.get("read_only") is True
    assert service.get("cap_drop") == ["ALL"]
    assert "no-new-privileges:true" in service.get("security_opt", [])
    limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
    assert service.get("mem_limit") or limits.get("memory"), "no memory limit"
    assert service.get("cpus") or limits.get("cpus"), "no CPU limit"
    assert service.get("pids_limit") or limits.get("pids"), "no pids limit"
    for port in service.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"{port} is published beyond loopback"


def test_the_proxy_writes_only_to_its_state_volume_and_a_tmpfs() -> None:
    declared = compose()["volumes"]
    assert proxies(), "no proxy service found"
    for name, service in proxies().items():
        targets = {}
        for volume in service["volumes"]:
            source, target, *mode = volume.split(":")
            targets[target] = source
            assert target == STATE_DIR or mode == ["ro"], f"{name}: {volume} is writable"
        assert targets[STATE_DIR] in declared, f"{name}: the state is not a named volume"
        assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"]), name


def test_secrets_are_compose_secrets_not_a_bind_mount() -> None:
    declared = compose()["secrets"]
    for name, service in proxies().items():
        if name == "kounta-proxy-demo":
            continue  # the demo's static token is in its settings file
        assert not any("/run/secrets" in v for v in service["volumes"]), name
        assert set(service["secrets"]) <= set(declared), name
        assert service["secrets"], name
    for secret in declared.values():
        assert secret["file"].startswith("./secrets/")
    # The permissions uid 10001 needs are written down where the secrets are.
    assert "10001" in COMPOSE.read_text()


def test_the_scale_profile_shares_one_private_redis() -> None:
    all_services = services()
    redis = all_services["redis"]
    assert "ports" not in redis, "Redis must not be published"
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert command[command.index("--appendonly") + 1] == "yes"
    scaled = [s for s in proxies().values() if "scale" in s.get("profiles", [])]
    assert len(scaled) == 1
    (scale,) = scaled
    assert scale["deploy"]["replicas"] == 3
    env = scale["environment"]
    assert env["KOUNTA_PROXY_SHARED__BACKEND"] == "redis"
    url = urlsplit(env["KOUNTA_PROXY_SHARED__URL"])
    assert url.scheme == "redis"
    assert url.hostname in all_services
    assert "scale" in all_services[url.hostname]["profiles"]
    assert int(env["KOUNTA_PROXY_SHARED__REPLICAS"]) == scale["deploy"]["replicas"]
    assert scale["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("profile", ["demo", "live", "scale"])
def test_each_profile_has_one_prometheus_and_grafana(profile: str) -> None:
    running = [n for n, s in services().items() if profile in s.get("profiles", [])]
    prometheus = [n for n in running if services()[n]["image"].startswith("prom/prometheus")]
    assert len(prometheus) == 1
    assert "grafana" in running
    mounts = dict(v.split(":")[1::-1] for v in services()[prometheus[0]]["volumes"])
    assert mounts["/etc/prometheus/alerts.yml"] == "./config/alerts.yml"
    config = ROOT / mounts["/etc/prometheus/prometheus.yml"]
    done = subprocess.run(
        [prometheus_tool("promtool"), "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(services()))
def test_every_container_rotates_its_logs(name: str) -> None:
    # One JSON line per request: without a size limit the json-file log grows without end.
    logging = services()[name].get("logging", {})
    options = logging.get("options", {})
    assert logging.get("driver") in ("json-file", "local"), name
    assert options.get("max-size") and int(options.get("max-file", "0")) >= 1, name
