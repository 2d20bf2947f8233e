import re
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from proxy.errors import NotFound
from proxy.target import (
    InvalidTarget,
    Target,
    normal_escapes,
    parse_target,
    upstream_url,
    valid_host,
)

BASE = URL("https://api.kounta.com")


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/v1/companies/me.json", "/v1/companies/me.json", ""),
        (
            "/v1/companies/5/products?cursor=abc%2Fdef==",
            "/v1/companies/5/products",
            "cursor=abc%2Fdef==",
        ),
        (
            "/v1/orders/complete?created_gte=2024-01-01&value_gt=5",
            "/v1/orders/complete",
            "created_gte=2024-01-01&value_gt=5",
        ),
        ("/v1/companies/5/customers/9?", "/v1/companies/5/customers/9", ""),
        ("/v1/a%20b", "/v1/a%20b", ""),
    ],
)
def test_accepts_origin_form_under_v1(raw: str, path: str, query: str) -> None:
    assert parse_target(raw) == Target(path, query)


@pytest.mark.parametrize(
    "raw",
    [
        "http://evil.example/v1/companies/me",
        "evil.example:443",
        "//evil.example/v1/x",
        "/v1//evil.example",
        "/v1/\\evil",
        "/v1/../admin",
        "/v1/./x",
        "/v1/%2e%2e/x",
        "/v1/a%2Fb",
        "/v1/a%5cb",
        "/v1/a%00b",
        "/v1/a%0d%0aX: y",
        "/v1/a%zz",
        "/v1/a b",
        "/v1/x?a=%00",
        "/v1/x?a=b\r\nX-Evil: 1",
        "*",
    ],
)
def test_rejects_targets_that_could_steer_or_smuggle(raw: str) -> None:
    with pytest.raises(InvalidTarget) as info:
        parse_target(raw)
    assert info.value.status == 400
    assert info.value.code == "invalid_request_target"


@pytest.mark.parametrize("raw", ["/", "/v2/x", "/admin", "/v1", "/metrics"])
def test_outside_v1_is_not_found(raw: str) -> None:
    with pytest.raises(NotFound):
        parse_target(raw)


def test_upstream_url_keeps_path_and_query_byte_for_byte() -> None:
    target = parse_target("/v1/companies/5/products?cursor=a%2Bb%3D&x=%7E")
    url = upstream_url(URL("https://api.kounta.com"), target)
    assert str(url) == "https://api.kounta.com/v1/companies/5/products?cursor=a%2Bb%3D&x=%7E"


def test_upstream_url_with_base_path() -> None:
    url = upstream_url(URL("http://127.0.0.1:9000/kounta/"), Target("/v1/x", "a=1"))
    assert str(url) == "http://127.0.0.1:9000/kounta/v1/x?a=1"


@given(st.text(max_size=80))
def test_any_accepted_target_reaches_only_the_configured_origin(suffix: str) -> None:
    for raw in (suffix, "/v1/" + suffix, "/" + suffix):
        try:
            target = parse_target(raw)
        except (InvalidTarget, NotFound):
            continue
        for base in (BASE, URL("http://127.0.0.1:8081")):
            url = upstream_url(base, target)
            assert (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
            assert url.raw_path.startswith("/v1/")


@given(st.binary(max_size=60))
def test_arbitrary_bytes_never_escape_the_origin(data: bytes) -> None:
    raw = "/v1/" + data.decode("latin-1")
    try:
        target = parse_target(raw)
    except (InvalidTarget, NotFound):
        return
    url = upstream_url(BASE, target)
    assert url.host == "api.kounta.com"
    assert url.scheme == "https"
    assert url.port == 443


@pytest.mark.parametrize(
    ("host", "valid"),
    [
        ("api.example.com", True),
        ("localhost:8080", True),
        ("127.0.0.1:9", True),
        ("[::1]:8080", True),
        ("", True),  # RFC 9112 3.2: empty is allowed
        ("a.example:", True),  # an empty port is allowed by RFC 3986
        ("a b", False),
        ("a/b", False),
        ("a\\b", False),
        ("a@b", False),
        ("[::1", False),
        ("a:80:80", False),
        ("a:http", False),
    ],
)
def test_host_values(host: str, valid: bool) -> None:
    assert valid_host(host) is valid


# What a server that decodes once more, or reads overlong UTF-8, takes for '.', '/' or '\'.
TRICKS = {".": ["2e", "c0%ae", "e0%80%ae", "f0%80%80%ae"], "/": ["2f", "c0%af", "e0%80%af"]}
TRICKS["\\"] = ["5c", "c1%9c", "e0%81%9c"]


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/%252e%252e/admin",
        "/v1/a%252Fb",
        "/v1/a%255C",
        "/v1/a%25252e",
        "/v1/a%252500",
        "/v1/%c0%ae%c0%ae/x",
        "/v1/a%C0%AFb",
        "/v1/%e0%80%ae",
        "/v1/%f0%80%80%ae",
        "/v1/%ed%a0%80",  # a UTF-16 surrogate
        "/v1/%ff",
        "/v1/caf%c3",  # cut short
        "/v1/%25c0%25ae",  # overlong, encoded twice
    ],
)
def test_double_encoded_and_overlong_tricks_are_refused(raw: str) -> None:
    with pytest.raises(InvalidTarget) as info:
        parse_target(raw)
    assert info.value.code == "invalid_request_target"


@pytest.mark.parametrize("raw", ["/v1/caf%C3%A9", "/v1/a%2541", "/v1/%e2%82%ac", "/v1/%2525"])
def test_well_formed_escapes_still_pass(raw: str) -> None:
    assert parse_target(raw).path == raw


def _escaped(char: str, rng: st.DataObject, depth: int, upper: bool) -> str:
    form = "%" + rng.draw(st.sampled_from(TRICKS[char]))
    escaped = form.replace("%", "%" + "25" * depth)  # every byte encoded ``depth`` more times
    return escaped.upper() if upper else escaped


@given(
    st.data(),
    st.sampled_from(sorted(TRICKS)),
    st.integers(0, 3),
    st.booleans(),
    st.text(alphabet="abc019", max_size=5),
)
def test_every_encoding_of_dot_slash_backslash_is_refused(
    data: st.DataObject, char: str, depth: int, upper: bool, around: str
) -> None:
    raw = f"/v1/{around}{_escaped(char, data, depth, upper)}{around}/x"
    with pytest.raises(InvalidTarget):
        parse_target(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/x/..;/y",
        "/v1/x/.;/y",
        "/v1/x/..;jsessionid=1/y",
        "/v1/x/.;a=b",
        "/v1/..;",
        "/v1/x/%2e%2e;/y",
        "/v1/x/.%2E;/y",
        "/v1/x/%252e%252e;/y",
        "/v1/x/..%3B/y",
        "/v1/x/.%3bx/y",
        "/v1/x/..%253B/y",
        "/v1/x/..%25253b/y",
    ],
)
def test_dot_segments_with_path_parameters_are_refused(raw: str) -> None:
    # Servlet stacks read "..;" as ".." (the parameter is dropped before the dot segment
    # is resolved): /v1/x/..;/y would reach /v1/y there.
    with pytest.raises(InvalidTarget):
        parse_target(raw)


@pytest.mark.parametrize(
    "raw", ["/v1/x/a..;/y", "/v1/x/..a;/y", "/v1/x/...;/y", "/v1/x/.a;b/y", "/v1/x;a=1/y"]
)
def test_other_segments_with_parameters_pass(raw: str) -> None:
    assert parse_target(raw).path == raw


# --------------------------------------------------------------------------- normal escapes

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
# Text as it may appear in a target: pchars, escapes (any case), and malformed "%".
URI_TEXT = st.lists(
    st.one_of(
        st.sampled_from(UNRESERVED + "!$&'()*+,;=:@/?"),
        st.integers(0, 255).map(lambda b: f"%{b:02x}"),
        st.integers(0, 255).map(lambda b: f"%{b:02X}"),
        st.sampled_from(["%", "%z", "%4", "%%41"]),
    ),
    max_size=30,
).map("".join)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/v1/products/10000%31.json", "/v1/products/100001.json"),
        ("/v1/%63ustomers/%7e%2D%5f", "/v1/customers/~-_"),
        ("/v1/a%2fb%c3%a9", "/v1/a%2Fb%C3%A9"),
        ("cursor=a%2bb%3d&x=%41", "cursor=a%2Bb%3D&x=A"),
        ("/v1/100%", "/v1/100%"),
        ("/v1/a%zz%4", "/v1/a%zz%4"),
        ("/v1/%A%41", "/v1/%A%41"),
        ("/v1/plain", "/v1/plain"),
    ],
)
def test_normal_escapes_examples(raw: str, normal: str) -> None:
    assert normal_escapes(raw) == normal


@given(URI_TEXT)
def test_normal_escapes_is_idempotent_and_keeps_the_decoded_bytes(text: str) -> None:
    normal = normal_escapes(text)
    assert normal_escapes(normal) == normal
    assert unquote_to_bytes(normal) == unquote_to_bytes(text)  # one resource: same octets
    if re.search(r"%(?![0-9A-Fa-f]{2})", text):
        assert normal == text  # not a URI: left alone
        return
    for escape in re.findall(r"%[0-9A-Fa-f]{2}", normal):
        assert escape == escape.upper()  # 6.2.2.1: upper-case hex
        assert chr(int(escape[1:], 16)) not in UNRESERVED  # 6.2.2.2: unreserved decoded


@given(st.text(alphabet=UNRESERVED + "/;=", max_size=30), st.data())
def test_every_spelling_of_one_target_normalises_alike(text: str, data: st.DataObject) -> None:
    """Escaping any unreserved character, in either hex case, names the same resource."""
    spelled = "".join(
        (f"%{ord(c):02x}" if data.draw(st.booleans()) else f"%{ord(c):02X}")
        if c in UNRESERVED and data.draw(st.booleans())
        else c
        for c in text
    )
    assert normal_escapes(spelled) == normal_escapes(text) == text
