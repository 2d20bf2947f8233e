"""Run the sandbox: python -m proxy.sandbox --port 8089"""

from __future__ import annotations

import argparse

from aiohttp import web

from .app import create_sandbox_app
from .config import SandboxConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--origin", default=None, help="absolute origin for X-Next-Page/Location")
    parser.add_argument("--token", action="append", default=None, help="accepted bearer token")
    parser.add_argument("--rate-bearer", type=int, default=180)
    parser.add_argument("--rate-basic", type=int, default=60)
    parser.add_argument("--page-size", type=int, default=25)
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="access-token lifetime")
    parser.add_argument("--rotate-refresh", action="store_true", help="refresh tokens rotate")
    parser.add_argument("--refresh-token", action="append", default=None, help="seeded")
    args = parser.parse_args(argv)
    if not args.token_ttl > 0:
        parser.error("--token-ttl must be a positive number of seconds")
    config = SandboxConfig(
        seed=args.seed,
        origin=args.origin,
        bearer_tokens=tuple(args.token) if args.token else SandboxConfig.bearer_tokens,
        rate_per_minute_bearer=args.rate_bearer,
        rate_per_minute_basic=args.rate_basic,
        page_size=args.page_size,
        access_token_lifetime=args.token_ttl,
        rotate_refresh_tokens=args.rotate_refresh,
        refresh_tokens=tuple(args.refresh_token or ()),
    )
    web.run_app(create_sandbox_app(config), host=args.host, port=args.port, print=print)


if __name__ == "__main__":
    main()
