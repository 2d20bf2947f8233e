"""``kounta-proxy``: serve, sandbox, demo, check-config."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.logs import configure, event
from proxy.server import StartupError, bound_port, run_until_signal, start
from proxy.settings import (
    AccountSettings,
    ConfigError,
    Secret,
    ServerSettings,
    Settings,
    UpstreamSettings,
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
    return p


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
            return serve(load(args.config))
        if args.command == "sandbox":
            return sandbox(args.host, args.port, args.seed, tuple(args.token or ("sandbox-token",)))
        if args.command == "demo":
            return demo(args.port, args.sandbox_port, args.state_dir)
    except ConfigError as e:
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return 1  # pragma: no cover - argparse rejects unknown commands


def check_config(path: Path | None, *, as_json: bool) -> int:
    settings = load(path)
    data = masked(settings)
    print(json.dumps(data, indent=2) if as_json else to_toml(data), end="" if not as_json else "\n")
    return 0


def serve(settings: Settings) -> int:
    if not settings.accounts:
        raise ConfigError("accounts", "no account configured: add an [accounts.NAME] table")
    configure(settings.log.level, settings.log.format)
    asyncio.run(_serve(settings))
    return 0


async def _serve(settings: Settings) -> None:
    from proxy.app import create_app

    app = create_app(settings)
    runner = await start(
        app, settings.server.host, settings.server.port, settings.server.shutdown_grace
    )
    event(
        "started",
        listen=f"{settings.server.host}:{bound_port(runner)}",
        upstream=settings.upstream.base_url,
        settings=masked(settings),
    )
    await run_until_signal([runner])


def sandbox(host: str, port: int, seed: int, tokens: tuple[str, ...]) -> int:
    configure("info", "json")
    asyncio.run(_sandbox(host, port, seed, tokens))
    return 0


async def _sandbox(host: str, port: int, seed: int, tokens: tuple[str, ...]) -> None:
    from proxy.sandbox import SandboxConfig, create_sandbox_app

    app = create_sandbox_app(SandboxConfig(seed=seed, bearer_tokens=tokens))
    runner = await start(app, host, port, 5.0)
    event("sandbox_started", listen=f"{host}:{bound_port(runner)}", seed=seed)
    print(f"sandbox listening on http://{host}:{bound_port(runner)}", flush=True)
    await run_until_signal([runner])


DEMO_TOKEN = "sandbox-token"  # noqa: S105 - the sandbox's public demo token, not a secret


def demo(port: int, sandbox_port: int, state_dir: str) -> int:
    configure("info", "json")
    asyncio.run(_demo(port, sandbox_port, state_dir))
    return 0


async def _demo(port: int, sandbox_port: int, state_dir: str) -> None:
    from proxy.app import create_app
    from proxy.sandbox import SandboxConfig, create_sandbox_app

    sandbox_runner = await start(
        create_sandbox_app(SandboxConfig(bearer_tokens=(DEMO_TOKEN,))),
        "127.0.0.1",
        sandbox_port,
        5.0,
    )
    upstream_port = bound_port(sandbox_runner)
    settings = Settings(
        state_dir=state_dir,
        server=ServerSettings(host="127.0.0.1", port=port),
        upstream=UpstreamSettings(base_url=f"http://127.0.0.1:{upstream_port}"),
        accounts={"demo": AccountSettings(mode="static", token=Secret(DEMO_TOKEN))},
    )
    try:
        proxy_runner = await start(create_app(settings), "127.0.0.1", port, 5.0)
    except StartupError:
        await sandbox_runner.cleanup()
        raise
    proxy_port = bound_port(proxy_runner)
    event("demo_started", proxy=f"127.0.0.1:{proxy_port}", sandbox=f"127.0.0.1:{upstream_port}")
    print(
        f"kounta-proxy demo: proxy on http://127.0.0.1:{proxy_port}, "
        f"sandbox on http://127.0.0.1:{upstream_port}\n"
        f"try:  curl -i http://127.0.0.1:{proxy_port}/v1/companies/me.json\n"
        f"      curl -i http://127.0.0.1:{proxy_port}/v1/companies/5001/products.json\n"
        "stop with Ctrl-C",
        flush=True,
    )
    await run_until_signal([proxy_runner, sandbox_runner])
