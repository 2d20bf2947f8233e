"""The deployment examples (deploy/): valid against the Kubernetes schemas and systemd's own
checker, offline, and saying what a sidecar needs (scripts/check_deploy.py, run by
``./dev ops-lint``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "scripts" / "check_deploy.py"
    spec = importlib.util.spec_from_file_location("check_deploy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_deploy = _load()

MANIFEST = check_deploy.DEPLOY / "kubernetes" / "kounta-proxy-sidecar.yaml"
UNIT = check_deploy.DEPLOY / "systemd" / "kounta-proxy.service"


def test_the_examples_are_valid() -> None:
    assert check_deploy.problems() == []


def by_kind(kind: str, name: str = "") -> dict[str, Any]:
    (found,) = [
        d
        for d in check_deploy.documents(MANIFEST)
        if d["kind"] == kind and d["metadata"]["name"].startswith(name)
    ]
    return found


def test_the_proxy_is_a_native_sidecar_with_probes_limits_and_mounted_settings() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (proxy,) = [c for c in pod["initContainers"] if c["name"] == "kounta-proxy"]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["livenessProbe"]["httpGet"]["path"] in ("/healthz", "/livez")
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["startupProbe"]["httpGet"]["path"] in ("/healthz", "/livez")
    assert {"cpu", "memory"} <= set(proxy["resources"]["limits"])
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = volumes[mounts["/etc/kounta-proxy"]]
    assert config["secret"]["secretName"] == "kounta-proxy-config"
    settings = by_kind("Secret", "kounta-proxy-config")["stringData"]["kounta-proxy.toml"]
    assert 'backend = "redis"' in settings and "url = " in settings
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    assert env["KOUNTA_PROXY_SERVER__HOST"] == "127.0.0.1"  # only the pod reaches it
    assert by_kind("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_a_misspelt_field_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "k.yaml"
    broken.write_text(MANIFEST.read_text().replace("restartPolicy:", "restartPolcy:"))
    found = list(check_deploy.kubernetes_problems(broken))
    assert found and all("restartPolcy" in line for line in found), found


def test_a_bad_setting_in_the_secret_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "k.yaml"
    broken.write_text(MANIFEST.read_text().replace("port = 9464", "port = -1"))
    found = list(check_deploy.kubernetes_problems(broken))
    assert any("admin.port" in line for line in found), found


@pytest.mark.parametrize(
    ("old", "new"),
    [("ExecReload=", "ExecReloadd="), ("Type=exec", "Type=sometimes")],
)
def test_a_broken_unit_is_caught(tmp_path: Path, old: str, new: str) -> None:
    broken = tmp_path / "kounta-proxy.service"
    broken.write_text(UNIT.read_text().replace(old, new))
    found = list(check_deploy.unit_problems(broken))
    assert found, f"{new} passed systemd-analyze verify"
