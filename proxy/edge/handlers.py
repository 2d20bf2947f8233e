"""The proxy's one route handler: an inbound request through the pipeline and back."""

from __future__ import annotations

import asyncio

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.cache.keys import SELECTING
from proxy.edge import paging
from proxy.edge.answer import answer
from proxy.edge.callers import Caller
from proxy.edge.inbound import (
    BodyDeadline,
    CappedStream,
    Incoming,
    exchange_of,
    guard,
    read_body,
    too_large,
)
from proxy.edge.services import SERVICES, Services
from proxy.errors import BodyTimeout, InvalidRequest, ProxyError, RequestTooLarge
from proxy.headers import has_bad_value, not_utf8, proxied, repeated
from proxy.logs import event
from proxy.messages import Body, ProxyRequest
from proxy.settings import Settings
from proxy.target import Target

BODY_TIMEOUT = "body_timeout"


async def handle(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    info = exchange_of(request)
    target = info.target or guard(request)
    check_headers(request)
    caller = services.callers.identify(request.headers)
    info.caller, info.account = caller.name, caller.account
    priority = caller.priority_of(request.headers)
    settings = services.settings
    server = settings.server
    deadline = BodyDeadline(server.body_timeout, server.body_min_rate)
    try:
        body = await read_body(request, server.max_body_size, server.replay_body_size, deadline)
    except BodyTimeout:
        dropped(services)
        raise
    proxy_request = pipeline_request(
        request, settings, target, body, caller, priority, info.request_id
    )
    if paging.wanted(request):
        return await paging.all_pages(request, proxy_request, services)
    try:
        response = await services.pipeline.send(proxy_request)
    except ProxyError:
        if isinstance(body, CappedStream) and body.exceeded:
            raise RequestTooLarge(too_large(server.max_body_size)) from None
        if deadline.timed_out:  # while streaming to Kounta: the exchange was abandoned
            dropped(services)
            raise BodyTimeout(deadline.description()) from None
        raise
    info.took(response)
    return await answer(request, response, settings.upstream.url, server.public_url)


def pipeline_request(
    request: Incoming,
    settings: Settings,
    target: Target,
    body: Body,
    caller: Caller,
    priority: str,
    rid: str,
) -> ProxyRequest:
    """What the pipeline is asked for an inbound request (also the fast path's, for a
    revalidation it starts): the headers Kounta may see, the caller's account and class,
    and the deadline of ``upstream.total_timeout`` from now."""
    headers = proxied(request.headers.items(), settings.upstream.forwarded, rid)
    return ProxyRequest(
        method=request.method,
        path=target.path,
        query=target.query,
        headers=CIMultiDictProxy(headers),
        body=body,
        account=caller.account,
        caller=caller.name,
        priority=priority,
        request_id=rid,
        deadline=asyncio.get_running_loop().time() + settings.upstream.total_timeout,
    )


def dropped(services: Services) -> None:
    """A request body too slow or too late: its connection is closed (408), and counted
    with the listener's own drops."""
    event("connection_dropped", reason=BODY_TIMEOUT)
    services.metric_groups.edge.connections_dropped.labels(BODY_TIMEOUT).inc()


def check_headers(request: web.Request) -> None:
    """Refuse header values the proxy cannot pass on faithfully, before anything reads them."""
    items = request.headers.items()
    bad = has_bad_value(items)
    if bad is not None:
        raise InvalidRequest(f"Header {bad} contains CR, LF or NUL")
    bad = not_utf8(items)
    if bad is not None:
        raise InvalidRequest(f"Header {bad} is not valid UTF-8", code="invalid_header_value")
    bad = repeated(request.headers, SELECTING)
    if bad is not None:
        raise InvalidRequest(
            f"Header {bad} is sent more than once; it selects the answer, so send it once",
            code="repeated_header",
        )
