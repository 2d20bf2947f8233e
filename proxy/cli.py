"""``kounta-proxy``: serve, check-config, sandbox, demo, authorize, cache, webhooks."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from proxy import __version__, eventloop
from proxy.auth import authorize as flow
from proxy.auth.providers import token_path
from proxy.cache.admin import run_cli
from proxy.cache.webhooks import registration
from proxy.edge.services import build, close
from proxy.errors import ProxyError
from proxy.listener import StartupError, bound_port, run_until_signal, start
from proxy.logs import configure, event, set_worker, worker_from_env
from proxy.metrics import Metrics, Registry
from proxy.ops import lifecycle, workers
from proxy.ops.admin import exposure_warning
from proxy.sandbox import SandboxConfig, create_sandbox_app
from proxy.settings import (
    DEFAULT_CONFIG_PATH,
    AccountSettings,
    AdminSettings,
    CacheRule,
    CacheSettings,
    ConfigError,
    ConfigErrors,
    Secret,
    ServerSettings,
    Settings,
    UpstreamSettings,
    WebhookSettings,
    load,
    masked,
    to_toml,
)

PROG = "kounta-proxy"
EXIT_CONFIG = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="A local caching reverse proxy for the Kounta (Lightspeed) REST API.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy with the settings from --config (default ./kounta-proxy.toml "
        "if present) and KOUNTA_PROXY_* environment variables.",
    )
    _config_arg(serve)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes serving one port (N > 1 needs [shared] backend = 'redis'); the parent "
        "serves the one admin listener on admin.port and merges the workers' metrics (each "
        "worker's own admin listener is a private Unix socket)",
    )

    check = sub.add_parser(
        "check-config",
        help="validate the settings and print them with secrets masked",
        description="Load and validate the settings exactly as 'serve' would, then print the "
        "effective settings as TOML (or JSON) with every secret masked. Exit 2 if invalid.",
    )
    _config_arg(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")

    sandbox = sub.add_parser(
        "sandbox",
        help="run the offline Kounta look-alike",
        description="Run the sandbox: an offline imitation of the Kounta API (seeded data, "
        "paging, ETags, rate limits, Kounta's error shapes) for development and tests.",
    )
    sandbox.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    sandbox.add_argument("--port", type=int, default=8081, help="port (default %(default)s)")
    sandbox.add_argument("--seed", type=int, default=42, help="data seed (default %(default)s)")
    sandbox.add_argument(
        "--token",
        action="append",
        default=None,
        help="bearer token to accept (repeatable; default 'sandbox-token')",
    )
    sandbox.add_argument(
        "--token-ttl",
        type=_seconds,
        default=SandboxConfig.access_token_lifetime,
        metavar="SECONDS",
        help="lifetime of the access tokens its OAuth server issues (default %(default)g)",
    )
    sandbox.add_argument(
        "--rotate-refresh",
        action="store_true",
        help="refresh answers carry a new refresh token and the old one dies",
    )
    sandbox.add_argument(
        "--refresh-token",
        action="append",
        default=None,
        help="refresh token accepted as if issued earlier (repeatable)",
    )

    demo = sub.add_parser(
        "demo",
        help="run the sandbox and the proxy in front of it",
        description="Run the sandbox on one loopback port and the proxy in front of it on "
        "another, with credentials the sandbox accepts; print a curl line that works. "
        "No Kounta account is needed.",
    )
    demo.add_argument("--port", type=int, default=8080, help="proxy port (default %(default)s)")
    demo.add_argument(
        "--sandbox-port", type=int, default=8081, help="sandbox port (default %(default)s)"
    )
    demo.add_argument(
        "--state-dir", default="state/demo", help="cache and token directory (default %(default)s)"
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        default=9464,
        help="admin port for /metrics, /healthz, /readyz (default %(default)s; "
        "a free one is chosen if it is taken)",
    )
    demo.add_argument(
        "--webhook-port",
        type=int,
        default=9466,
        help="port the sandbox delivers its webhooks to (default %(default)s; "
        "a free one is chosen if it is taken)",
    )
    _authorize_parser(sub)
    _cache_parser(sub)
    _webhooks_parser(sub)
    return p


def _cache_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = sub.add_parser(
        "cache",
        help="show cache statistics or purge stored responses",
        description="Work on the cache directory of the settings (cache.dir, default "
        "<state_dir>/cache). A running proxy drops its in-memory copies within 2 seconds of a "
        "purge; the admin endpoint POST /cache/purge takes effect at once.",
    )
    cache.add_argument("action", choices=("stats", "purge"), help="what to do")
    _config_arg(cache)
    cache.add_argument("--prefix", default="", help="purge only paths starting with this")
    cache.add_argument("--account", default=None, help="purge only this account's entries")


def _webhooks_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hooks = sub.add_parser(
        "webhooks",
        help="register, list or remove the account's Kounta webhooks",
        description="sync: register the webhooks.subscribe topics at the address (a second "
        "run changes nothing; a topic Kounta refuses is reported and skipped); list: the "
        "company's webhooks; remove: delete those at the address. Through the account's "
        "credentials and rate budget (docs/webhooks.md).",
    )
    hooks.add_argument("action", choices=("sync", "list", "remove"), help="what to do")
    _config_arg(hooks)
    hooks.add_argument("--account", default=None, help="account name (default: the default)")
    hooks.add_argument(
        "--address", default=None, help="https URL of the webhook listener (webhooks.address)"
    )
    hooks.add_argument(
        "--dry-run", action="store_true", help="say what would change, change nothing"
    )


def _authorize_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    authorize = sub.add_parser(
        "authorize",
        help="authorize an oauth account once (authorization-code flow)",
        description="Print the Kounta authorize URL, receive the redirect on the loopback "
        "redirect_uri (or a pasted redirect URL or code), exchange the code and write the "
        "account's token file. The running proxy picks the new token up by itself.",
    )
    _config_arg(authorize)
    authorize.add_argument("--account", default=None, help="account name (default: the default)")
    authorize.add_argument("--open", action="store_true", help="open the URL in a browser")
    authorize.add_argument(
        "--paste", action="store_true", help="read the redirect URL from stdin, do not listen"
    )
    authorize.add_argument(
        "--code", default=None, help="a code (or redirect URL) from an earlier run; no state check"
    )
    authorize.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the redirect (default %(default)s)",
    )


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help="TOML settings file (default: ./kounta-proxy.toml if it exists)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return check_config(args.config, as_json=args.json)
        if args.command == "serve":
            if args.workers != 1:
                return workers.run(require_accounts(load(args.config)), args.config, args.workers)
            return serve(load(args.config), args.config)
        if args.command == "sandbox":
            return sandbox(args.host, args.port, sandbox_config(args))
        if args.command == "authorize":
            return authorize(args)
        if args.command == "cache":
            return run_cli(load(args.config), args.action, args.prefix, args.account)
        if args.command == "webhooks":
            return webhooks_command(args)
        if args.command == "demo":
            return demo(
                args.port, args.sandbox_port, args.state_dir, args.admin_port, args.webhook_port
            )
    except ConfigError as e:
        for line in e.lines() if isinstance(e, ConfigErrors) else [str(e)]:
            print(f"{PROG}: config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return 1  # pragma: no cover - argparse rejects unknown commands


def authorize(args: argparse.Namespace) -> int:
    settings = load(args.config)
    name = flow.pick_account(settings, args.account)
    configure(settings.log.level, settings.log.format)
    try:
        token = asyncio.run(
            flow.run(
                settings,
                name,
                code=args.code,
                paste=args.paste,
                open_browser=args.open,
                wait=args.timeout,
            )
        )
    except flow.AuthorizeError as e:
        print(f"{PROG}: authorize failed: {e}", file=sys.stderr)
        return 1
    where = flow.saved_where(settings, name)
    lifetime = ""
    if token.expires_at is not None:
        lifetime = f", access token valid for {token.expires_at - token.obtained_at:.0f}s"
    print(f"Authorized account {name!r}: token saved to {where}{lifetime}", flush=True)
    event("authorized", account=name, saved_to=where)
    return 0


def webhooks_command(args: argparse.Namespace) -> int:
    settings = require_accounts(load(args.config))
    name = args.account or settings.account_name
    if name not in settings.accounts:
        raise ConfigError("--account", f"names no account: {name!r}")
    configure(settings.log.level, settings.log.format)
    try:
        address = None
        if args.action != "list" or args.address or settings.webhooks.address:
            address = registration.address_for(settings, name, args.address)
        return asyncio.run(_webhooks(settings, name, args.action, address, args.dry_run))
    except (registration.RegistrationError, ProxyError) as e:
        print(f"{PROG}: webhooks {args.action}: {e}", file=sys.stderr)
        return 1


async def _webhooks(
    settings: Settings, name: str, action: str, address: str | None, dry_run: bool
) -> int:
    """Through the proxy's own pipeline below the cache: retry, credentials, budget."""
    tool = dataclasses.replace(
        settings,
        cache=dataclasses.replace(settings.cache, enabled=False),
        webhooks=dataclasses.replace(settings.webhooks, enabled=False),
    )
    services = await build(tool, Metrics(Registry()), time.time)
    try:
        kounta = registration.Kounta(services.pipeline, name)
        if action == "list":
            return await registration.show(kounta, address)
        assert address is not None
        if action == "remove":
            return await registration.remove(kounta, address, dry_run=dry_run)
        return await registration.sync(kounta, settings, address, dry_run=dry_run)
    finally:
        await close(services)


def require_accounts(settings: Settings) -> Settings:
    """What serve needs beyond valid keys: someone to call Kounta as."""
    if not settings.accounts:
        raise ConfigError("accounts", "no account configured: add an [accounts.NAME] table")
    return settings


def check_config(path: Path | None, *, as_json: bool) -> int:
    """Validate as serve would (directories included, nothing created), print the effective
    settings masked, and warn about what serve would start without (oauth tokens)."""
    if path is None and not DEFAULT_CONFIG_PATH.is_file():
        print(
            f"{PROG}: no config file ({DEFAULT_CONFIG_PATH} not found here, no --config): "
            "defaults and KOUNTA_PROXY_* variables only",
            file=sys.stderr,
        )
    settings = require_accounts(load(path))
    eventloop.resolve(settings.server.event_loop)  # "uvloop" without uvloop: one line
    problems = [ConfigError(key, p) for key, p in lifecycle.directory_problems(settings)]
    if problems:
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    warning = exposure_warning(settings.admin)
    if warning is not None:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if as_json:
        print(json.dumps(masked(settings), indent=2))
    else:
        print(to_toml(masked(settings, files=True)), end="")
    for line in token_warnings(settings, path):
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    return 0


def token_warnings(settings: Settings, path: Path | None) -> list[str]:
    """Oauth accounts that would start without a token, and the command that gives one."""
    config = (
        path if path is not None else DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None
    )
    where = f" --config {shlex.quote(str(config))}" if config is not None else ""
    needing = [
        name
        for name, account in sorted(settings.accounts.items())
        if account.mode == "oauth"
        and account.grant == "refresh_token"
        and not account.refresh_token
    ]
    if settings.shared.backend == "redis":
        return _shared_token_warnings(settings, needing, where)
    lines = []
    for name in needing:
        file = token_path(name, settings.accounts[name], settings.state_dir)
        if not file.is_file():
            lines.append(
                f"account {name!r} has no token yet ({file} does not exist); run: "
                f"{PROG} authorize --account {shlex.quote(name)}{where}"
            )
    return lines


# How long check-config waits for Redis to say whether the tokens are there.
SHARED_CHECK_WAIT = 3.0


def _shared_token_warnings(settings: Settings, names: list[str], where: str) -> list[str]:
    """With ``[shared] backend = "redis"`` the tokens are in Redis: ask it (within
    SHARED_CHECK_WAIT), or say that it cannot be told."""
    if not names:
        return []
    store = flow.shared_store_name(settings)
    configure("error", "json")  # the backend's own state lines are not check-config's output
    found = asyncio.run(flow.shared_tokens_present(settings, names, SHARED_CHECK_WAIT))
    if found is None:
        listed = ", ".join(repr(n) for n in names)
        return [
            f"cannot tell whether account(s) {listed} have a token: the shared store "
            f"({store}) did not answer within {SHARED_CHECK_WAIT:g}s"
        ]
    return [
        f"account {name!r} has no token yet in the shared store ({store}); run: "
        f"{PROG} authorize --account {shlex.quote(name)}{where}"
        for name in names
        if not found[name]
    ]


def serve(settings: Settings, config: Path | None = None) -> int:
    require_accounts(settings)
    configure(settings.log.level, settings.log.format)
    set_worker(worker_from_env())  # a `serve --workers N` worker: its lines say which
    eventloop.run(_serve(settings, config), settings.server.event_loop)
    return 0


async def _serve(settings: Settings, config: Path | None) -> None:
    # SIGHUP reads the same file (and the environment, and secret files) again.
    await lifecycle.serve(settings, load=lambda: require_accounts(load(config)))


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse prints the error on one line)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def sandbox_config(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(
        seed=args.seed,
        bearer_tokens=tuple(args.token or ("sandbox-token",)),
        access_token_lifetime=args.token_ttl,
        rotate_refresh_tokens=args.rotate_refresh,
        refresh_tokens=tuple(args.refresh_token or ()),
    )


def sandbox(host: str, port: int, config: SandboxConfig) -> int:
    configure("info", "json")
    asyncio.run(_sandbox(host, port, config))
    return 0


async def _sandbox(host: str, port: int, config: SandboxConfig) -> None:
    app = create_sandbox_app(config)
    runner = await start(app, host, port, 5.0)
    event(
        "sandbox_started",
        listen=f"{host}:{bound_port(runner)}",
        seed=config.seed,
        token_ttl=config.access_token_lifetime,
        rotate_refresh=config.rotate_refresh_tokens,
    )
    print(f"sandbox listening on http://{host}:{bound_port(runner)}", flush=True)
    await run_until_signal([runner])


DEMO_TOKEN = "sandbox-token"  # noqa: S105 - the sandbox's public demo token, not a secret
# The demo account runs in oauth mode against the sandbox's OAuth server, bootstrapped with
# this refresh token (the sandbox accepts it as if issued earlier; it does not rotate).
DEMO_REFRESH_TOKEN = "sandbox-demo-refresh"  # noqa: S105 - public demo value, not a secret


# The demo's webhook: the sandbox sends it back with each delivery (a public demo value).
DEMO_WEBHOOK_SECRET = "sandbox-demo-webhook-secret"  # noqa: S105 - public demo value
# Products stay fresh for an hour while the webhook feed is healthy: a change at a till
# (POST /_sandbox/touch) is delivered, dropped and refetched in the background.
DEMO_RULE = CacheRule(path="/v1/companies/*/products*", fresh_for=3600, webhooks=True)
DEMO_PRODUCT = 100001
DEMO_COMPANY = 5001


def demo(
    port: int, sandbox_port: int, state_dir: str, admin_port: int = 9464, hook_port: int = 9466
) -> int:
    configure("info", "json")
    asyncio.run(_demo(port, sandbox_port, state_dir, admin_port, hook_port))
    return 0


async def _demo(
    port: int, sandbox_port: int, state_dir: str, admin_port: int, hook_port: int
) -> None:
    sandbox_runner = await start(
        create_sandbox_app(
            SandboxConfig(bearer_tokens=(DEMO_TOKEN,), refresh_tokens=(DEMO_REFRESH_TOKEN,))
        ),
        "127.0.0.1",
        sandbox_port,
        5.0,
    )
    upstream_port = bound_port(sandbox_runner)
    hook_port = _free_port(hook_port)
    settings = Settings(
        state_dir=state_dir,
        server=ServerSettings(host="127.0.0.1", port=port, shutdown_grace=5.0),
        upstream=UpstreamSettings(base_url=f"http://127.0.0.1:{upstream_port}"),
        admin=AdminSettings(host="127.0.0.1", port=_free_or_any(admin_port)),
        accounts={"demo": _demo_account(f"http://127.0.0.1:{upstream_port}")},
        cache=CacheSettings(rules=(DEMO_RULE,)),
        webhooks=WebhookSettings(
            enabled=True, port=hook_port, secret=Secret(DEMO_WEBHOOK_SECRET), refetch=True
        ),
    )
    try:
        # The demo registers its own webhook, as `kounta-proxy webhooks sync` would at Kounta.
        await _register_demo_webhook(f"http://127.0.0.1:{upstream_port}", hook_port)
    except (aiohttp.ClientError, StartupError) as e:
        await sandbox_runner.cleanup()
        raise StartupError(f"registering the demo's webhook: {e}") from None

    def announce(proxy_port: int, admin: int | None) -> None:
        product = f"http://127.0.0.1:{proxy_port}/v1/companies/{DEMO_COMPANY}/products/{DEMO_PRODUCT}.json"
        event("demo_started", proxy=f"127.0.0.1:{proxy_port}", sandbox=f"127.0.0.1:{upstream_port}")
        print(
            f"kounta-proxy demo: proxy on http://127.0.0.1:{proxy_port}, "
            f"sandbox on http://127.0.0.1:{upstream_port}, "
            f"admin on http://127.0.0.1:{admin}\n"
            f"try:  curl -i http://127.0.0.1:{proxy_port}/v1/companies/me.json\n"
            f"      curl -i http://127.0.0.1:{proxy_port}/v1/companies/5001/products.json\n"
            f"      curl -s http://127.0.0.1:{admin}/metrics\n"
            f"webhooks on http://127.0.0.1:{hook_port}: a change made elsewhere (at a till) "
            "reaches the proxy in under a second:\n"
            f"      curl -i {product}\n"
            f"      curl -X POST http://127.0.0.1:{upstream_port}/_sandbox/touch "
            f'-d \'{{"kind": "products", "id": {DEMO_PRODUCT}}}\'\n'
            f"      curl -i {product}\n"
            "stop with Ctrl-C",
            flush=True,
        )

    try:
        await lifecycle.serve(settings, extra=[sandbox_runner], announce=announce)
    except StartupError:
        await sandbox_runner.cleanup()
        raise


def _demo_account(sandbox_url: str) -> AccountSettings:
    return AccountSettings(
        mode="oauth",
        client_id=SandboxConfig.client_id,
        client_secret=Secret(SandboxConfig.client_secret),
        token_url=f"{sandbox_url}/v1/token",
        authorize_url=f"{sandbox_url}/authorize",
        refresh_token=Secret(DEMO_REFRESH_TOKEN),
    )


async def _register_demo_webhook(sandbox_url: str, hook_port: int) -> None:
    """``products/updated`` deliveries to the demo's webhook listener, with its secret."""
    address = f"http://127.0.0.1:{hook_port}/webhooks/kounta/demo"
    body = {
        "topic": "products/updated",
        "address": address,
        "format": "json",
        "headers": {"Authorization": f"Bearer {DEMO_WEBHOOK_SECRET}"},
    }
    url = f"{sandbox_url}/v1/companies/{DEMO_COMPANY}/webhooks"
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        if r.status != 201:
            raise StartupError(f"the sandbox refused the demo's webhook: {r.status}")
    event("demo_webhook_registered", address=address, topic="products/updated")


def _free_port(port: int) -> int:
    """``port`` if it can be bound on loopback now, else one the system picks: a number
    known before the listener starts (the demo's webhook is registered at it first)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_or_any(port: int) -> int:
    """``port`` if it can be bound on loopback now, else 0 (any): the demo must start."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port
