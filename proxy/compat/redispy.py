"""Every touch of redis-py's private parts: how a connection writes a command, its
transport taken over, and the exception an error reply becomes.

redis-py's asyncio connection writes each command under ``asyncio.wait_for(...,
socket_timeout)``, which on Python 3.11 wraps the write in a task of its own: one more task,
timer and loop turn for every command (the fetch lock, the budget's slot, the lock's release,
a record's put), though the write almost never waits (a command is a few hundred bytes; the
socket takes it at once). :func:`fast_writes` gives a pool's connections a send that writes
the command at once and waits, under the same timeout, only when the transport could not
take it all (bytes left in its buffer), as redis-py's own send does; every error is handled
as redis-py handles it (the connection dropped, ``TimeoutError`` or ``ConnectionError``
raised). Measured on a real redis-server: 25-30 µs less CPU per command (docs/performance.md).

:func:`taken_transport` and :func:`response_error` serve :mod:`proxy.shared.wire` (the backend's
pipelined connection of plain RESP): the transport of a pool's connection, and an error reply
as the exception redis-py raises for it (``NOSCRIPT`` a ``NoScriptError``, ``LOADING`` a
``BusyLoadingError``, ...), so the backend handles both paths' errors alike.

:data:`PINS` lists the assumptions; ``tests/unit/test_compat.py`` checks each and names
:data:`WRITTEN_AGAINST` when one fails after an upgrade.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from redis import exceptions as rexc
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection, ConnectionPool

WRITTEN_AGAINST = "8.1.0"


class FastWrites:
    """A mixin over a redis-py connection class: :meth:`send_packed_command` without the
    task per command (the module's docstring)."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        conn: Any = self
        writer = conn._writer
        if (
            not conn.socket_timeout
            or conn.health_check_interval  # redis-py's send checks the health first
            or writer is None
            or not conn.is_connected
            or writer.transport.is_closing()
            or writer.transport.get_write_buffer_size()
        ):
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if isinstance(command, str):
            command = command.encode()
        pieces = [command] if isinstance(command, bytes) else list(command)
        transport = writer.transport
        writer.writelines(pieces)  # to the socket now; what it cannot take stays buffered
        if not transport.get_write_buffer_size() and not transport.is_closing():
            return  # all of it sent: nothing to wait for (redis-py's drain returns at once)
        try:
            await asyncio.wait_for(writer.drain(), conn.socket_timeout)
        except TimeoutError:
            await _drop(conn, transport)
            raise rexc.TimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await _drop(conn, transport)
            raise rexc.ConnectionError(f"Error while writing to socket. {e}.") from e
        except BaseException:
            await _drop(conn, transport)
            raise


async def _drop(conn: Any, transport: asyncio.WriteTransport) -> None:
    """A command that could not be written whole: the rest is thrown away with the socket
    (redis-py's close would send it later, and Redis run a command reported as failed)."""
    transport.abort()
    await conn.disconnect(nowait=True)


_classes: dict[type, type] = {}


def fast_writes(pool: ConnectionPool) -> None:
    """The pool's connections made from now on write as :class:`FastWrites` does (its
    ``connection_class``: plain, TLS or Unix socket, as the URL chose)."""
    base = pool.connection_class
    if issubclass(base, FastWrites):
        return
    made = _classes.get(base)
    if made is None:
        made = _classes[base] = type(f"Fast{base.__name__}", (FastWrites, base), {})
    pool.connection_class = made


# redis-py's parsers' own mapping (a classmethod, untyped).
_parse_error: Callable[[str], Any] = BaseParser.parse_error


def taken_transport(connection: Any) -> asyncio.Transport | None:
    """The transport of a pool's connected ``connection`` (redis-py 8: its ``_writer``'s),
    for a protocol of the caller's own to take over; None when it is closed."""
    writer = connection._writer
    if writer is None or writer.transport.is_closing():
        return None
    transport: asyncio.Transport = writer.transport
    return transport


def response_error(text: str) -> rexc.RedisError:
    """The exception redis-py's parsers make of the error reply ``text`` (without its
    ``-``)."""
    error: rexc.RedisError = _parse_error(text)
    return error


def _pins() -> dict[str, Callable[[], bool]]:
    send = inspect.signature(AbstractConnection.send_packed_command)
    source = inspect.getsource(AbstractConnection.send_packed_command)
    return {
        "AbstractConnection.send_packed_command(command, check_health=True)": lambda: (
            list(send.parameters) == ["self", "command", "check_health"]
            and send.parameters["check_health"].default is True
        ),
        "send_packed_command writes under wait_for(socket_timeout) with _writer": lambda: (
            "self._writer" in source and "self.socket_timeout" in source
        ),
        "AbstractConnection: _writer, socket_timeout, health_check_interval, is_connected": (
            lambda: (
                all(
                    name in inspect.getsource(AbstractConnection)
                    for name in (
                        "self._writer",
                        "self.socket_timeout",
                        "self.health_check_interval",
                    )
                )
                and isinstance(inspect.getattr_static(AbstractConnection, "is_connected"), property)
            )
        ),
        "AbstractConnection.disconnect(nowait=...)": lambda: (
            "nowait" in inspect.signature(AbstractConnection.disconnect).parameters
        ),
        "BaseParser.parse_error(text) maps NOSCRIPT and LOADING": lambda: (
            isinstance(_parse_error("NOSCRIPT x"), rexc.NoScriptError)
            and isinstance(_parse_error("LOADING x"), rexc.BusyLoadingError)
            and type(_parse_error("WRONGTYPE x")) is rexc.ResponseError
            and str(_parse_error("WRONGTYPE x")) == "WRONGTYPE x"
        ),
        "ConnectionPool.connection_class": lambda: (
            "self.connection_class" in inspect.getsource(ConnectionPool)
        ),
    }


PINS = _pins()
