"""The image's HEALTHCHECK: GET /healthz on the admin listener the running proxy uses.

The admin address comes from where the proxy takes it, in the proxy's order of precedence:
``KOUNTA_PROXY_ADMIN__PORT`` / ``KOUNTA_PROXY_ADMIN__HOST``, else ``[admin] port`` / ``host``
in the settings file, else the defaults (9464 on loopback). The settings file is the one the
container's main process was started with (``serve --config PATH``, read from PID 1's command
line, which also covers ``docker run --init``), else ``kounta-proxy.toml`` in its working
directory (the image's is /etc/kounta-proxy). A wildcard host is probed on loopback.

Standard library only; exit 0 when /healthz answers 200, 1 otherwise (with one line saying why).
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_PORT = 9464
DEFAULT_CONFIG = "kounta-proxy.toml"
WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}  # noqa: S104 - compared, not bound


def main_process(proc: Path) -> tuple[list[str], Path] | None:
    """PID 1's arguments and working directory, if it runs ``kounta-proxy ... serve``."""
    try:
        args = (proc / "1" / "cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = Path(os.readlink(proc / "1" / "cwd"))
    except OSError:
        return None
    names = [Path(arg).name for arg in args]
    if "kounta-proxy" not in names or "serve" not in args[names.index("kounta-proxy") :]:
        return None
    return args, cwd


def config_path(proc: Path, cwd: Path) -> Path:
    """The settings file the proxy reads: its --config, else kounta-proxy.toml where it runs."""
    found = main_process(proc)
    if found is None:
        return cwd / DEFAULT_CONFIG
    args, proxy_cwd = found
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return proxy_cwd / args[i + 1]
        if arg.startswith("--config="):
            return proxy_cwd / arg.partition("=")[2]
    return proxy_cwd / DEFAULT_CONFIG


def admin_settings(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            admin = tomllib.load(f).get("admin", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return admin if isinstance(admin, dict) else {}


def admin_url(env: Mapping[str, str], proc: Path, cwd: Path) -> str:
    admin = admin_settings(config_path(proc, cwd))
    port = env.get("KOUNTA_PROXY_ADMIN__PORT") or admin.get("port") or DEFAULT_PORT
    host = str(env.get("KOUNTA_PROXY_ADMIN__HOST", admin.get("host", "127.0.0.1"))).strip()
    if host in WILDCARDS:
        host = "::1" if ":" in host else "127.0.0.1"
    host = host.strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(port)}/healthz"


def main() -> int:
    try:
        url = admin_url(os.environ, Path("/proc"), Path.cwd())
    except ValueError as e:
        print(f"unhealthy: bad admin port: {e}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:  # noqa: S310 - http only
            status = answer.status
    except OSError as e:
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
