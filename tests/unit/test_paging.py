"""The pure parts of the X-Proxy-All-Pages helper."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.edge.paging import HEADER, next_request, records_of, without_header
from proxy.errors import InvalidRequest, ProxyError, UpstreamError
from proxy.messages import ProxyRequest

FIRST = ProxyRequest(
    method="GET",
    path="/v1/companies/5001/products.json",
    query="",
    headers=CIMultiDictProxy(CIMultiDict({HEADER: "1", "Accept": "application/json"})),
    caller="c",
)


@pytest.mark.parametrize(
    ("base", "url", "path", "query"),
    [
        (
            "https://api.kounta.com",
            "https://api.kounta.com/v1/x/p.json?cursor=a%2Fb",
            "/v1/x/p.json",
            "cursor=a%2Fb",
        ),
        ("https://API.kounta.com", "https://api.kounta.com:443/v1/p?c=1#frag", "/v1/p", "c=1"),
        ("http://127.0.0.1:81/base", "http://127.0.0.1:81/base/v1/p?c=2", "/v1/p", "c=2"),
        # A path is on the upstream's origin (the cursor format is not guaranteed).
        ("https://api.kounta.com", "/v1/p?c=%2B3", "/v1/p", "c=%2B3"),
    ],
)
def test_next_page_on_the_upstream_becomes_a_request(
    base: str, url: str, path: str, query: str
) -> None:
    request = next_request(FIRST, url, URL(base), deadline=5.0)
    assert (request.path, request.query, request.deadline) == (path, query, 5.0)
    assert request.caller == "c"


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/v1/p?c=1",
        "https://api.kounta.com.evil.example/v1/p",
        "//evil.example/v1/p?c=1",  # scheme-relative: another host
        "https://api.kounta.com/v1/../admin",
        "https://api.kounta.com/other",
        "not a url\r\n",
    ],
)
def test_next_page_elsewhere_is_refused(url: str) -> None:
    with pytest.raises(ProxyError):
        next_request(FIRST, url, URL("https://api.kounta.com"), deadline=5.0)


def test_records_are_spliced_from_the_array() -> None:
    assert records_of(b' [ {"id": 1}, {"id": 2} ]\n') == b'{"id": 1}, {"id": 2}'
    assert records_of(b"[]") == b""
    with pytest.raises(InvalidRequest):
        records_of(b'{"id": 1}')
    with pytest.raises(UpstreamError):
        records_of(b"[{")


def test_the_header_is_not_sent_upstream() -> None:
    assert HEADER not in without_header(FIRST).headers
    assert without_header(FIRST).headers["Accept"] == "application/json"
