"""The small HTTP endpoint: one-click unsubscribe (RFC 8058), members' preference pages, health.

Routes (everything else is 404; methods a route does not take are 405):

    GET  /l/{list}/u/{token}   the member's page: unsubscribe, digest, per-post, no mail
    POST /l/{list}/u/{token}   ``List-Unsubscribe=One-Click`` (RFC 8058), or the page's
                               ``choice=unsubscribe|regular|digest-mime|digest-plain|
                               digest-html|nomail``
    GET  /l/{list}/r/{token}   one button: switch to per-post delivery
    GET  /healthz              "ok" when the store answers
    GET  /metrics              Prometheus text, when the daemon gives a source

The token is the capability (gateway/signing.py): it names one member of one list,
so a GET never changes anything (link scanners and prefetchers follow links), and a
token that does not check out is a plain 404 that does not say what was wrong.
Standard library only (http.server, one thread per connection): the traffic is a
click now and then, and a TLS reverse proxy is expected in front (RFC 8058 wants https).
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import logging
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway import journal, lists
from gateway.clock import Clock
from gateway.errors import NotFound, StoreError, StoreUnavailable
from gateway.lists import MailingList, Member
from gateway.routing import Stage
from gateway.schema import Mode
from gateway.schema import journal as journal_table
from gateway.signing import LinkSigner
from gateway.store import Store
from gateway.templates import Templates

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
# A connection that sends nothing for this long is closed (a thread each: do not keep idlers).
IDLE_TIMEOUT = 30.0
# Before closing on a body left unread, what is still read and dropped (see _linger).
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0
STOP_POLL = 0.1  # how soon the serving thread notices stop()

UNSUBSCRIBE = "unsubscribe"
CHOICES = (UNSUBSCRIBE, *(m.value for m in Mode))
BY_LINK = "by one-click link"
BY_PAGE = "by preferences page"

MODE_LABELS = {
    Mode.REGULAR: "each post as it is sent",
    Mode.DIGEST_MIME: "a digest with the posts attached as they were sent (MIME)",
    Mode.DIGEST_PLAIN: "a digest as one plain-text message",
    Mode.DIGEST_HTML: "a digest as one formatted page with a table of contents (HTML)",
    Mode.NOMAIL: "no mail for now (you stay subscribed)",
}
_LABELS = {mode.value: label for mode, label in MODE_LABELS.items()}  # as templates see them

# Sent with every answer. The pages need no script, image, font or frame; forms post
# only back here; the token in the address bar must not leak through a Referer.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
)

HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

_MEMBER_PATH = re.compile(r"/l/([0-9]{1,19})/([ur])/([^/]{1,200})")
# How an unsubscription made here is written in the journal; read back (only for
# the member id in a token) to answer a repeated one-click POST with 200, not 404.
_DEPARTURE = re.compile(r"member ([0-9]+) <([^<>\s]+)> unsubscribed ")
_FORM_FIELDS = 20
_MAX_ID = 2**63 - 1  # the largest id the store has room for (SQLite and PostgreSQL)


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = HTML
    allow: str = ""  # the Allow field of a 405


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    form: dict[str, str]  # a POST's fields (first value of each); empty for GET


@dataclass(frozen=True)
class Subscription:
    """Whom a verified token names: a member, or (``member`` None) an address that left
    the list by one of these links and has not come back."""

    mailing_list: MailingList
    address: str
    member: Member | None


class BadRequest(Exception):
    """The request cannot be answered as sent; carries the status to answer with."""

    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class WebServer:
    """The endpoint: start() serves in a thread until stop()."""

    def __init__(self, store: Store, *, signer: LinkSigner, templates: Templates,
                 clock: Clock, base_url: str, metrics: Callable[[], bytes] | None = None) -> None:
        self.store = store
        self.signer = signer
        self.templates = templates
        self.clock = clock
        self.metrics = metrics
        # Members' links are {base_url}/l/...; a reverse proxy may pass the path on with
        # base_url's own path in front or without it, so both are served.
        self.prefix = urllib.parse.urlsplit(base_url).path.rstrip("/")
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0: any free port) and serve; returns the bound address."""
        if self._server is not None:
            raise RuntimeError("the web endpoint is already started")
        cls = _HTTPServer6 if ":" in host else _HTTPServer
        server = cls((host, port), functools.partial(_Handler, app=self))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(STOP_POLL,),
                                        name="web", daemon=True)
        self._thread.start()
        bound_host, bound_port = server.server_address[:2]
        log.info("web endpoint listening on %s port %s", bound_host, bound_port)
        return str(bound_host), int(bound_port)

    def stop(self) -> None:
        """Stop accepting; connections in progress end with their threads (daemons)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    # -- routing ------------------------------------------------------------------

    def route(self, path: str) -> tuple[frozenset[str], Callable[[Request], Response]] | None:
        """The methods a path takes and what answers it; None: no such page."""
        if self.prefix and path.startswith(self.prefix + "/"):
            path = path[len(self.prefix):]
        if path == "/healthz":
            return frozenset({"GET"}), self._healthz
        if path == "/metrics" and self.metrics is not None:
            return frozenset({"GET"}), self._metrics
        m = _MEMBER_PATH.fullmatch(path)
        if m is None:
            return None
        list_id, kind, token = int(m.group(1)), m.group(2), m.group(3)
        if kind == "r":
            return frozenset({"GET"}), functools.partial(self._regular_page, list_id, token)
        return frozenset({"GET", "POST"}), functools.partial(self._member, list_id, token)

    # -- pages --------------------------------------------------------------------

    def _healthz(self, request: Request) -> Response:
        try:
            with self.store.read() as conn:
                conn.execute(sa.select(1)).scalar_one()
        except StoreError as exc:
            log.warning("health check: the store does not answer: %s", exc)
            return Response(HTTPStatus.SERVICE_UNAVAILABLE, b"store unavailable\n", TEXT)
        return Response(HTTPStatus.OK, b"ok\n", TEXT)

    def _metrics(self, request: Request) -> Response:
        assert self.metrics is not None
        return Response(HTTPStatus.OK, self.metrics(), PROMETHEUS)

    def _regular_page(self, list_id: int, token: str, request: Request) -> Response:
        with self.store.read() as conn:
            found = self._lookup(conn, list_id, token)
        if found is None:
            return self.error(HTTPStatus.NOT_FOUND)
        if found.member is None:
            return self._page(HTTPStatus.OK, "web/gone.html.j2", found, token)
        return self._page(HTTPStatus.OK, "web/regular.html.j2", found, token)

    def _member(self, list_id: int, token: str, request: Request) -> Response:
        if request.method == "GET":
            with self.store.read() as conn:
                found = self._lookup(conn, list_id, token)
            if found is None:
                return self.error(HTTPStatus.NOT_FOUND)
            name = "web/preferences.html.j2" if found.member else "web/gone.html.j2"
            return self._page(HTTPStatus.OK, name, found, token)
        if request.form.get("List-Unsubscribe") == "One-Click":
            return self._one_click(list_id, token)
        choice = request.form.get("choice", "")
        if choice not in CHOICES:
            return self.error(HTTPStatus.BAD_REQUEST,
                              "The form did not say what to change. Go back and choose one.")
        return self._choose(list_id, token, choice)

    def _one_click(self, list_id: int, token: str) -> Response:
        with self.store.write() as conn:
            found = self._lookup(conn, list_id, token)
            if found is not None and found.member is not None:
                self._unsubscribe(conn, found, BY_LINK)
        if found is None:
            return Response(HTTPStatus.NOT_FOUND, b"Not found.\n", TEXT)
        lst = found.mailing_list
        # A repeat (a retry, a second click) gets the same 200: RFC 8058 senders must
        # not be invited to try again.
        text = f"{found.address} is unsubscribed from {lst.display_name} <{lst.address}>.\n"
        return Response(HTTPStatus.OK, text.encode(), TEXT)

    def _choose(self, list_id: int, token: str, choice: str) -> Response:
        before: Mode | None = None
        after = None if choice == UNSUBSCRIBE else Mode(choice)
        with self.store.write() as conn:
            found = self._lookup(conn, list_id, token)
            if found is not None and found.member is not None:
                before = found.member.mode
                if after is None:
                    self._unsubscribe(conn, found, BY_PAGE)
                elif after != before and not self._set_mode(conn, found, after):
                    found = Subscription(found.mailing_list, found.address, None)
        if found is None:
            return self.error(HTTPStatus.NOT_FOUND)
        if found.member is None and after is not None:
            return self._page(HTTPStatus.GONE, "web/gone.html.j2", found, token)
        return self._page(HTTPStatus.OK, "web/changed.html.j2", found, token,
                          before=before.value if before else None,
                          after=after.value if after else None,
                          changed=before != after)

    def error(self, status: HTTPStatus, explain: str = "") -> Response:
        body = self.templates.render("web/error.html.j2", status=int(status),
                                     title=status.phrase,
                                     explain=explain or _EXPLAIN.get(status, ""))
        return Response(status, body.encode("utf-8"))

    def _page(self, status: HTTPStatus, name: str, found: Subscription, token: str,
              **extra: object) -> Response:
        lst = found.mailing_list
        body = self.templates.render(
            name, list_address=lst.address, mailing_list=lst, member=found.member,
            address=found.address, join_address=lst.identity.address("join"),
            # Relative, so that the forms work whatever path a proxy puts in front.
            preferences_url=f"../u/{token}", modes=list(_LABELS.items()), labels=_LABELS,
            **extra)
        return Response(status, body.encode("utf-8"))

    # -- the store ----------------------------------------------------------------

    def _lookup(self, conn: Connection, list_id: int, token: str) -> Subscription | None:
        """Whom the token names on this list, or None if it names nobody."""
        member_id = self.signer.member_id(token)
        if member_id is None or member_id > _MAX_ID or list_id > _MAX_ID:
            return None
        lst = lists.by_id(conn, list_id)
        if lst is None:
            return None
        # Member ids are no secret (the token starts with one); the MAC is, and verify()
        # compares it in constant time.
        member = lists.member_by_id(conn, member_id)
        if member is not None:
            if member.list_id != list_id or not self.signer.verify(
                    token, list_id=list_id, member_id=member_id, address=member.address):
                return None
            return Subscription(lst, member.address, member)
        address = _departed(conn, list_id, member_id)
        if address is None or not self.signer.verify(token, list_id=list_id,
                                                     member_id=member_id, address=address):
            return None
        # Subscribed again (a new member id): the old link names a membership that is over.
        if lists.find_member(conn, list_id, [address]) is not None:
            return None
        return Subscription(lst, address, None)

    def _unsubscribe(self, conn: Connection, found: Subscription, how: str) -> None:
        assert found.member is not None
        member, lst = found.member, found.mailing_list
        try:
            lists.remove_member(conn, lst, member.address)
        except NotFound:  # a click at the same moment took it away (PostgreSQL): done
            return
        journal.record(conn, now=self.clock.now(), stage=Stage.COMMANDS, event="unsubscribed",
                       message_id=None, list_id=lst.id,
                       detail=f"member {member.id} <{member.address}> unsubscribed {how}")

    def _set_mode(self, conn: Connection, found: Subscription, mode: Mode) -> bool:
        """Change the member's delivery; False if they left in the meantime."""
        assert found.member is not None
        member, lst = found.member, found.mailing_list
        try:
            lists.set_mode(conn, lst, member.address, mode)
        except NotFound:
            return False
        journal.record(conn, now=self.clock.now(), stage=Stage.COMMANDS, event="mode-changed",
                       message_id=None, list_id=lst.id,
                       detail=f"member {member.id} <{member.address}> changed delivery from "
                              f"{member.mode.value} to {mode.value} {BY_PAGE}")
        return True


def _departed(conn: Connection, list_id: int, member_id: int) -> str | None:
    """The address of the member that left ``list_id`` by a link of this endpoint, or None."""
    detail = conn.execute(
        sa.select(journal_table.c.detail).where(
            journal_table.c.list_id == list_id,
            journal_table.c.event == "unsubscribed",
            journal_table.c.stage == Stage.COMMANDS.value,
            journal_table.c.detail.like(f"member {member_id} <%"))
        .order_by(journal_table.c.id.desc()).limit(1)).scalar()
    m = _DEPARTURE.match(detail or "")
    return m.group(2) if m and int(m.group(1)) == member_id else None


_EXPLAIN = {
    HTTPStatus.NOT_FOUND: "There is no page here. If you followed a link from a list's mail, "
                          "the link may be incomplete (some mail programs cut long links), "
                          "or it belongs to a subscription that has ended.",
    HTTPStatus.METHOD_NOT_ALLOWED: "This page cannot be used that way.",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "What was sent is too large.",
    HTTPStatus.SERVICE_UNAVAILABLE: "The list server is busy. Please try again in a minute.",
    HTTPStatus.INTERNAL_SERVER_ERROR: "Something went wrong on the list server; "
                                      "it has been logged. Please try again later.",
}


def parse_form(content_type: str | None, body: bytes) -> dict[str, str]:
    """The fields of a POST body, first value of each: URL-encoded or multipart/form-data
    (what RFC 8058 section 3.1 allows, and what browsers send). No type: URL-encoded."""
    ctype = (content_type or "application/x-www-form-urlencoded").strip()
    media = ctype.split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True,
                                           max_num_fields=_FORM_FIELDS, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "not a URL-encoded form") from None
    elif media == "multipart/form-data":
        pairs = _multipart(ctype, body)
    else:
        raise BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                         "send application/x-www-form-urlencoded or multipart/form-data")
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value.strip())
    return fields


def _multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    if any(c in content_type for c in "\r\n") or "boundary=" not in content_type.lower():
        raise BadRequest(HTTPStatus.BAD_REQUEST, "a multipart form needs a boundary")
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise BadRequest(HTTPStatus.BAD_REQUEST, "not a multipart form")
    pairs: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        pairs.append((name, payload.decode("utf-8", "replace")))
        if len(pairs) > _FORM_FIELDS:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "too many form fields")
    return pairs


# -- HTTP ---------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look up the host's name in the DNS; nothing needs it.
        super(ThreadingHTTPServer, self).server_bind()
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = "Listgate"
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    _unread_body = False

    def __init__(self, request: Any, client_address: Any, server: Any, *,
                 app: WebServer) -> None:
        self.app = app
        super().__init__(request, client_address, server)

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _not_allowed(self) -> None:
        self._serve()

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _serve(self) -> None:
        try:
            response = self._answer()
        except BadRequest as exc:
            self.close_connection = True
            response = self.app.error(exc.status, exc.why)
        except StoreUnavailable as exc:
            log.warning("web: %s %s: the store is unavailable: %s", self.command,
                        _redact(self.path), exc)
            response = self.app.error(HTTPStatus.SERVICE_UNAVAILABLE)
        except Exception:  # a process boundary: the client gets a 500, the log the traceback
            log.exception("web: %s %s failed", self.command, _redact(self.path))
            self.close_connection = True
            response = self.app.error(HTTPStatus.INTERNAL_SERVER_ERROR)
        self._send(response)
        if self.close_connection and self._unread_body:
            self._linger()

    def _answer(self) -> Response:
        path = urllib.parse.urlsplit(self.path).path
        routed = self.app.route(path)
        has_body = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        self._unread_body = has_body
        if routed is None:
            # A body, if any, is left unread: the connection cannot be reused after it.
            self.close_connection = self.close_connection or has_body
            return self.app.error(HTTPStatus.NOT_FOUND)
        methods, answer = routed
        if self.command not in methods:
            self.close_connection = self.close_connection or has_body
            page = self.app.error(HTTPStatus.METHOD_NOT_ALLOWED)
            return Response(page.status, page.body, page.content_type,
                            allow=", ".join(sorted(methods)))
        form: dict[str, str] = {}
        if self.command == "POST":
            form = parse_form(self.headers.get("Content-Type"), self._read_body())
        elif has_body:
            self.close_connection = True
        return answer(Request(self.command, path, form))

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise BadRequest(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        raw = self.headers.get("Content-Length", "0").strip()
        if not raw.isdigit():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "a Content-Length that is not a number")
        length = int(raw)
        if length > MAX_BODY:
            raise BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"a form here is at most {MAX_BODY // 1024} KiB")
        body = self.rfile.read(length)
        if len(body) != length:
            raise BadRequest(HTTPStatus.BAD_REQUEST, "the body ended early")
        self._unread_body = False
        return body

    def _linger(self) -> None:
        """Read and drop what the client still sends, for a moment, before the close:
        closing a socket with data unread resets the connection, and the reset can
        destroy our answer before the client has read it (as nginx's lingering_close)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            left = LINGER_BYTES
            while left > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:  # the client is gone, or went quiet: either way, close
            return

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in SECURITY_HEADERS:
            self.send_header(name, value)
        if response.allow:
            self.send_header("Allow", response.allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # http.server's own answers to malformed requests (400, 414, 431, 501), in our
        # page and with our headers.
        self.close_connection = True
        self._send(self.app.error(HTTPStatus(code), explain or ""))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s %s", self.command, _redact(self.path), code)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("web: %s", _redact(format % args))


def _redact(path: str) -> str:
    """A path fit for the log: a member token is a capability, so only its id is kept."""
    return re.sub(r"/([ur])/([0-9]{1,19})-[^/?]*", r"/\1/\2-…", path or "-")
