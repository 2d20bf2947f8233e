"""aiohttp's and diskcache's private parts: every touch is in proxy/compat/, and each
assumption it makes still holds for the installed version.

When an upgrade breaks one, the failure names the library, the installed version, the
assumption and the version proxy/compat/ was written against: adapt that module (and its pin),
nothing else should need to change.
"""

from __future__ import annotations

import ast
import asyncio
import contextvars
import hmac
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import aiohttp
import diskcache  # type: ignore[import-untyped]
import pytest
import redis
from aiohttp import web
from multidict import CIMultiDict

from proxy.compat import aiohttp as compat_aiohttp
from proxy.compat import collector as compat_collector
from proxy.compat import diskcache as compat_diskcache
from proxy.compat import hashes as compat_hashes
from proxy.compat import redispy as compat_redis
from proxy.compat import tasks as compat_tasks

ROOT = Path(__file__).resolve().parents[2] / "proxy"
LIBRARIES: dict[str, tuple[ModuleType, ModuleType]] = {
    "aiohttp": (aiohttp, compat_aiohttp),
    "diskcache": (diskcache, compat_diskcache),
    "redis": (redis, compat_redis),
    "hmac": (hmac, compat_hashes),  # the standard library's: its version is Python's
}
# asyncio's (the standard library's, its version Python's) and CPython's collector (its C
# API through ctypes): pinned alike, to Python's minor version, but not among the LIBRARIES
# whose names the private-part scan below looks for (asyncio's own are everywhere).
PYTHON_PINS = [
    (compat, name, check)
    for compat in (compat_tasks, compat_collector)
    for name, check in compat.PINS.items()
]


def version(module: ModuleType) -> str:
    """A library's version; a standard library module's is Python's minor version."""
    found = getattr(module, "__version__", None)
    return found if isinstance(found, str) else "{}.{}".format(*sys.version_info[:2])


PINS = [
    (library, name, check)
    for library, (_, compat) in LIBRARIES.items()
    for name, check in compat.PINS.items()
]


@pytest.mark.parametrize(("library", "name", "check"), PINS, ids=[p[1] for p in PINS])
def test_each_private_part_we_use_is_still_there(
    library: str, name: str, check: Callable[[], bool]
) -> None:
    module, compat = LIBRARIES[library]
    installed = version(module)
    assert check(), (
        f"{library} {installed}: {name!r} no longer holds; {compat.__name__} was written "
        f"against {library} {compat.WRITTEN_AGAINST}: adapt it to {library} {installed}"
    )


@pytest.mark.parametrize(("compat", "name", "check"), PYTHON_PINS, ids=[p[1] for p in PYTHON_PINS])
def test_each_private_part_of_python_we_use_is_still_there(
    compat: ModuleType, name: str, check: Callable[[], bool]
) -> None:
    installed = version(asyncio)
    assert installed == compat.WRITTEN_AGAINST and check(), (
        f"Python {installed}: {name!r} no longer holds, or was not checked on this version; "
        f"{compat.__name__} was written against {compat.WRITTEN_AGAINST}"
    )


def test_the_installed_versions_are_the_ones_compat_was_written_against() -> None:
    """An upgrade (a new lock) must look at proxy/compat/ once: when the pins above pass
    with the new version, set its WRITTEN_AGAINST to it."""
    for library, (module, compat) in LIBRARIES.items():
        installed = version(module)
        assert installed == compat.WRITTEN_AGAINST, (
            f"{library} {installed} is installed; {compat.__name__} was written "
            f"against {compat.WRITTEN_AGAINST}: check its pins (tests/unit/test_compat.py) "
            f"and set WRITTEN_AGAINST = {installed!r}"
        )


def library_privates() -> set[str]:
    """The underscored (not dunder) names of the library classes the proxy builds on."""
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.web_protocol import RequestHandler
    from aiohttp.web_server import Server

    classes = (RequestHandler, Server, aiohttp.web.AppRunner, aiohttp.web.BaseSite)
    classes += (ResponseHandler, aiohttp.TCPConnector, aiohttp.ClientSession)
    classes += (diskcache.Disk, diskcache.Cache, hmac.HMAC)
    names: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__:
            init = getattr(vars(klass).get("__init__"), "__code__", None)  # instance attributes
            found = [*vars(klass), *getattr(klass, "__slots__", ()), *getattr(init, "co_names", ())]
            names.update(n for n in found if n.startswith("_") and not n.startswith("__"))
    return names


def library_names(nodes: Iterable[ast.AST]) -> set[str]:
    """Names a module (its nodes) binds to aiohttp's or diskcache's modules and classes."""
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            for alias in node.names:
                root = (module or alias.name).split(".")[0]
                if root in LIBRARIES:
                    found.add(alias.asname or alias.name.split(".")[0])
    return found


@dataclass(frozen=True)
class Source:
    """One module of proxy/, parsed and walked once (both checks below read every node)."""

    where: Path
    body: list[ast.stmt]
    nodes: list[ast.AST]  # ast.walk's order
    names: set[str]  # library_names

    @classmethod
    def read(cls, path: Path) -> Source:
        tree = ast.parse(path.read_text())
        nodes = list(ast.walk(tree))
        return cls(path.relative_to(ROOT.parent), tree.body, nodes, library_names(nodes))


def subclasses_a_library(node: ast.ClassDef, names: set[str]) -> bool:
    def root(expr: ast.expr) -> str:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else ""

    return any(root(base) in names for base in node.bases)


def is_self_store(node: ast.Attribute) -> bool:
    value = node.value
    return isinstance(node.ctx, ast.Store) and isinstance(value, ast.Name) and value.id == "self"


def own_names(sources: list[Source]) -> set[str]:
    """Names the proxy itself defines: module functions and classes, and the methods and
    ``self`` attributes of its classes that do not subclass a library class."""
    found: set[str] = set()
    for source in sources:
        for node in source.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.add(node.name)
        for node in source.nodes:
            if not isinstance(node, ast.ClassDef) or subclasses_a_library(node, source.names):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.add(inner.name)
                elif isinstance(inner, ast.Attribute) and is_self_store(inner):
                    found.add(inner.attr)
    return found


def touches(source: Source, privates: set[str], overridable: set[str]) -> list[str]:
    """Uses in ``source`` of a library's private name that the proxy does not define itself,
    and methods of a library subclass that override one of the library's private methods."""
    where = source.where
    found = []
    for node in source.nodes:
        if isinstance(node, ast.Constant) and node.value in privates:  # getattr(x, "_y")
            found.append(f"{where}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in privates:
            found.append(f"{where}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ClassDef) and subclasses_a_library(node, source.names):
            methods = [
                i for i in node.body if isinstance(i, ast.FunctionDef | ast.AsyncFunctionDef)
            ]
            found += [f"{where}:{m.lineno}: def {m.name}" for m in methods if m.name in overridable]
    return found


def test_no_private_part_is_touched_outside_compat() -> None:
    paths = [p for p in sorted(ROOT.rglob("*.py")) if p.parent.name != "compat"]
    sources = [Source.read(p) for p in paths]
    overridable = library_privates()
    privates = overridable - own_names(sources)
    found = [hit for source in sources for hit in touches(source, privates, overridable)]
    assert not found, f"reach aiohttp's or diskcache's private parts through proxy/compat/: {found}"


RENDERED = [
    (200, {"Content-Type": "application/json", "ETag": '"a"'}, b'{"a": 1}'),
    (200, {"Content-Type": "application/json"}, b""),
    (200, {"X-A": "1"}, b"no type"),
    (200, {"Content-Length": "5", "Content-Type": "text/plain"}, b"hello"),
    (304, {"ETag": '"a"', "Content-Length": "9"}, b""),
    (304, {"ETag": '"a"'}, b""),
    (204, {"ETag": '"a"', "Transfer-Encoding": "chunked"}, b""),
    (204, {"ETag": '"a"'}, b""),
]


async def written_by_aiohttp(
    response: web.Response, read: Callable[[asyncio.StreamReader], Awaitable[bytes]]
) -> bytes:
    """What aiohttp's own server writes for ``response`` answering a GET (``read``
    reads it)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return response

    server = web.Server(handle)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = compat_aiohttp.site_sockets(site)[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await asyncio.wait_for(read(reader), 5)
        writer.close()
    finally:
        await runner.cleanup()
    return got


@pytest.mark.parametrize(("status", "headers", "body"), RENDERED)
async def test_an_answer_rendered_in_the_protocol_is_what_aiohttp_writes(
    status: int, headers: dict[str, str], body: bytes
) -> None:
    """render_response against aiohttp's own server writing the same web.Response, and
    render_head (no body made) its head and whether the body follows."""
    headers = {**headers, "Date": "Sat, 05 Dec 2026 23:00:00 GMT", "Server": "s"}
    expected = compat_aiohttp.render_response(status, CIMultiDict(headers), body)
    head, with_body = compat_aiohttp.render_head(status, CIMultiDict(headers), len(body))
    assert (head + body if with_body else head) == expected
    response = web.Response(status=status, headers=headers, body=body or None)
    got = await written_by_aiohttp(response, lambda r: r.readexactly(len(expected)))
    assert got == expected


async def test_an_eager_tasks_first_step_runs_within_the_call_as_the_task() -> None:
    """compat.tasks.eager_task: the first step (up to the first wait) at once, in the task's
    own context and as the current task; then the loop drives it; cancelled before its first
    scheduled step, the wait it is in is what is cancelled (its cleanup runs)."""
    seen: list[object] = []
    name: contextvars.ContextVar[str] = contextvars.ContextVar("name", default="outside")
    gate = asyncio.get_running_loop().create_future()

    async def flight() -> str:
        name.set("inside")
        seen.append(asyncio.current_task())
        try:
            await gate
            seen.append(name.get())
            return "over"
        finally:
            seen.append("cleaned up")

    outer = asyncio.current_task()
    task = compat_tasks.eager_task(flight())
    assert seen == [task] and asyncio.current_task() is outer and name.get() == "outside"
    assert "flight" in repr(task)
    gate.set_result(None)
    assert await task == "over"
    assert seen == [task, "inside", "cleaned up"]
    gate = asyncio.get_running_loop().create_future()
    seen.clear()
    waiting = compat_tasks.eager_task(flight())
    waiting.cancel()  # before the loop ran any step of it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert seen == [waiting, "cleaned up"] and not gate.done()

    async def fails() -> None:
        raise ValueError("first step")

    async def returns() -> int:
        return 3

    with pytest.raises(ValueError, match="first step"):
        await compat_tasks.eager_task(fails())
    assert await compat_tasks.eager_task(returns()) == 3


async def test_a_date_given_to_render_response_goes_where_aiohttp_puts_its_own() -> None:
    """render_response(..., date=...) against aiohttp's own server, which adds its Date
    after the Content-Length and Content-Type it adds."""

    async def read(reader: asyncio.StreamReader) -> bytes:
        return await reader.readuntil(b"\r\n\r\n") + await reader.readexactly(4)

    response = web.Response(status=200, headers={"X-A": "1", "Server": "s"}, body=b"body")
    got = await written_by_aiohttp(response, read)
    date = next(line for line in got.split(b"\r\n") if line.startswith(b"Date: "))[6:]
    headers = CIMultiDict({"X-A": "1", "Server": "s"})
    assert compat_aiohttp.render_response(200, headers, b"body", date=date.decode()) == got
    # http_date: the Date render_response adds, encoded (a second may pass in between).
    for _ in range(3):
        rendered = compat_aiohttp.render_response(200, CIMultiDict(), b"")
        now = compat_aiohttp.http_date()
        if now in rendered:
            break
    assert b"\r\nDate: " + now + b"\r\n" in rendered
