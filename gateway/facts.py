"""What the rules may know about a post, gathered before they run.

Rules are pure: they see only these frozen values, never the store or the clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway import addresses
from gateway import headers as h
from gateway.lists import Member
from gateway.message import Parts, content_type, decode_header, split


@dataclass(frozen=True)
class MessageFacts:
    """Header facts of a message, read tolerantly from its raw bytes."""

    message_id: str | None
    subject: str
    from_addresses: tuple[str, ...]
    from_display: str
    sender: str | None
    to_cc: tuple[str, ...]
    list_ids: tuple[str, ...]
    x_loops: tuple[str, ...]
    auto_submitted: str | None
    precedence: str | None
    content_type: str
    size: int
    header_count: int
    headers: dict[str, tuple[str, ...]]  # lower-cased name -> decoded values, for header-regex

    @property
    def author(self) -> str | None:
        return self.from_addresses[0] if self.from_addresses else None


@dataclass(frozen=True)
class Envelope:
    mail_from: str
    recipient: str


@dataclass(frozen=True)
class SenderFacts:
    """What the store says about the poster, looked up by the stage."""

    member: Member | None
    is_moderator: bool
    is_owner: bool
    trusted: bool = False
    banned: bool = False
    approved: int = 0  # the poster's posts a moderator approved on this list


def message_facts(raw: bytes, parts: Parts | None = None) -> MessageFacts:
    parts = parts or split(raw)
    from_values = parts.get_all(h.FROM)
    display = decode_header(from_values[0]) if from_values else ""
    list_ids = tuple(
        m.group(1).lower() for v in parts.get_all(h.LIST_ID)
        for m in [re.search(r"<([^<>]+)>", v)] if m
    )
    x_loops = tuple(a for v in parts.get_all(h.X_LOOP)
                    for a in [addresses.first_address(v)] if a)
    return MessageFacts(
        message_id=(parts.get(h.MESSAGE_ID) or "").strip() or None,
        subject=decode_header(parts.get(h.SUBJECT)),
        from_addresses=tuple(addresses.header_addresses(from_values)),
        from_display=display,
        sender=addresses.first_address(parts.get(h.SENDER)),
        to_cc=tuple(addresses.header_addresses(parts.get_all(h.TO) + parts.get_all(h.CC))),
        list_ids=list_ids,
        x_loops=x_loops,
        auto_submitted=(parts.get(h.AUTO_SUBMITTED) or "").strip().lower() or None,
        precedence=(parts.get(h.PRECEDENCE) or "").strip().lower() or None,
        content_type=content_type(parts.get(h.CONTENT_TYPE)).type,
        size=len(raw),
        header_count=len(parts.fields),
        headers=_headers(parts),
    )


def _headers(parts: Parts) -> dict[str, tuple[str, ...]]:
    found: dict[str, list[str]] = {}
    for f in parts.fields[:500]:
        found.setdefault(f.name.lower(), []).append(decode_header(f.value))
    return {name: tuple(values) for name, values in found.items()}


_ROBOT_LOCALS = re.compile(
    r"^(mailer-daemon|postmaster|listserv|majordomo|mailman|.*-(bounces|request|owner|admin)"
    r"|owner-.*|no-?reply|do-?not-?reply)(\+.*)?$", re.IGNORECASE)


def why_not_notify(facts: MessageFacts, envelope: Envelope, *,
                   auth_failed: bool = False) -> str | None:
    """Why an automatic notice must not go to this message's sender, or None if it may.

    No backscatter: nothing to an empty return path, to robots, to bulk or list
    mail, to auto-submitted mail, to our own loops or to a sender whose
    authentication failed (RFC 3834 section 2; DESIGN invariant 5).
    """
    if not envelope.mail_from:
        return "empty return path (a bounce or a DSN)"
    local = envelope.mail_from.partition("@")[0]
    if _ROBOT_LOCALS.match(local):
        return f"the return path <{envelope.mail_from}> is a robot's address"
    if facts.auto_submitted and facts.auto_submitted != "no":
        return f"Auto-Submitted: {facts.auto_submitted}"
    if facts.precedence in ("bulk", "list", "junk"):
        return f"Precedence: {facts.precedence}"
    if facts.list_ids:
        return "it came from a mailing list (List-Id)"
    if auth_failed:
        return "the sender's authentication failed: the return path may be forged"
    return None
