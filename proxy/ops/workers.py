"""``kounta-proxy serve --workers N``: N processes serving one port, as N replicas.

The parent starts N ``serve`` processes with the same settings plus a few variables:
``server.reuse_port`` (each binds the port with SO_REUSEPORT and the kernel spreads
connections over them) and ``admin.socket``, a Unix socket of its own for worker K's admin
listener. Each worker is a replica for the shared backend, exactly like a separate pod, so
N > 1 needs ``[shared] backend = "redis"``: with the local backend each worker would keep its
own budget and together they would send N times the account's rate.

Admin: the parent runs the one admin listener on ``admin.host:admin.port``, with the same
Host/Origin guard as a single ``serve``. The workers' admin listeners are Unix sockets in a
private directory (``mkdtemp``: mode 0700, under the system's temporary directory so that
the path stays within the 104 bytes a socket path may have), which only the parent (and
root) can reach: no port to collide with, nothing a browser or another user can reach.

- ``/metrics``: every worker's exposition, scraped concurrently (``SCRAPE_TIMEOUT``) and
  merged by :mod:`proxy.ops.aggregate` (counters and histograms summed, configuration and
  state gauges by their maximum), plus ``kounta_proxy_workers_up`` and
  ``kounta_proxy_workers_scrape_errors_total``; a worker that does not answer is left out.
  prometheus-client's multiprocess mode is not used: it cannot carry the proxy's own
  collectors (loop-local counters and histograms, callback gauges).
- ``/healthz``: 200 while the parent runs and at least one worker answers its own.
- ``/readyz``: 200 only when every worker is ready; the body holds each worker's checks.
- every other route (``/cache/*``, ``/budget``) is forwarded: reads (GET, HEAD) to the
  first worker that answers (the state they show is in the shared backend or the shared
  disk cache), changes (``POST /cache/purge``) to every worker, because each worker keeps
  its own memory tier; the answer is worker 0's, or the first failure.

The parent owns the signals: SIGTERM and SIGINT are forwarded to every worker, which drain as
a single ``serve`` does; the parent exits when all have, with the worst exit code. SIGHUP is
forwarded too: each worker reloads the configuration file itself (``proxy.ops.reload``), and
the parent reads it again for the one live setting its own listener uses, the admin token
(the previous one still accepted for ``inbound.key_overlap`` seconds, as in a worker). A
worker that dies on its own stops the others (the supervisor — systemd, Kubernetes — restarts
the whole set).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    generate_latest,
)

from proxy import eventloop
from proxy.edge.answer import stamp_server
from proxy.edge.callers import AdminToken
from proxy.errors import code_for
from proxy.listener import StartupError, bound_port, start
from proxy.logs import WORKER_ENV, configure, event
from proxy.metrics import Registry
from proxy.ops.admin import add_livez, exposure_warning, json_answer, middlewares
from proxy.ops.aggregate import merge_families, parse
from proxy.ops.metrics import WorkersMetrics
from proxy.ops.reload import READ_TIMEOUT, in_thread
from proxy.settings import ConfigError, Settings, load

POLL_SECONDS = 0.2
SCRAPE_TIMEOUT = 2.0  # per worker, for /metrics, /healthz and /readyz
FORWARD_TIMEOUT = 30.0  # admin routes (a purge may take a while on a large cache)
GRACE = 5.0
FORWARDED_HEADERS = ("Content-Type", "Accept")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def check(settings: Settings, workers: int) -> None:
    """One line for each reason N workers cannot run with these settings."""
    if workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {workers}")
    eventloop.resolve(settings.server.event_loop)  # one line here, not one per worker
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
    if settings.admin.socket:
        raise ConfigError("admin.socket", "is set by --workers for each worker; leave it empty")


def run(settings: Settings, config: Path | None, workers: int) -> int:
    """Start the workers and the one admin listener, forward signals, wait; the worst exit
    code."""
    check(settings, workers)
    configure(settings.log.level, settings.log.format)
    with tempfile.TemporaryDirectory(prefix="kounta-proxy-workers-") as private:
        sockets = [f"{private}/w{k}.sock" for k in range(workers)]
        return asyncio.run(_supervise(settings, config, sockets))


@dataclass
class AdminTokenRef:
    """The parent listener's admin token; a SIGHUP replaces it (:func:`_reload_token`)."""

    current: AdminToken


async def _supervise(settings: Settings, config: Path | None, sockets: list[str]) -> int:
    admin = settings.admin.enabled
    token = AdminTokenRef(AdminToken(settings.admin.token))
    # The admin listener first: a busy admin.port is one line before any worker starts.
    runner = await _start_admin(settings, sockets, token) if admin else None
    try:
        return await _watch(
            [
                _spawn(settings, config, len(sockets), path if admin else "", k)
                for k, path in enumerate(sockets)
            ],
            functools.partial(_reload_token, token, config),
        )
    finally:
        if runner is not None:
            await runner.cleanup()


async def _watch(
    children: list[subprocess.Popen[bytes]],
    on_reload: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Forward signals to the workers until all have exited; the worst exit code.
    ``on_reload``: the parent's own part of a SIGHUP."""
    event("workers_started", workers=len(children), pids=[c.pid for c in children])
    stopping = False
    reloads: set[asyncio.Task[None]] = set()

    def forward(signum: int) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        elif on_reload is not None:
            task = asyncio.ensure_future(on_reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, forward, signum)
    # poll() every child (any() would stop at the first one alive, and a dead worker after
    # it would go unnoticed until that one exits).
    while None in [child.poll() for child in children]:
        failed = [c for c in children if c.returncode not in (None, 0)]
        if failed and not stopping:
            event("worker_exited", logging.ERROR, pid=failed[0].pid, code=failed[0].returncode)
            forward(signal.SIGTERM)
        await asyncio.sleep(POLL_SECONDS)
    codes = [child.returncode for child in children]
    event("workers_stopped", codes=codes)
    return max(codes, key=abs)


async def _reload_token(token: AdminTokenRef, config: Path | None) -> None:
    """The configuration read again (in a thread) for the parent's admin token; a file that
    does not load keeps the running token (the workers say why in their own lines)."""
    try:
        settings = await in_thread(functools.partial(load, config), READ_TIMEOUT)
    except (ConfigError, TimeoutError):
        event("parent_reload_refused", logging.ERROR, kept="running admin token")
        return
    new = settings.admin.token
    token.current = token.current.rotated(new, settings.inbound.key_overlap)


async def _start_admin(
    settings: Settings, sockets: list[str], token: AdminTokenRef | None = None
) -> web.AppRunner:
    admin = settings.admin
    app = create_parent_app(settings, sockets, token)
    try:
        runner = await start(app, admin.host, admin.port, GRACE)
    except StartupError as e:
        raise StartupError(f"admin listener: {e}") from None
    event("admin_started", listen=f"{admin.host}:{bound_port(runner)}", workers=len(sockets))
    warning = exposure_warning(admin)
    if warning is not None:
        event("admin_exposed", logging.WARNING, warning=warning)
    return runner


def _spawn(
    settings: Settings, config: Path | None, workers: int, admin_socket: str, index: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        WORKER_ENV: str(index),  # every log line of the worker says which it is
        "KOUNTA_PROXY_SERVER__REUSE_PORT": "true",
        # Each worker is a replica: while Redis is away each sends rate / (replicas * workers).
        "KOUNTA_PROXY_SHARED__REPLICAS": str(settings.shared.replicas * workers),
    }
    if admin_socket:
        env["KOUNTA_PROXY_ADMIN__SOCKET"] = admin_socket
    command = [sys.executable, "-m", "proxy", "serve"]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.Popen(command, env=env)  # noqa: S603 - our own command, fixed arguments


@dataclass
class Worker:
    """One worker's admin listener, reached over its Unix socket."""

    index: int
    session: aiohttp.ClientSession


@dataclass
class Answer:
    """What a worker answered: status, body and its Content-Type."""

    status: int
    body: bytes
    content_type: str


@dataclass
class Parent:
    """The parent's admin state: the workers' sessions and its own two metrics."""

    sockets: list[str]
    workers: list[Worker] = field(default_factory=list)
    metrics: WorkersMetrics = field(init=False)

    def __post_init__(self) -> None:
        # No _created series, as the workers' own registries (docs/operations.md).
        self.metrics = WorkersMetrics(Registry(), len(self.sockets))

    async def ask(
        self, worker: Worker, method: str, path: str, seconds: float, **kwargs: Any
    ) -> Answer | None:
        """One request to a worker; None when it does not answer in time."""
        try:
            async with worker.session.request(
                method,
                f"http://localhost{path}",
                timeout=aiohttp.ClientTimeout(total=seconds),
                **kwargs,
            ) as r:
                content_type = r.headers.get("Content-Type", "application/octet-stream")
                return Answer(r.status, await r.read(), content_type)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            event("worker_unreachable", logging.WARNING, worker=worker.index, path=path,
                  error=type(e).__name__)  # fmt: skip
            return None

    async def each(
        self, method: str, path: str, seconds: float, **kwargs: Any
    ) -> list[Answer | None]:
        """The same request to every worker at once."""
        return list(
            await asyncio.gather(
                *(self.ask(w, method, path, seconds, **kwargs) for w in self.workers)
            )
        )


PARENT: web.AppKey[Parent] = web.AppKey("workers_parent", Parent)


def create_parent_app(
    settings: Settings, sockets: list[str], token: AdminTokenRef | None = None
) -> web.Application:
    """The parent's admin application over the workers' admin sockets; ``token``: the live
    admin token (else the one ``settings`` has, for good)."""
    tokens = None if token is None else (lambda: token.current)
    app = web.Application(middlewares=middlewares(settings.admin, tokens))
    app[PARENT] = Parent(sockets)
    app.cleanup_ctx.append(_sessions)
    app.on_response_prepare.append(stamp_server)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_livez(app)  # the parent's own loop: workers answer their own /livez
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def _sessions(app: web.Application) -> AsyncIterator[None]:
    parent = app[PARENT]
    for k, path in enumerate(parent.sockets):
        connector = aiohttp.UnixConnector(path=path)
        parent.workers.append(Worker(k, aiohttp.ClientSession(connector=connector)))
    yield
    for worker in parent.workers:
        await worker.session.close()


async def metrics(request: web.Request) -> web.Response:
    """Every worker's metrics merged, and the parent's own two."""
    parent = request.app[PARENT]
    answers = await parent.each("GET", "/metrics", SCRAPE_TIMEOUT, headers={"Accept": "text/plain"})
    parsed = []
    for worker, answer in zip(parent.workers, answers, strict=True):
        families = _parsed(answer)
        if families is None:
            parent.metrics.scrape_errors.labels(str(worker.index)).inc()
        else:
            parsed.append(families)
    parent.metrics.up.set(len(parsed))
    body = merge_families(parsed) + generate_latest(parent.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _parsed(answer: Answer | None) -> list[Any] | None:
    if answer is None or answer.status != 200:
        return None
    try:
        return parse(answer.body.decode())
    except (ValueError, UnicodeDecodeError):
        return None


async def healthz(request: web.Request) -> web.Response:
    """Alive while the parent runs and at least one worker answers."""
    parent = request.app[PARENT]
    answers = await parent.each("GET", "/healthz", SCRAPE_TIMEOUT)
    alive = sum(1 for a in answers if a is not None and a.status == 200)
    body = {"status": "alive" if alive else "not_alive", "workers": len(answers), "alive": alive}
    return json_answer(200 if alive else 503, body)


async def readyz(request: web.Request) -> web.Response:
    """Ready only when every worker is; the body holds each worker's own answer."""
    parent = request.app[PARENT]
    answers = await parent.each("GET", "/readyz", SCRAPE_TIMEOUT)
    failing: list[str] = []
    workers: dict[str, Any] = {}
    for worker, answer in zip(parent.workers, answers, strict=True):
        body = _json_body(answer)
        workers[str(worker.index)] = body
        if answer is None or answer.status != 200:
            names = body.get("failing") or ["unreachable"]
            failing += [f"worker{worker.index}:{name}" for name in names]
    body = {"status": "not_ready" if failing else "ready", "failing": failing, "workers": workers}
    return json_answer(503 if failing else 200, body)


def _json_body(answer: Answer | None) -> dict[str, Any]:
    if answer is None:
        return {"status": "unreachable"}
    try:
        found = json.loads(answer.body)
    except ValueError:
        found = None
    return found if isinstance(found, dict) else {"status": f"answered {answer.status}"}


async def forward(request: web.Request) -> web.Response:
    """Any other admin route: reads to the first worker that answers, changes to every worker
    (each has its own memory tier); the answer is worker 0's, or the first failure."""
    parent = request.app[PARENT]
    kwargs: dict[str, Any] = {
        "headers": {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers},
        "data": await request.read(),
    }
    path = request.rel_url.path_qs
    answers: list[Answer | None]
    if request.method in SAFE_METHODS:
        answers = []
        for worker in parent.workers:
            answer = await parent.ask(worker, request.method, path, FORWARD_TIMEOUT, **kwargs)
            if answer is not None:
                answers = [answer]
                break
    else:
        answers = await parent.each(request.method, path, FORWARD_TIMEOUT, **kwargs)
    chosen = _choose(answers)
    if chosen is None:
        return json_answer(
            502,
            {"error": code_for(502), "error_description": "No worker answered the admin request"},
        )
    return web.Response(
        status=chosen.status,
        body=chosen.body,
        headers={"Content-Type": chosen.content_type, "Cache-Control": "no-store"},
    )


def _choose(answers: list[Answer | None]) -> Answer | None:
    """The first failure (no answer counts as one), else the first answer."""
    if not answers or any(a is None for a in answers):
        return None
    for answer in answers:
        if answer is not None and answer.status >= 400:
            return answer
    return answers[0]
