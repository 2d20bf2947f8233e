"""The pure parts of the backend's pipelined connection (:mod:`proxy.shared.wire`) and its
scripts (:mod:`proxy.shared.piped`): a script's command packed byte for byte as redis-py
packs it, replies of every kind a script gives (nested arrays, nulls, errors as redis-py's
exceptions) parsed wherever they are cut, and NOSCRIPT answered by sending the script whole."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.exceptions as rexc
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from proxy.shared.piped import Script
from proxy.shared.wire import Wire, replies

ARG = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20),
    st.integers(min_value=-(2**62), max_value=2**62),
    st.floats(allow_nan=False, allow_infinity=False),
)


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Connection:
    """What the wire knows of a connection in these tests."""

    rest = b""

    def __init__(self) -> None:
        self.transport = _Transport()


def connected() -> tuple[Wire, _Connection]:
    wire, connection = Wire(None, 1.0), _Connection()
    wire._replies = connection  # type: ignore[assignment]
    return wire, connection


async def written(connection: _Connection) -> bytes:
    await asyncio.sleep(0)  # the turn's commands are written at its end
    return b"".join(connection.transport.written)


@given(st.lists(ARG, max_size=4), st.lists(ARG, max_size=6))
def test_a_scripts_command_is_packed_as_redis_py_packs_it(keys: list[Any], args: list[Any]) -> None:
    async def packed() -> tuple[bytes, bytes]:
        wire, connection = connected()
        script = Script(wire, "return 1")
        script(keys, args)
        redis_py = Connection().pack_command(
            "EVALSHA", script.sha.decode(), len(keys), *keys, *args
        )
        return await written(connection), b"".join(redis_py)

    ours, theirs = asyncio.run(packed())
    assert ours == theirs


def test_an_argument_redis_py_would_not_encode_is_refused() -> None:
    script = Script(Wire(None, 1.0), "return 1")
    for bad in (True, None, object()):
        with pytest.raises(rexc.DataError):
            script([], [bad])


SCRIPT_REPLY = b"*5\r\n:1\r\n$1\r\n7\r\n_\r\n*2\r\n$-1\r\n*-1\r\n-ERR inner\r\n"


def test_a_scripts_reply_of_every_kind_is_read_as_redis_py_gives_it() -> None:
    parsed = replies(SCRIPT_REPLY, 0, 1, 100)
    assert parsed is not None and parsed[1] == len(SCRIPT_REPLY)
    (one, seven, null, inner, error) = parsed[0][0]
    assert (one, seven, null, inner) == (1, b"7", None, [None, None])
    assert type(error) is rexc.ResponseError and str(error) == "inner"  # as redis-py strips ERR


@given(st.integers(min_value=0, max_value=len(SCRIPT_REPLY) - 1))
def test_a_scripts_reply_cut_anywhere_is_not_whole_until_it_is(cut: int) -> None:
    assert replies(SCRIPT_REPLY[:cut], 0, 1, 100) is None


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (b"-NOSCRIPT No matching script\r\n", rexc.NoScriptError),
        (b"-LOADING Redis is loading\r\n", rexc.BusyLoadingError),  # degraded, as redis-py's
        (b"-WRONGTYPE Operation\r\n", rexc.ResponseError),
    ],
)
def test_an_error_reply_is_the_exception_redis_py_raises(text: bytes, kind: type) -> None:
    parsed = replies(text, 0, 1, 100)
    assert parsed is not None and type(parsed[0][0]) is kind


@pytest.mark.parametrize(
    "reply",
    [
        b"$101\r\n",  # a bulk string past the call's cap
        b"*-2\r\n",
        b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",  # deeper than any script answers
        b"%1\r\n:1\r\n:1\r\n",  # a map: no call gets one
    ],
)
def test_a_reply_no_call_gets_fails_the_connection_at_once(reply: bytes) -> None:
    with pytest.raises(rexc.ConnectionError):
        replies(reply, 0, 1, 100)


async def test_noscript_sends_the_script_whole_once_in_its_calls_place() -> None:
    """NOSCRIPT: the call is sent again as EVAL with the script's text (its reply then
    answers the caller); an EVAL answering NOSCRIPT (it cannot) fails its caller."""
    wire, connection = connected()
    script = Script(wire, "return KEYS[1]")
    found, other = script(["k"], []), script(["j"], [])
    assert isinstance(found, asyncio.Future) and isinstance(other, asyncio.Future)
    sent = await written(connection)
    noscript = b"-NOSCRIPT No matching script\r\n"
    wire._received(connection, noscript + noscript)  # type: ignore[arg-type]
    assert not found.done() and not other.done()
    resent = [Connection().pack_command("EVAL", "return KEYS[1]", 1, k) for k in "kj"]
    assert await written(connection) == sent + b"".join(b"".join(r) for r in resent)
    wire._received(connection, b"$1\r\nk\r\n" + noscript)  # type: ignore[arg-type]
    assert found.result() == b"k" and not wire._waiting
    with pytest.raises(rexc.NoScriptError):
        other.result()


class _Names:
    """What :func:`classed` and :func:`owned` use of a backend: its keys, replica, sends."""

    _replica = "r-1"
    _sent = 0

    def key(self, kind: str, account: str, suffix: str = "") -> str:
        return f"kp:{kind}:{account}{':' + suffix if suffix else ''}"


SECONDS = st.floats(min_value=0, max_value=1e10, allow_nan=False)


@given(
    st.sampled_from(["main", "other account"]),
    st.integers(1, 10**6),
    st.integers(1, 1000),
    st.sampled_from(["interactive", "standard", "batch"]),
    st.tuples(st.integers(0, 10**4), st.integers(0, 10**4), st.integers(0, 10**4)),
    st.tuples(SECONDS, SECONDS, SECONDS),
    st.tuples(SECONDS, SECONDS, SECONDS),
    SECONDS,
    st.integers(-5, 50),
)
def test_a_slot_ask_packed_in_parts_is_the_one_packed_whole(
    account: str,
    per_window: int,
    burst: int,
    klass: str,
    waiting: tuple[int, int, int],
    weights: tuple[float, float, float],
    ages: tuple[float, float, float],
    longest: float,
    headroom: int,
) -> None:
    # TAKE_OWNED with the claim's lock and owner: its parts an account's asks share packed
    # once (owned), the same bytes and member as classed's keys and arguments packed whole.
    from proxy.shared.base import ClassedAsk, SlotAsk
    from proxy.shared.redis_budget import classed, owned  # (owned: new)

    ask = ClassedAsk(klass, waiting, 0.25, weights, 5.0, ages, longest, headroom)
    slot = SlotAsk(account, per_window, burst, 61.0, ask)
    whole, parts = _Names(), _Names()

    async def both() -> tuple[bytes, bytes]:
        wire, connection = connected()
        script = Script(wire, "return 1")
        for _ in range(2):  # the second: its shared parts packed already
            keys, args = classed(whole, slot)
            script([*keys, "kp:cache:main:lock:d"], [*args, "owner"])
            ours, ours_member = await written(connection), args[3]
            connection.transport.written.clear()
            tail, count, member = owned(parts, slot, "kp:cache:main:lock:d", "owner")
            script.packed(tail, count)
            assert member == ours_member
            assert await written(connection) == ours
            connection.transport.written.clear()
        return ours, ours

    asyncio.run(both())
