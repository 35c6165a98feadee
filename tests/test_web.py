"""The web endpoint over real HTTP on loopback, against a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import http.client
import logging
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway import lists
from gateway.clock import ManualClock
from gateway.lists import MailingList, Member
from gateway.schema import Mode, journal, members
from gateway.signing import LinkSigner
from gateway.store import Store
from gateway.templates import Templates
from gateway.web import MAX_BODY, BadRequest, WebServer, parse_form
from tests.support import REPO

KEY = bytes(range(32))
EVIL_NAME = '<script>alert("x")</script> & Co'
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class Site:
    """A running endpoint, a list with two members, and a second list alice is also on."""

    store: Store
    server: WebServer
    host: str
    port: int
    signer: LinkSigner
    discuss: MailingList
    other: MailingList
    alice: Member
    bob: Member
    alice_other: Member

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Answer(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def post(self, path: str, body: bytes, content_type: str = FORM) -> Answer:
        return self.request("POST", path, body, {"Content-Type": content_type})

    def token(self, member: Member) -> str:
        return self.signer.member_token(member.list_id, member.id, member.address)

    def page(self, member: Member, kind: str = "u") -> str:
        return f"/l/{member.list_id}/{kind}/{self.token(member)}"

    def snapshot(self) -> tuple[list[tuple[object, ...]], int]:
        """Every membership and how many journal records there are."""
        with self.store.read() as conn:
            rows = conn.execute(sa.select(members.c.id, members.c.list_id, members.c.address,
                                          members.c.mode).order_by(members.c.id)).all()
            count = conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()
        return [tuple(r) for r in rows], count

    def member(self, lst: MailingList, address: str) -> Member | None:
        with self.store.read() as conn:
            return lists.find_member(conn, lst.id, [address])

    def journal(self) -> list[tuple[str, str, str, int | None, int | None]]:
        with self.store.read() as conn:
            rows = conn.execute(sa.select(journal.c.stage, journal.c.event, journal.c.detail,
                                          journal.c.message_id, journal.c.list_id)
                                .order_by(journal.c.id)).all()
        return [tuple(r) for r in rows]


def _site(store: Store, *, base_url: str = "",
          metrics: bytes | None = None) -> Iterator[Site]:
    with store.write() as conn:
        discuss = lists.create(conn, "discuss@example.org", now=0.0, display_name="Discuss")
        other = lists.create(conn, "other@example.org", now=0.0, display_name="Other")
        alice = lists.add_member(conn, discuss, "alice@example.net", now=0.0,
                                 display_name=EVIL_NAME)
        bob = lists.add_member(conn, discuss, "bob@example.net", now=0.0,
                               mode=Mode.DIGEST_PLAIN)
        alice_other = lists.add_member(conn, other, "alice@example.net", now=0.0)
    signer = LinkSigner(KEY)
    server = WebServer(store, signer=signer, templates=Templates(REPO / "templates"),
                       clock=ManualClock(), base_url=base_url,
                       metrics=(lambda: metrics) if metrics is not None else None)
    host, port = server.start("127.0.0.1", 0)
    try:
        yield Site(store, server, host, port, signer, discuss, other, alice, bob, alice_other)
    finally:
        server.stop()


@pytest.fixture
def site(store: Store) -> Iterator[Site]:
    """On each store: for what the store does (memberships, the journal)."""
    yield from _site(store)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    """For HTTP behaviour, which does not depend on the store: SQLite only, to be quick."""
    store = Store(f"sqlite:///{tmp_path / 'web.db'}", clock=ManualClock())
    store.upgrade()
    yield store
    store.dispose()


@pytest.fixture
def web(sqlite_store: Store) -> Iterator[Site]:
    yield from _site(sqlite_store)


# -- RFC 8058 one-click -------------------------------------------------------------


def _multipart(fields: dict[str, str], boundary: str = "----lgBoundary7MA4YWxk") -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


def test_web_one_click_post_unsubscribes(site: Site) -> None:
    answer = site.post(site.page(site.alice), ONE_CLICK)
    assert answer.status == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert "unsubscribed" in answer.text
    assert site.member(site.discuss, "alice@example.net") is None
    # Only that membership: the same address on another list, and others here, stay.
    assert site.member(site.other, "alice@example.net") is not None
    assert site.member(site.discuss, "bob@example.net") is not None
    assert site.journal() == [
        ("commands", "unsubscribed",
         f"member {site.alice.id} <alice@example.net> unsubscribed by one-click link",
         None, site.discuss.id)]


@pytest.mark.parametrize(("body", "content_type"), [
    (ONE_CLICK, f"{FORM}; charset=utf-8"),
    (b"List-Unsubscribe=One-Click", None),
    (_multipart({"List-Unsubscribe": "One-Click"}),
     "multipart/form-data; boundary=----lgBoundary7MA4YWxk"),
    (_multipart({"List-Unsubscribe": "One-Click"}),
     'multipart/form-data; boundary="----lgBoundary7MA4YWxk"'),
], ids=["urlencoded-charset", "no-type", "multipart", "multipart-quoted-boundary"])
def test_web_one_click_post_in_each_encoding(web: Site, body: bytes,
                                             content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    answer = web.request("POST", web.page(web.alice), body, headers)
    assert answer.status == 200, answer.text
    assert web.member(web.discuss, "alice@example.net") is None
    assert [e[1] for e in web.journal()] == ["unsubscribed"]


def test_web_one_click_replay_is_harmless(site: Site) -> None:
    path = site.page(site.alice)
    first = site.post(path, ONE_CLICK)
    after_first = site.snapshot()
    again = [site.post(path, ONE_CLICK) for _ in range(3)]
    # RFC 8058: the same 200 again (no error that invites retries), and nothing else happens.
    assert [a.status for a in [first, *again]] == [200] * 4
    assert {a.body for a in again} == {first.body}
    assert site.snapshot() == after_first
    assert [e[1] for e in site.journal()] == ["unsubscribed"]
    # The page for the old link says so; a later choice changes nothing (and creates nobody).
    page = site.get(path)
    assert page.status == 200 and "not subscribed" in page.text
    assert site.post(path, b"choice=nomail").status == 410
    assert site.post(path, b"choice=unsubscribe").status == 200
    assert site.snapshot() == after_first


def test_web_one_click_at_the_same_moment(site: Site) -> None:
    # A mail provider may retry while the first POST is still being answered.
    path = site.page(site.alice)
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: site.post(path, ONE_CLICK), range(6)))
    assert [a.status for a in answers] == [200] * 6
    assert site.member(site.discuss, "alice@example.net") is None
    assert [e[1] for e in site.journal()] == ["unsubscribed"]


def test_web_get_changes_nothing(site: Site) -> None:
    before = site.snapshot()
    for _ in range(2):
        page = site.get(site.page(site.bob))
        assert page.status == 200
        assert "a digest as one plain-text message" in page.text
        assert 'value="digest-plain" checked' in page.text
        regular = site.get(site.page(site.bob, "r"))
        assert regular.status == 200
        assert "Switch to per-post delivery" in regular.text
        # A prefetcher may also send the one-click body's words in a query string.
        assert site.get(site.page(site.bob) + "?List-Unsubscribe=One-Click").status == 200
        assert site.get(site.page(site.bob) + "?choice=unsubscribe").status == 200
    assert site.snapshot() == before


# -- the preferences page -------------------------------------------------------------


def test_web_choice_changes_mode(site: Site) -> None:
    path = site.page(site.bob)
    before = Mode.DIGEST_PLAIN
    changes = 0
    for mode in [Mode.REGULAR, Mode.DIGEST_MIME, Mode.DIGEST_HTML, Mode.DIGEST_HTML,
                 Mode.NOMAIL, Mode.DIGEST_PLAIN]:
        answer = site.post(path, f"choice={mode.value}".encode())
        assert answer.status == 200, answer.text
        assert site.member(site.discuss, "bob@example.net") == \
            Member(site.bob.id, site.discuss.id, "bob@example.net", "", mode, True)
        entries = site.journal()
        if mode is before:  # nothing to change, nothing to record
            assert "Nothing changed" in answer.text
        else:
            changes += 1
            assert "Saved" in answer.text
            assert entries[-1] == (
                "commands", "mode-changed",
                f"member {site.bob.id} <bob@example.net> changed delivery from {before.value} "
                f"to {mode.value} by preferences page", None, site.discuss.id)
        assert len(entries) == changes
        assert f'value="{mode.value}" checked' in site.get(path).text
        before = mode


def test_web_choice_unsubscribe_from_page(site: Site) -> None:
    answer = site.post(site.page(site.alice), b"choice=unsubscribe")
    assert answer.status == 200
    assert "You are unsubscribed" in answer.text
    assert "discuss-join@example.org" in answer.text
    assert site.member(site.discuss, "alice@example.net") is None
    assert site.journal()[0][1:3] == (
        "unsubscribed",
        f"member {site.alice.id} <alice@example.net> unsubscribed by preferences page")


def test_web_choice_as_multipart(web: Site) -> None:
    boundary = "b0undary"
    answer = web.post(web.page(web.bob), _multipart({"choice": "digest-html"}, boundary),
                       f"multipart/form-data; boundary={boundary}")
    assert answer.status == 200, answer.text
    member = web.member(web.discuss, "bob@example.net")
    assert member is not None and member.mode is Mode.DIGEST_HTML


def test_web_regular_button_switches_to_per_post(web: Site) -> None:
    page = web.get(web.page(web.bob, "r"))
    # The button posts choice=regular to the member's /u/ page, by a relative URL.
    assert f'action="../u/{web.token(web.bob)}"' in page.text
    assert 'name="choice" value="regular"' in page.text
    answer = web.post(web.page(web.bob), b"choice=regular")
    assert answer.status == 200
    member = web.member(web.discuss, "bob@example.net")
    assert member is not None and member.mode is Mode.REGULAR


@pytest.mark.parametrize("body", [b"", b"choice=everything", b"choice=", b"List-Unsubscribe=No",
                                  b"other=1"])
def test_web_post_without_a_choice_is_400(web: Site, body: bytes) -> None:
    before = web.snapshot()
    answer = web.post(web.page(web.bob), body)
    assert answer.status == 400
    assert web.snapshot() == before


# -- links that do not name a member -------------------------------------------------


def _forged(site: Site) -> dict[str, str]:
    """Paths whose token must not work, each named by what is wrong with it."""
    alice, bob, discuss, other = site.alice, site.bob, site.discuss, site.other
    token = site.token(alice)
    mac = token.split("-", 1)[1]
    flipped = mac[:-1] + ("a" if mac[-1] != "a" else "b")
    stranger = LinkSigner(b"another installation's key!!!!!!")
    return {
        "bob's id with alice's MAC": f"/l/{discuss.id}/u/{bob.id}-{mac}",
        "alice's token on another list": f"/l/{other.id}/u/{token}",
        "alice's membership of the other list": f"/l/{discuss.id}/u/"
                                                + site.token(site.alice_other),
        "signed for the other list": f"/l/{discuss.id}/u/"
                                     + site.signer.member_token(other.id, alice.id, alice.address),
        "tampered MAC": f"/l/{discuss.id}/u/{alice.id}-{flipped}",
        "MAC in capitals": f"/l/{discuss.id}/u/{alice.id}-{mac.upper()}",
        "MAC cut short": f"/l/{discuss.id}/u/{token[:-1]}",
        "MAC too long": f"/l/{discuss.id}/u/{token}a",
        "another key": f"/l/{discuss.id}/u/"
                       + stranger.member_token(discuss.id, alice.id, alice.address),
        "no such list": f"/l/999999/u/{token}",
        "no such member": f"/l/{discuss.id}/u/999999-{mac}",
        "a list id too large for the store": f"/l/{'9' * 19}/u/{token}",
        "a member id too large for the store": f"/l/{discuss.id}/u/{'9' * 19}-{mac}",
        "no MAC": f"/l/{discuss.id}/u/{alice.id}",
        "not a token": f"/l/{discuss.id}/u/%3Cscript%3E",
        "newline after the token": f"/l/{discuss.id}/u/{token}%0A",
    }


def test_web_forged_links_are_404_and_change_nothing(site: Site) -> None:
    before = site.snapshot()
    bodies: set[bytes] = set()
    for case, path in _forged(site).items():
        answers = {
            "GET page": site.get(path),
            "GET per-post page": site.get(path.replace("/u/", "/r/")),
            "one-click": site.post(path, ONE_CLICK),
            "choice": site.post(path, b"choice=nomail"),
            "unsubscribe choice": site.post(path, b"choice=unsubscribe"),
        }
        for what, answer in answers.items():
            assert answer.status == 404, f"{case}: {what} answered {answer.status}"
            bodies.add(answer.body)
    # Whatever was wrong, the answer is the same: it does not say which part failed.
    assert len(bodies) == 2  # the page a browser gets, the text a one-click sender gets
    assert site.snapshot() == before
    assert site.journal() == []


def test_web_old_link_after_resubscribing_is_404(site: Site) -> None:
    old = site.page(site.alice)
    assert site.post(old, ONE_CLICK).status == 200
    with site.store.write() as conn:
        again = lists.add_member(conn, site.discuss, "alice@example.net", now=1.0,
                                 mode=Mode.DIGEST_MIME)
    assert again.id != site.alice.id
    before = site.snapshot()
    for answer in (site.get(old), site.post(old, ONE_CLICK), site.post(old, b"choice=nomail"),
                   site.post(old, b"choice=unsubscribe"), site.get(old.replace("/u/", "/r/"))):
        assert answer.status == 404
    assert site.snapshot() == before
    assert site.member(site.discuss, "alice@example.net") == again
    # The new subscription's own link works.
    assert site.get(site.page(again)).status == 200


def test_web_link_of_member_removed_elsewhere_is_404(site: Site) -> None:
    path = site.page(site.bob)
    with site.store.write() as conn:  # as `listgate members rm` does: no record of ours
        lists.remove_member(conn, site.discuss, "bob@example.net")
    assert site.post(path, ONE_CLICK).status == 404
    assert site.get(path).status == 404


# -- HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "member", "GET, POST"),
    ("DELETE", "member", "GET, POST"),
    ("PATCH", "member", "GET, POST"),
    ("OPTIONS", "member", "GET, POST"),
    ("HEAD", "member", "GET, POST"),
    ("POST", "regular", "GET"),
    ("POST", "/healthz", "GET"),
    ("DELETE", "/healthz", "GET"),
])
def test_web_other_methods_are_405(web: Site, method: str, path: str, allow: str) -> None:
    before = web.snapshot()
    pages = {"member": web.page(web.alice), "regular": web.page(web.alice, "r")}
    target = pages.get(path, path)
    answer = web.request(method, target, ONE_CLICK, {"Content-Type": FORM})
    assert answer.status == 405
    assert answer.headers["Allow"] == allow
    if method == "HEAD":
        assert answer.body == b""
    assert web.snapshot() == before


def test_web_unknown_method_is_501(web: Site) -> None:
    assert web.request("BREW", "/healthz").status == 501


@pytest.mark.parametrize("path", [
    "/", "/l", "/l/1", "/l/1/u", "/l/1/u/", "/l/x/u/1-abc", "/l/1/x/1-abc", "/l/1/u/1-a/extra",
    "/favicon.ico", "/metrics", "/healthz/", "/l/1/u/1-a/", "/l/1/u/" + "1-" + "a" * 300,
])
def test_web_unknown_paths_are_404(web: Site, path: str) -> None:
    for method in ("GET", "POST"):
        assert web.request(method, path, ONE_CLICK).status == 404, (method, path)


def test_web_body_of_64_kib_is_read(web: Site) -> None:
    body = ONE_CLICK + b"&pad="
    body += b"x" * (MAX_BODY - len(body))
    assert len(body) == MAX_BODY
    assert web.post(web.page(web.alice), body).status == 200
    assert web.member(web.discuss, "alice@example.net") is None


def _raw(site: Site, head: str, body: bytes = b"") -> str:
    """Send bytes as they are (no client to fix them up); the status line answered."""
    with socket.create_connection((site.host, site.port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + body)
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode("latin-1")


def test_web_body_over_64_kib_is_413(web: Site) -> None:
    before = web.snapshot()
    path = web.page(web.alice)
    # Declared too large: refused without reading (or waiting for) the body.
    status = _raw(web, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n"
                        f"Content-Length: {MAX_BODY + 1}\r\n\r\n", ONE_CLICK)
    assert status.startswith("HTTP/1.1 413 ")
    answer = web.post(path, ONE_CLICK + b"&pad=" + b"x" * MAX_BODY)
    assert answer.status == 413
    assert web.snapshot() == before


@pytest.mark.parametrize(("headers", "status"), [
    ("Transfer-Encoding: chunked\r\n", "411"),
    ("Content-Length: -1\r\n", "400"),
    ("Content-Length: 1e3\r\n", "400"),
    ("Content-Length: 50\r\n", "400"),  # more promised than sent: the client gives up
])
def test_web_bad_framing_is_refused(web: Site, headers: str, status: str) -> None:
    before = web.snapshot()
    with socket.create_connection((web.host, web.port), timeout=10) as sock:
        sock.sendall(f"POST {web.page(web.alice)} HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: {FORM}\r\n{headers}\r\n".encode() + ONE_CLICK)
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").read()
    assert reply.split(b" ", 2)[1].decode() == status
    assert web.snapshot() == before


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "multipart/form-data",
                                          "multipart/mixed; boundary=x"])
def test_web_other_body_types_are_refused(web: Site, content_type: str) -> None:
    before = web.snapshot()
    answer = web.post(web.page(web.alice), ONE_CLICK, content_type)
    assert answer.status in (400, 415)
    assert web.snapshot() == before


def test_web_connection_is_kept_alive(web: Site) -> None:
    conn = http.client.HTTPConnection(web.host, web.port, timeout=10)
    try:
        for method, body in (("GET", None), ("POST", b"choice=nomail"), ("GET", None)):
            conn.request(method, web.page(web.bob), body=body,
                         headers={"Content-Type": FORM} if body else {})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert resp.getheader("Connection") is None
    finally:
        conn.close()
    member = web.member(web.discuss, "bob@example.net")
    assert member is not None and member.mode is Mode.NOMAIL


# -- what pages show ------------------------------------------------------------------


def test_web_page_escapes_what_members_wrote(web: Site) -> None:
    page = web.get(web.page(web.alice))
    assert page.status == 200
    assert "<script" not in page.text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; Co" in page.text
    assert "alice@example.net" in page.text


def test_web_page_has_no_script_and_no_remote_resource(web: Site) -> None:
    for path in (web.page(web.alice), web.page(web.alice, "r"), "/nowhere"):
        text = web.get(path).text.lower()
        assert "<script" not in text
        for needle in ("src=", "http:", "https:", "<link", "@import", "url("):
            assert needle not in text, (path, needle)


def test_web_security_headers(web: Site) -> None:
    answers = [web.get(web.page(web.alice)), web.get("/nowhere"), web.get("/healthz"),
               web.request("PUT", "/healthz"), web.post(web.page(web.bob), b"choice=nomail"),
               web.post(web.page(web.alice), ONE_CLICK)]
    for answer in answers:
        csp = [d.strip() for d in answer.headers["Content-Security-Policy"].split(";")]
        assert {"default-src 'none'", "style-src 'unsafe-inline'", "form-action 'self'"} \
            <= set(csp)
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Server"] == "Listgate"


def test_web_tokens_stay_out_of_the_log(web: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mac = web.token(web.alice).split("-", 1)[1]
    web.get(web.page(web.alice))
    web.get(web.page(web.alice) + "x")
    web.request("PUT", web.page(web.alice))
    web.post(web.page(web.alice), ONE_CLICK)
    assert caplog.records
    assert all(mac[:8] not in r.getMessage() for r in caplog.records)


# -- health, metrics, where it is mounted -------------------------------------------------


def test_web_healthz(site: Site) -> None:
    answer = site.get("/healthz")
    assert (answer.status, answer.body) == (200, b"ok\n")


def test_web_healthz_without_a_store_is_503() -> None:
    # Nothing listens on port 1: every connection is refused at once.
    store = Store("postgresql+psycopg://nobody@127.0.0.1:1/none", clock=ManualClock())
    server = WebServer(store, signer=LinkSigner(KEY), templates=Templates(REPO / "templates"),
                       clock=ManualClock(), base_url="")
    host, port = server.start("127.0.0.1", 0)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (503, b"store unavailable\n")
        conn.request("GET", "/l/1/u/1-" + "a" * 32)
        resp = conn.getresponse()
        assert resp.status == 503
        assert b"try again" in resp.read()
        conn.close()
    finally:
        server.stop()
        store.dispose()


def test_web_metrics(sqlite_store: Store) -> None:
    text = b"# TYPE listgate_up gauge\nlistgate_up 1\n"
    for site in _site(sqlite_store, metrics=text):
        answer = site.get("/metrics")
        assert (answer.status, answer.body) == (200, text)
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_web_serves_under_base_url_path(sqlite_store: Store) -> None:
    for site in _site(sqlite_store, base_url="https://lists.example.org/listgate/"):
        assert site.get("/listgate/healthz").status == 200
        assert site.get("/healthz").status == 200
        assert site.get("/listgate" + site.page(site.bob)).status == 200
        assert site.get("/other" + site.page(site.bob)).status == 404
        answer = site.post("/listgate" + site.page(site.bob), b"choice=digest-mime")
        assert answer.status == 200
        member = site.member(site.discuss, "bob@example.net")
        assert member is not None and member.mode is Mode.DIGEST_MIME


def test_web_stop_frees_the_port(sqlite_store: Store) -> None:
    server = WebServer(sqlite_store, signer=LinkSigner(KEY),
                       templates=Templates(REPO / "templates"), clock=ManualClock(), base_url="")
    host, port = server.start("127.0.0.1", 0)
    with pytest.raises(RuntimeError):
        server.start("127.0.0.1", 0)
    server.stop()
    server.stop()  # a second stop is harmless
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=2).close()
    assert server.start(host, port) == (host, port)  # the port can be bound again
    server.stop()


# -- form bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "body", "fields"), [
    (None, b"List-Unsubscribe=One-Click", {"List-Unsubscribe": "One-Click"}),
    (FORM, b"choice=digest-html&choice=nomail", {"choice": "digest-html"}),
    (FORM, b"List-Unsubscribe=One-Click\r\n", {"List-Unsubscribe": "One-Click"}),
    (FORM, b"a=%C3%A9+b&c", {"a": "\u00e9 b", "c": ""}),
    ("multipart/form-data; boundary=XyZ",
     b"--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
     b"One-Click\r\n--XyZ--\r\n", {"List-Unsubscribe": "One-Click"}),
], ids=["no-type", "first-value", "trailing-newline", "percent-encoded", "multipart"])
def test_web_parse_form(content_type: str | None, body: bytes, fields: dict[str, str]) -> None:
    assert parse_form(content_type, body) == fields


@pytest.mark.parametrize(("content_type", "body", "status"), [
    (FORM, "choice=\u00e9".encode(), 400),
    (FORM, b"&".join(b"f%d=1" % i for i in range(100)), 400),
    ("multipart/form-data", b"", 400),
    ("multipart/form-data; boundary=a\r\nX: y", b"", 400),
    ("application/json", b"{}", 415),
])
def test_web_parse_form_refuses(content_type: str, body: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_form(content_type, body)
    assert caught.value.status == status
