"""Notices the gateway writes itself: rejections, confirmations, moderator requests.

Notices come from the list's -owner address with a null-safe envelope sender
(the list's -bounces address), carry ``Auto-Submitted: auto-replied`` (RFC 3834)
and thread under the message they answer.
"""

from __future__ import annotations

import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass, field
from email.message import EmailMessage

from sqlalchemy.engine import Connection

from gateway import headers as h
from gateway import outgoing
from gateway.identity import ListIdentity


@dataclass(frozen=True)
class Notice:
    to: str
    subject: str
    text: str
    in_reply_to: str | None = None
    reply_to: str | None = None
    attachments: tuple[bytes, ...] = field(default=())
    html: str | None = None


def reply_subject(subject: str | None, default: str) -> str:
    """The subject of a notice answering a message: "Re: " and its subject, or
    ``default`` when it had none; one "Re: " however many the answered one had
    (RFC 5322 3.6.5)."""
    topic = _REPLY_MARKERS.sub("", subject or "").strip() or default
    return f"Re: {topic}"


_REPLY_MARKERS = re.compile(r"^(?:\s*re\s*:\s*)+", re.IGNORECASE)


def _one_line(text: str) -> str:
    """Header text as one line. A subject quoted from a sender may hold CR or LF (an
    encoded word can carry them): as words they are harmless, as line breaks they could
    start a field of the sender's choosing, and the stdlib refuses them outright. An
    encoded word left undecoded next to 8-bit text ("=?gb2312?B?...?= 种") makes the
    stdlib's folder fail too: its "=?" is broken up so it reads as the text it is."""
    text = _LINE_BREAKS.sub(" ", text)
    return text if text.isascii() else text.replace("=?", "= ?")


_LINE_BREAKS = re.compile(r"[\r\n]+")


# A Message-ID worth quoting in In-Reply-To: printable ASCII in angle brackets (a
# sender's 8-bit or multi-line one cannot be written in a 7-bit header, nor trusted).
_MSG_ID = re.compile(r"<[\x21-\x3d\x3f-\x7e]{1,900}>")


def compose(notice: Notice, lst: ListIdentity, *, now: float,
            auto_submitted: str = "auto-replied") -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg[h.FROM] = email.utils.formataddr((f"{lst.display_name} list", lst.address("owner")))
    msg[h.TO] = notice.to
    msg[h.SUBJECT] = _one_line(notice.subject)
    msg[h.DATE] = email.utils.formatdate(now)
    seed = f"{notice.to}\0{notice.subject}\0{notice.text}\0{now}".encode("utf-8", "replace")
    msg[h.MESSAGE_ID] = f"<listgate.notice.{hashlib.sha256(seed).hexdigest()[:24]}@{lst.domain}>"
    if notice.in_reply_to and _MSG_ID.fullmatch(notice.in_reply_to):
        msg[h.IN_REPLY_TO] = notice.in_reply_to
        msg[h.REFERENCES] = notice.in_reply_to
    if notice.reply_to:
        msg[h.REPLY_TO] = notice.reply_to
    msg[h.AUTO_SUBMITTED] = auto_submitted
    msg[h.LIST_ID] = f'"{lst.display_name}" <{lst.list_id}>'
    msg[h.X_LOOP] = lst.post_address
    msg.set_content(notice.text, charset="utf-8")
    if notice.html is not None:
        msg.add_alternative(notice.html, subtype="html", charset="utf-8")
    for original in notice.attachments:
        _attach_original(msg, original)
    return msg.as_bytes()


def _attach_original(msg: EmailMessage, original: bytes) -> None:
    """Attach a message exactly as received. Bytes are kept as they are: the
    stdlib would re-serialise (and may choke on) a malformed original."""
    if msg.get_content_maintype() != "multipart":
        msg.make_mixed()
    part = EmailMessage(policy=email.policy.SMTP)
    part["Content-Type"] = "message/rfc822"
    part["Content-Disposition"] = "inline"
    eight_bit = not original.isascii()
    part["Content-Transfer-Encoding"] = "8bit" if eight_bit else "7bit"
    part.set_payload(original.decode("ascii", "surrogateescape"))
    msg.attach(part)


def queue(conn: Connection, notice: Notice, lst: ListIdentity, *, list_id: int,
          message_id: int | None, now: float, recipients: list[str] | None = None) -> None:
    """Compose a notice and put it on the outbound queue (from the list's -bounces address,
    so that a bounce of a notice never reaches a person)."""
    outgoing.send(conn, compose(notice, lst, now=now), envelope_from=lst.address("bounces"),
                  recipients=recipients or [notice.to], kind=outgoing.Kind.NOTICE,
                  list_id=list_id, message_id=message_id, now=now)
