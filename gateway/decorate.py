"""Decoration on the way out: trace and list headers, subject prefix, footer.

The stored raw bytes are never changed; this builds the copy members get.
Work is done on bytes: what decoration does not touch goes out as it came in.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import logging
import quopri
import re
from dataclasses import dataclass

from gateway import dmarc
from gateway import headers as h
from gateway.identity import ListIdentity
from gateway.message import CRLF, Parts, content_type, decode_header, normalise_eol, split
from gateway.signing import PLACEHOLDER, defang

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trace:
    """Where a message came from, for its Received field (RFC 5321 4.4)."""

    helo: str
    peer: str
    hostname: str
    protocol: str
    queue_id: int
    recipient: str
    received_at: float


def list_fields(lst: ListIdentity, links_base: str | None = None) -> list[tuple[str, str]]:
    """RFC 2919 and RFC 2369 fields for a list's mail; with per-member links, the
    RFC 8058 one-click unsubscribe (its URL carries the member placeholder)."""
    unsubscribe = f"<mailto:{lst.address('leave')}>"
    if links_base:
        unsubscribe = f"<{links_base}/u/{PLACEHOLDER}>, {unsubscribe}"
    fields = [
        (h.LIST_ID, f"{_phrase(lst.display_name)} <{lst.list_id}>"),
        (h.LIST_POST, f"<mailto:{lst.post_address}>"),
        (h.LIST_HELP, f"<mailto:{lst.address('request')}?subject=help>"),
        (h.LIST_SUBSCRIBE, f"<mailto:{lst.address('join')}>"),
        (h.LIST_UNSUBSCRIBE, unsubscribe),
        (h.LIST_OWNER, f"<mailto:{lst.address('owner')}>"),
    ]
    if links_base:
        fields.append((h.LIST_UNSUBSCRIBE_POST, "List-Unsubscribe=One-Click"))
    if lst.archive_url:
        fields.append((h.LIST_ARCHIVE, f"<{lst.archive_url}>"))
    return fields


def _phrase(text: str) -> str:
    """A display name as an RFC 5322 quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def received_field(trace: Trace) -> str:
    with_ = {"smtp": "ESMTP", "lmtp": "LMTP"}.get(trace.protocol, trace.protocol.upper())
    helo = re.sub(r"[^\x21-\x7e]", "", trace.helo)[:100] or "unknown"
    return (f"from {helo} ({trace.peer}) by {trace.hostname} (Listgate) with {with_} "
            f"id {trace.queue_id} for <{trace.recipient}>; "
            f"{email.utils.formatdate(trace.received_at)}")


def prefixed_subject(subject: str, prefix: str) -> str:
    """The subject with the list's prefix once, at the front: "[p] Re: topic"."""
    if not prefix:
        return subject or "(no subject)"
    stripped = subject.replace(prefix.strip(), "")
    stripped = re.sub(r"\s+", " ", stripped).strip()
    # "Re: [p] Re: x" becomes "[p] Re: x": a run of reply markers becomes one;
    # a forward marker stays where it is ("Re: Fwd: x").
    stripped = re.sub(r"^(re)\s*:\s*(?:re\s*:\s*)*", r"\1: ", stripped,
                      flags=re.IGNORECASE).strip()
    return f"{prefix.strip()} {stripped or '(no subject)'}"


def message_id_for(raw: bytes, domain: str) -> str:
    """A Message-ID for a post that came without one, stable for the same bytes."""
    return f"<listgate.{hashlib.sha256(raw).hexdigest()[:24]}@{domain}>"


def decorate_post(raw: bytes, lst: ListIdentity, *, footer: str, trace: Trace,
                  links_base: str | None = None, rewrite_from: bool = False) -> bytes:
    """The copy of a post that regular members receive. With ``links_base``, it carries
    the member placeholder in its links, for delivery to make each member's copy. With
    ``rewrite_from``, the From is the list's (DMARC mitigation, RFC 7960)."""
    parts = split(defang(raw))
    if rewrite_from:
        dmarc.rewrite_from(parts, lst)
    parts.remove(*h.LIST_FIELDS)
    parts.remove(h.X_LOOP)
    parts.prepend(h.RECEIVED, received_field(trace))
    parts.replace(h.SUBJECT, prefixed_subject(decode_header(parts.get(h.SUBJECT)),
                                              lst.subject_prefix))
    if parts.get(h.MESSAGE_ID) is None:
        parts.add(h.MESSAGE_ID, message_id_for(raw, lst.domain))
    if parts.get(h.DATE) is None:
        parts.add(h.DATE, email.utils.formatdate(trace.received_at))
    for name, value in list_fields(lst, links_base):
        parts.add(name, value)
    parts.add(h.PRECEDENCE, "list")
    parts.add(h.X_LOOP, lst.post_address)
    if footer.strip():
        add_footer(parts, footer)
    return parts.to_bytes()


# -- footers ----------------------------------------------------------------

_CONTENT_FIELDS = ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
                   "Content-Description", "Content-ID", "Content-Language", "Content-Location",
                   "Content-MD5", "Content-Base")


def add_footer(parts: Parts, footer: str) -> None:
    """Append ``footer`` in the way that disturbs the message least.

    A plain-text body gets it appended in its own charset and encoding; a
    multipart/mixed gets one more text part; anything else is wrapped with the
    footer into a new multipart/mixed. A body we cannot safely change is left
    alone (logged): a post without footer beats a post mangled.
    """
    ctype = content_type(parts.get(h.CONTENT_TYPE))
    if ctype.type == "text/plain" and _append_to_text(parts, footer):
        return
    if ctype.type == "multipart/mixed":
        if _add_mixed_part(parts, ctype.params.get("boundary"), footer):
            return
        log.warning("footer not added: multipart/mixed without a usable closing boundary")
        return
    _wrap(parts, footer)


def _append_to_text(parts: Parts, footer: str) -> bool:
    cte = (parts.get(h.CONTENT_TRANSFER_ENCODING) or "7bit").strip().lower()
    ctype = content_type(parts.get(h.CONTENT_TYPE))
    charset = ctype.params.get("charset", "us-ascii").strip().lower() or "us-ascii"
    try:
        payload = _decode_body(parts.body, cte)
        text = payload.decode(charset)
    except (ValueError, LookupError, binascii.Error):
        return False
    if not text.endswith("\n"):
        text += "\n"
    text += footer if footer.endswith("\n") else footer + "\n"
    try:
        data = text.encode(charset)
    except UnicodeEncodeError:
        charset = "utf-8"
        data = text.encode(charset)
    if cte in ("7bit", "8bit", "binary") and not data.isascii():
        cte = "8bit" if cte != "binary" else cte
    parts.body = _encode_body(data, cte)
    if charset != ctype.params.get("charset", "us-ascii").strip().lower():
        parts.replace(h.CONTENT_TYPE, f'text/plain; charset="{charset}"' + _other_params(ctype))
        parts.replace(h.MIME_VERSION, "1.0")
    if cte != (parts.get(h.CONTENT_TRANSFER_ENCODING) or "7bit").strip().lower():
        parts.replace(h.CONTENT_TRANSFER_ENCODING, cte)
    return True


def _other_params(ctype: object) -> str:
    params = getattr(ctype, "params", {})
    return "".join(f'; {k}="{v}"' for k, v in params.items() if k != "charset")


def _decode_body(body: bytes, cte: str) -> bytes:
    if cte in ("7bit", "8bit", "binary"):
        return body
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    if cte == "base64":
        return base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
    raise ValueError(f"unknown transfer encoding {cte!r}")


def _encode_body(data: bytes, cte: str) -> bytes:
    if cte == "quoted-printable":
        return quopri.encodestring(data)
    if cte == "base64":
        encoded = base64.b64encode(data)
        return CRLF.join(encoded[i:i + 76] for i in range(0, len(encoded), 76)) + CRLF
    return data


def _footer_part(footer: str) -> bytes:
    data = footer if footer.endswith("\n") else footer + "\n"
    if data.isascii():
        head = 'Content-Type: text/plain; charset="us-ascii"\r\nContent-Transfer-Encoding: 7bit'
        body = data.encode("ascii")
    else:
        head = ('Content-Type: text/plain; charset="utf-8"\r\n'
                "Content-Transfer-Encoding: quoted-printable")
        body = normalise_eol(quopri.encodestring(data.encode("utf-8")))
    return (head + "\r\nContent-Disposition: inline\r\n\r\n").encode("ascii") + body


def _add_mixed_part(parts: Parts, boundary: str | None, footer: str) -> bool:
    if not boundary:
        return False
    close = re.compile(rb"(^|\r?\n)--" + re.escape(boundary.encode("ascii", "replace"))
                       + rb"--[ \t]*(\r?\n|$)")
    matches = list(close.finditer(parts.body))
    if not matches:
        return False
    last = matches[-1]
    at = last.start() + len(last.group(1))
    delimiter = b"--" + boundary.encode("ascii", "replace")
    parts.body = (parts.body[:at] + delimiter + CRLF + _footer_part(footer) + CRLF
                  + parts.body[at:])
    return True


def _wrap(parts: Parts, footer: str) -> None:
    inner = parts.remove(*_CONTENT_FIELDS)
    parts.remove(h.MIME_VERSION)
    boundary = "=_listgate_" + hashlib.sha256(parts.body).hexdigest()[:24]
    inner_head = CRLF.join(f.raw for f in inner)
    body = parts.body if parts.body.endswith(b"\n") else parts.body + CRLF
    parts.body = (
        b"This is a multi-part message in MIME format.\r\n"
        + b"--" + boundary.encode() + CRLF + inner_head + CRLF + CRLF + body
        + b"--" + boundary.encode() + CRLF + _footer_part(footer) + CRLF
        + b"--" + boundary.encode() + b"--" + CRLF
    )
    parts.add(h.MIME_VERSION, "1.0")
    parts.add(h.CONTENT_TYPE, f'multipart/mixed; boundary="{boundary}"')
