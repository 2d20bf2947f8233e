"""Check the deployment examples under deploy/, offline (``./dev ops-lint``; test_deploy.py).

- deploy/kubernetes/*.yaml: every document against the Kubernetes OpenAPI schemas that the
  ``kubernetes-validate`` package bundles (strict: an unknown field is an error), for the
  oldest version with native sidecars (1.29) and a current one; the settings file held in a
  Secret (``kounta-proxy.toml``) must load with the proxy's own loader.
- deploy/systemd/*.service: ``systemd-analyze verify`` (it needs no running systemd); the
  unit's ``/opt/kounta-proxy/bin/kounta-proxy`` is pointed at this environment's command for
  the check, since verify refuses a command that does not exist.

Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from proxy.settings import ConfigError, ConfigErrors, load

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Native sidecars (an init container with restartPolicy: Always) are on by default from 1.29.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
UNIT_COMMAND = "/opt/kounta-proxy/bin/kounta-proxy"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubernetes_problems(path: Path) -> Iterator[str]:
    for document in documents(path):
        what = f"{path.name}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                yield f"{what}: Kubernetes {version}: {where}: {e.message}"
        for name, text in document.get("stringData", {}).items():
            if name.endswith(".toml"):
                yield from settings_problems(f"{what} {name}", text)


def settings_problems(what: str, text: str) -> Iterator[str]:
    """The proxy's loader on a settings file (``*_file`` secrets need not exist here: they
    are mounted in the pod, so each is given a stand-in file)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        yield f"{what}: not TOML: {e}"
        return
    with tempfile.TemporaryDirectory() as tmp:
        stand_ins = _stand_ins(raw, Path(tmp))
        config = Path(tmp) / "kounta-proxy.toml"
        config.write_text(_replace(text, stand_ins))
        try:
            load(config, {})
        except ConfigErrors as e:
            yield from (f"{what}: {line}" for line in e.lines())
        except ConfigError as e:
            yield f"{what}: {e}"


def _stand_ins(raw: Any, tmp: Path) -> dict[str, str]:
    """``*_file`` paths in ``raw`` mapped to stand-in files under ``tmp``."""
    found: dict[str, str] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key.endswith("_file") and isinstance(item, str):
                    stand_in = tmp / f"secret{len(found)}"
                    # A Fernet key for token_key, a plain value for the rest.
                    stand_in.write_text("A" * 43 + "=" if key == "token_key_file" else "x" * 32)
                    found[item] = str(stand_in)
                else:
                    walk(item)

    walk(raw)
    return found


def _replace(text: str, paths: dict[str, str]) -> str:
    for old, new in paths.items():
        text = text.replace(f'"{old}"', f'"{new}"')
    return text


def unit_problems(path: Path, command: str | None = None) -> Iterator[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        yield f"{path.name}: systemd-analyze is not installed (Debian package systemd)"
        return
    command = command or str(Path(sys.executable).parent / "kounta-proxy")
    text = path.read_text()
    if UNIT_COMMAND not in text:
        yield f"{path.name}: ExecStart does not run {UNIT_COMMAND}"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(text.replace(UNIT_COMMAND, command))
        done = subprocess.run(  # noqa: S603 - systemd's own checker on our file
            [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
        )
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or output:
        yield f"{path.name}: systemd-analyze verify: {output or f'exit {done.returncode}'}"


def problems(root: Path = DEPLOY) -> list[str]:
    found = [
        p for path in sorted(root.glob("kubernetes/*.yaml")) for p in kubernetes_problems(path)
    ]
    found += [p for path in sorted(root.glob("systemd/*.service")) for p in unit_problems(path)]
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(f"check_deploy: {line}", file=sys.stderr)
    checked = len(list(DEPLOY.glob("kubernetes/*.yaml"))) + len(list(DEPLOY.glob("systemd/*")))
    if not found:
        print(f"check_deploy: {checked} files under deploy/ are valid", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
