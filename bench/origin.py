"""The upstream of the comparison and size benchmarks (python -m bench.origin --port N).

A minimal Kounta stand-in, the same for the proxy and for nginx: any
``/v1/companies/{company}/{kind}/{id}.json`` is a JSON record with a strong ETag, 8 KB, or
500 KB when ``kind`` is ``big``; a matching ``If-None-Match`` gets a 304 with no body. No
Cache-Control: freshness comes from the proxy's rules and nginx's ``proxy_cache_valid``.
``GET /_stats`` says how many requests it answered (that one excluded), so the bench can
print upstream requests per caller request.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

SMALL, LARGE = 8 * 1024, 500 * 1024
JSON_TYPE = "application/json; charset=utf-8"


def record(kind: str, ident: str) -> bytes:
    """The record's bytes: the same for the same path, exactly SMALL or LARGE long."""
    size = LARGE if kind == "big" else SMALL
    head = json.dumps({"id": ident, "kind": kind, "description": ""})[:-2]
    return (head + "x" * (size - len(head) - 2) + '"}').encode()


def create_app() -> web.Application:
    served = 0
    bodies: dict[tuple[str, str], tuple[bytes, str]] = {}

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"served": served})

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal served
        served += 1
        kind, ident = request.match_info["kind"], request.match_info["id"]
        found = bodies.get((kind, ident))
        if found is None:
            body = record(kind, ident)
            found = bodies[(kind, ident)] = (body, f'"{kind}-{ident}-{len(body)}"')
            if len(bodies) > 1000:  # the size series asks for 100k ids: keep a few
                bodies.pop(next(iter(bodies)))
        body, etag = found
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, headers={"ETag": etag, "Content-Type": JSON_TYPE})

    app = web.Application()
    app.router.add_get("/_stats", stats)
    app.router.add_get("/v1/companies/{company}/{kind}/{id}.json", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
