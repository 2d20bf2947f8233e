"""``kounta-proxy serve --workers N``: N processes serving one port, as N replicas.

The parent starts N ``serve`` processes with the same settings plus two variables:
``server.reuse_port`` (each binds the port with SO_REUSEPORT and the kernel spreads
connections over them) and ``admin.port + K`` for worker K. Each worker is a replica for the
shared backend, exactly like a separate pod, so N > 1 needs ``[shared] backend = "redis"``:
with the local backend each worker would keep its own budget and together they would send N
times the account's rate.

Metrics: each worker is its own scrape target (``admin.port + K``), as replicas are.
prometheus-client's multiprocess mode, which would aggregate them behind one port, cannot carry
the proxy's own collectors (loop-local counters and histograms, callback gauges), so it is not
used; Prometheus sums over the targets instead.

The parent owns the signals: SIGTERM and SIGINT are forwarded to every worker, which drain as
a single ``serve`` does; the parent exits when all have, with the worst exit code. SIGHUP is
forwarded too: each worker reloads the configuration file itself (``proxy.ops.reload``), so a
reload of the parent is a reload of every worker (the parent keeps no settings of its own
that a reload could change). A worker
that dies on its own stops the others (the supervisor — systemd, Kubernetes — restarts the
whole set).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from proxy.logs import configure, event
from proxy.settings import ConfigError, Settings

POLL_SECONDS = 0.2


def check(settings: Settings, workers: int) -> None:
    """One line for each reason N workers cannot run with these settings."""
    if workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {workers}")
    if workers == 1:
        return
    if settings.shared.backend == "local":
        raise ConfigError(
            "--workers",
            f"{workers} workers need [shared] backend = 'redis': with backend = 'local' each "
            f"worker keeps its own rate budget and together they would send {workers} times "
            "the account's rate",
        )
    if settings.server.port == 0:
        raise ConfigError("server.port", "must be a fixed port with --workers (they share it)")
    if settings.admin.enabled and settings.admin.port == 0:
        raise ConfigError("admin.port", "must be a fixed port with --workers (K uses port + K)")


def run(settings: Settings, config: Path | None, workers: int) -> int:
    """Start the workers, forward signals, wait; the worst exit code."""
    check(settings, workers)
    configure(settings.log.level, settings.log.format)
    children = [_spawn(settings, config, k, workers) for k in range(workers)]
    event("workers_started", workers=workers, pids=[c.pid for c in children])
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while any(child.poll() is None for child in children):
        failed = [c for c in children if c.returncode not in (None, 0)]
        if failed and not stopping:
            event("worker_exited", logging.ERROR, pid=failed[0].pid, code=failed[0].returncode)
            forward(signal.SIGTERM, None)
        time.sleep(POLL_SECONDS)
    codes = [child.returncode for child in children]
    event("workers_stopped", codes=codes)
    return max(codes, key=abs)


def _spawn(
    settings: Settings, config: Path | None, index: int, workers: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KOUNTA_PROXY_SERVER__REUSE_PORT": "true",
        "KOUNTA_PROXY_ADMIN__PORT": str(settings.admin.port + index),
        # Each worker is a replica: while Redis is away each sends rate / (replicas * workers).
        "KOUNTA_PROXY_SHARED__REPLICAS": str(settings.shared.replicas * workers),
    }
    command = [sys.executable, "-m", "proxy", "serve"]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.Popen(command, env=env)  # noqa: S603 - our own command, fixed arguments
