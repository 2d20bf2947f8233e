"""The baseline: a minimal aiohttp handler serving fixed bytes (python -m bench.minimal)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from aiohttp import web


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--file", type=Path, required=True)
    args = p.parse_args()
    body = args.file.read_bytes()
    etag = '"' + hashlib.sha1(body).hexdigest() + '"'

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body, headers={"ETag": etag, "Content-Type": "application/json; charset=utf-8"}
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
