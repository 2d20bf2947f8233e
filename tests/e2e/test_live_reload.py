"""Every live key, changed through a real SIGHUP of ``kounta-proxy serve``, takes effect; the
admin token rotates with an overlap."""

from __future__ import annotations

import fnmatch
import json
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from proxy.ops.reload import LIVE_KEYS
from tests.e2e.test_lifecycle import CALLER_KEY, SECRET_TOKEN, get, wait_until
from tests.e2e.test_reload import Proxy, metric

KEY_2 = "e2e-app-key-after-reload-0002"
MOVER = "e2e-mover-key-0003"
SPARE = "e2e-spare-key-0004"
BASIC = "e2e-basic-key-0005"
OAUTH = "e2e-oauth-key-0006"
ADDED = "e2e-added-caller-key-0007"
GOOD_REFRESH = "e2e-good-refresh-token-0008"
ADMIN_1 = "e2e-admin-token-one-0009"
ADMIN_2 = "e2e-admin-token-two-0010"
PATH = "/v1/companies/me.json"


class TokenEndpoint:
    """A token endpoint that knows one refresh token and one client, and records each form."""

    def __init__(self) -> None:
        forms: list[dict[str, str]] = []
        self.forms = forms

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                forms.append(form)
                good = (
                    form.get("refresh_token") == GOOD_REFRESH and form.get("client_id") == "cid-2"
                )
                good = good and form.get("client_secret") == "csecret-2"
                body: dict[str, Any] = (
                    {"access_token": SECRET_TOKEN, "token_type": "Bearer", "expires_in": 3600}
                    if good
                    else {"error": "invalid_grant", "error_description": "unknown"}
                )
                data = json.dumps(body).encode()
                self.send_response(200 if good else 400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    endpoint = TokenEndpoint()
    yield endpoint
    endpoint.server.shutdown()
    endpoint.server.server_close()


class LiveProxy(Proxy):
    """``serve`` with two versions of a configuration that differ in every live key."""

    def __init__(self, tmp_path: Path, upstream: str, token_url: str, **values: Any) -> None:
        self.token_url = token_url
        self.admin_file = tmp_path / "admin.token"
        super().__init__(tmp_path, upstream, **values)

    def write(self, **v: Any) -> None:
        after = v.get("after", False)
        self.admin_file.write_text(v.get("admin", ADMIN_1) + "\n")
        rules = '\n[[cache.rules]]\npath = "/v1/companies/*"\nfresh_for = 60\n' if after else ""
        added = f'\n[callers.added]\nkey = "{ADDED}"\naccount = "main"\n' if after else ""
        self.config.write_text(f"""
state_dir = {json.dumps(self.state)}
[server]
host = "127.0.0.1"
port = {self.port}
[admin]
port = {self.admin_port}
token_file = {json.dumps(str(self.admin_file))}
[upstream]
base_url = "{self.upstream}"
read_timeout = {20 if after else 30}
[log]
level = "{"warning" if after else "info"}"
[inbound]
key_header = "{"X-Shop-Key" if after else "X-Proxy-Key"}"
allow_anonymous = {"true" if after else "false"}
key_overlap = {v.get("overlap", 0 if after else 3600)}
[budget]
reserve = {0.25 if after else 0.0}
headroom = {1 if after else 2}
[budget.weights]
interactive = {5 if after else 6}
standard = {2 if after else 3}
batch = {2 if after else 1}
[accounts.main]
mode = "static"
token = "{SECRET_TOKEN}"
rate_per_minute = {120 if after else 180}
burst = {4 if after else 9}
[accounts.spare]
mode = "static"
token = "{SECRET_TOKEN if after else "e2e-unknown-token-to-the-sandbox"}"
[accounts.basic]
mode = "basic"
client_id = "{"sandbox-client" if after else "nobody"}"
client_secret = "{"sandbox-secret" if after else "wrong-secret"}"
[accounts.oauth]
mode = "oauth"
token_url = "{self.token_url}"
client_id = "{"cid-2" if after else "cid-1"}"
client_secret = "{"csecret-2" if after else "csecret-1"}"
refresh_token = "{GOOD_REFRESH if after else "e2e-bad-refresh-token"}"
[callers.app]
key = "{KEY_2 if after else CALLER_KEY}"
account = "main"
priority = "{"batch" if after else "standard"}"
max_share = {0.5 if after else 1.0}
[callers.mover]
key = "{MOVER}"
account = "{"main" if after else "spare"}"
[callers.spare]
key = "{SPARE}"
account = "spare"
[callers.basic]
key = "{BASIC}"
account = "basic"
[callers.oauth]
key = "{OAUTH}"
account = "oauth"
{added}{rules}""")

    def call(self, key: str | None, header: str = "X-Proxy-Key") -> tuple[int, str]:
        request = urllib.request.Request(f"{self.url}{PATH}", headers={header: key} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.headers.get("X-Cache", "")
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("X-Cache", "")

    def admin_read(self, token: str) -> int:
        """/budget with a Host the admin listener does not answer: only the token admits it."""
        headers = {"Host": "elsewhere.example", "Authorization": f"Bearer {token}"}
        return get(f"{self.admin}/budget", headers)[0]

    def reload(self, **values: Any) -> dict[str, Any]:
        before = len(self.named("reloaded"))
        self.write(**values)
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(self.named("reloaded")) > before, timeout=10)
        return self.named("reloaded")[-1]


def budget(proxy: LiveProxy, account: str) -> dict[str, Any]:
    status, body = get(f"{proxy.admin}/budget")
    assert status == 200
    found: dict[str, Any] = json.loads(body)["accounts"][account]
    return found


@pytest.mark.slow
def test_every_live_key_changed_by_sighup_takes_effect(
    tmp_path: Path, sandbox_url: str, token_endpoint: TokenEndpoint
) -> None:
    proxy = LiveProxy(tmp_path, sandbox_url, token_endpoint.url)
    try:
        # Before: each thing the reload will change, as it is.
        assert proxy.call(CALLER_KEY)[0] == 200
        assert proxy.call(CALLER_KEY)[1] != "HIT"  # no rule: revalidated
        assert proxy.call(MOVER)[0] == 401  # spare's token is unknown upstream
        assert proxy.call(SPARE)[0] == 401
        assert proxy.call(BASIC)[0] == 401  # wrong client
        assert proxy.call(OAUTH)[0] != 200  # invalid_grant
        assert proxy.call(None)[0] == 401  # anonymous refused
        assert proxy.call(ADDED)[0] == 401
        assert proxy.call(CALLER_KEY, "X-Shop-Key")[0] == 401
        assert proxy.admin_read(ADMIN_1) == 200 and proxy.admin_read(ADMIN_2) == 403
        assert (budget(proxy, "main")["rate"], budget(proxy, "main")["burst"]) == (180, 9)
        assert (budget(proxy, "main")["reserve"], budget(proxy, "main")["headroom"]) == (0.0, 2)
        assert budget(proxy, "main")["classes"]["batch"]["weight"] == 1
        assert proxy.named("request")  # info: request lines

        line = proxy.reload(after=True, admin=ADMIN_2)

        # Every live key changed, each named as applied; the restart-only one as such.
        changed = line["changed"]
        # ("callers" as a whole: a table going from empty to not; adding one is callers.*)
        unseen = [k for k in LIVE_KEYS if k != "callers" and not fnmatch.filter(changed, k)]
        assert unseen == []
        assert line["restart_needed"] == ["upstream.read_timeout"]
        requests = len(proxy.named("request"))

        # inbound.key_header, callers.app.key and inbound.key_overlap = 0: only the new key,
        # in the new header.
        assert proxy.call(KEY_2, "X-Shop-Key")[0] == 200
        assert proxy.call(CALLER_KEY, "X-Shop-Key")[0] == 401
        # accounts.main.rate_per_minute and burst (the budget retunes on its next request).
        assert (budget(proxy, "main")["rate"], budget(proxy, "main")["burst"]) == (120, 4)
        assert metric(proxy.admin, 'kounta_proxy_budget_limit_per_minute{account="main"}') == 120
        # budget.weights, budget.reserve and budget.headroom (retuned with the rates).
        weights = {k: v["weight"] for k, v in budget(proxy, "main")["classes"].items()}
        assert weights == {"interactive": 5, "standard": 2, "batch": 2}
        assert (budget(proxy, "main")["reserve"], budget(proxy, "main")["headroom"]) == (0.25, 1)
        # callers.mover.account: moved to main.
        assert proxy.call(MOVER, "X-Shop-Key")[0] == 200
        # accounts.spare.token.
        assert proxy.call(SPARE, "X-Shop-Key")[0] == 200
        # accounts.basic.client_id and client_secret.
        assert proxy.call(BASIC, "X-Shop-Key")[0] == 200
        # accounts.oauth.refresh_token, client_id and client_secret: a new provider, and the
        # token request carries each new value.
        assert proxy.call(OAUTH, "X-Shop-Key")[0] == 200
        used = token_endpoint.forms[-1]
        assert (used["refresh_token"], used["client_id"], used["client_secret"]) == (
            GOOD_REFRESH,
            "cid-2",
            "csecret-2",
        )
        # callers (a caller added).
        assert proxy.call(ADDED, "X-Shop-Key")[0] == 200
        # inbound.allow_anonymous.
        assert proxy.call(None)[0] == 200
        # cache.rules: the second GET is a fresh hit.
        proxy.call(KEY_2, "X-Shop-Key")
        assert proxy.call(KEY_2, "X-Shop-Key") == (200, "HIT")
        # admin.token: the new token; the old one refused (key_overlap = 0).
        assert proxy.admin_read(ADMIN_2) == 200
        assert proxy.admin_read(ADMIN_1) == 403
        # log.level: warning, so no request lines since the reload.
        assert len(proxy.named("request")) == requests
        assert proxy.stop() == 0
        text = proxy.log.read_text()
        for secret in (SECRET_TOKEN, ADMIN_1, ADMIN_2, GOOD_REFRESH, "csecret-2", KEY_2):
            assert secret not in text
        assert "Traceback" not in text
    finally:
        proxy.stop()


@pytest.mark.slow
def test_the_admin_token_rotates_by_sighup_with_an_overlap(
    tmp_path: Path, sandbox_url: str, token_endpoint: TokenEndpoint
) -> None:
    """A new admin.token_file content by SIGHUP; the previous token is
    accepted for inbound.key_overlap seconds beside the new one, then refused."""
    proxy = LiveProxy(tmp_path, sandbox_url, token_endpoint.url, overlap=3)
    try:
        assert proxy.admin_read(ADMIN_1) == 200 and proxy.admin_read(ADMIN_2) == 403
        line = proxy.reload(admin=ADMIN_2, overlap=3)
        assert line["changed"] == ["admin.token"] and line["restart_needed"] == []
        assert proxy.admin_read(ADMIN_2) == 200
        assert proxy.admin_read(ADMIN_1) == 200  # within the overlap
        assert proxy.named("admin_token_retired")[0]["accepted_for"] == 3
        wait_until(lambda: proxy.admin_read(ADMIN_1) == 403, timeout=6)
        assert proxy.admin_read(ADMIN_2) == 200
        # The same file content again changes nothing; an emptied file revokes at once.
        assert proxy.reload(admin=ADMIN_2, overlap=3)["changed"] == []
        proxy.reload(admin="", overlap=3)
        assert proxy.admin_read(ADMIN_2) == 403
        assert proxy.stop() == 0
        assert ADMIN_1 not in proxy.log.read_text() and ADMIN_2 not in proxy.log.read_text()
    finally:
        proxy.stop()
