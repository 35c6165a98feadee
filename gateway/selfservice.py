"""Self-service by mail: LIST-request@ commands, LIST-join@ and LIST-leave@, confirmations.

Subscribing and unsubscribing are double opt-in: the address itself gets a
confirmation request and must reply to LIST-confirm+TOKEN@. Changing one's
delivery mode or asking for the member list (owners) needs a reply that
authenticates (DKIM), since nothing else proves who sent it. Nothing is ever
sent to a sender who may be forged, bulk or automatic: at worst the address a
forger named gets one confirmation request, and not a second within the hour.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway import lists, tokens
from gateway.errors import Conflict, NotFound
from gateway.lists import MailingList
from gateway.notices import Notice, queue, reply_subject
from gateway.replytext import own_text
from gateway.schema import Mode, RoleName
from gateway.schema import tokens as tokens_table
from gateway.templates import Templates

CONFIRM_TTL = 7 * 86400.0
RESEND_AFTER = 3600.0
MAX_COMMANDS = 10

MODE_WORDS = {
    ("digest", "mime"): Mode.DIGEST_MIME, ("digest", "plain"): Mode.DIGEST_PLAIN,
    ("digest", "html"): Mode.DIGEST_HTML, ("digest",): Mode.DIGEST_MIME,
    ("regular",): Mode.REGULAR, ("nomail",): Mode.NOMAIL,
}
_COMMAND = re.compile(r"^(subscribe|join|unsubscribe|leave|signoff|set|help|who|end|stop|"
                      r"thanks|--)\b\s*(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    line: str
    verb: str
    args: tuple[str, ...]


def commands_in(raw: bytes) -> list[Command]:
    """Commands in the subject, then one per line of what the sender wrote, up to
    "end" (or a signature, or quoted text); lines that are not commands are skipped."""
    subject, lines = own_text(raw)
    found = []
    for line in [subject, *lines]:
        m = _COMMAND.match(line.strip())
        if m is None:
            continue
        verb = m.group(1).lower()
        if verb in ("end", "stop", "thanks", "--"):
            break
        found.append(Command(line.strip()[:200], verb, tuple(m.group(2).lower().split())))
        if len(found) >= MAX_COMMANDS:
            break
    return found


@dataclass
class Requester:
    """Who sent the commands, as far as we can tell."""

    address: str
    authenticated: bool
    results: list[tuple[str, str]] = field(default_factory=list)

    def say(self, line: str, result: str) -> None:
        self.results.append((line, result))


def run(conn: Connection, lst: MailingList, requester: Requester, commands: list[Command], *,
        now: float, templates: Templates, message_id: int | None) -> None:
    """Carry out the commands, recording a result line for each."""
    for command in commands:
        verb = {"join": "subscribe", "leave": "unsubscribe", "signoff": "unsubscribe"}.get(
            command.verb, command.verb)
        if verb == "subscribe":
            request_confirmation(conn, lst, requester.address, tokens.Kind.SUBSCRIBE, now=now,
                                 templates=templates, message_id=message_id,
                                 report=functools.partial(requester.say, command.line))
        elif verb == "unsubscribe":
            if lists.find_member(conn, lst.id, [requester.address]) is None:
                requester.say(command.line, f"{requester.address} is not a member")
            else:
                request_confirmation(conn, lst, requester.address, tokens.Kind.UNSUBSCRIBE,
                                     now=now, templates=templates, message_id=message_id,
                                     report=functools.partial(requester.say, command.line))
        elif verb == "set":
            _set(conn, lst, requester, command)
        elif verb == "who":
            _who(conn, lst, requester, command)
        else:
            requester.say(command.line, "see the help below")


def _set(conn: Connection, lst: MailingList, requester: Requester, command: Command) -> None:
    mode = MODE_WORDS.get(command.args)
    if mode is None:
        requester.say(command.line, "unknown; say: set digest mime|plain|html, set regular, "
                                    "or set nomail")
    elif not requester.authenticated:
        requester.say(command.line, "not done: your message could not be authenticated "
                                    "(no valid DKIM signature of your domain); use the "
                                    "link at the foot of any list message instead")
    else:
        try:
            lists.set_mode(conn, lst, requester.address, mode)
            requester.say(command.line, f"done: you now get {mode.value}")
        except NotFound:
            requester.say(command.line, f"{requester.address} is not a member")


def _who(conn: Connection, lst: MailingList, requester: Requester, command: Command) -> None:
    owner = lists.has_role(conn, lst.id, requester.address, RoleName.OWNER)
    if not (owner and requester.authenticated):
        requester.say(command.line, "only the list's owners may ask, from an authenticated "
                                    "address")
        return
    members = [m.address for m in lists.iter_members(conn, lst)]
    requester.say(command.line, f"{len(members)} members:\n    " + "\n    ".join(members))


def request_confirmation(conn: Connection, lst: MailingList, address: str, kind: tokens.Kind,
                         *, now: float, templates: Templates, message_id: int | None,
                         report: Callable[[str], None]) -> None:
    """Send ``address`` a confirmation request, unless one went out within the hour."""
    if kind is tokens.Kind.SUBSCRIBE and lists.find_member(conn, lst.id, [address]):
        report(f"{address} is already a member")
        return
    recent = conn.execute(sa.select(sa.func.count()).select_from(tokens_table).where(
        tokens_table.c.list_id == lst.id, tokens_table.c.address == address,
        tokens_table.c.kind == kind.value, tokens_table.c.used_at.is_(None),
        tokens_table.c.created_at > now - RESEND_AFTER)).scalar_one()
    if recent:
        report(f"a confirmation request went to {address} less than an hour ago; "
               "reply to that one")
        return
    token = tokens.issue(conn, kind, list_id=lst.id, address=address, now=now,
                         ttl=CONFIRM_TTL)
    what = "join" if kind is tokens.Kind.SUBSCRIBE else "leave"
    text = templates.render("notices/confirm.txt.j2", list_address=lst.address,
                            mailing_list=lst.identity, address=address, what=what)
    queue(conn, Notice(to=address, subject=f"Please confirm: {what} {lst.address}", text=text,
                       reply_to=lst.identity.address(f"confirm+{token}")),
          lst.identity, list_id=lst.id, message_id=message_id, now=now)
    report(f"a confirmation request was sent to {address}")


def confirm(conn: Connection, lst: MailingList, token: tokens.Token, *, by: str, now: float,
            templates: Templates, message_id: int | None) -> str:
    """Apply a confirmed subscription or unsubscription; returns what happened."""
    if not tokens.consume(conn, token, by=by, now=now):
        return "that confirmation was already used, or has expired"
    if token.kind is tokens.Kind.SUBSCRIBE:
        try:
            lists.add_member(conn, lst, token.address, now=now)
        except Conflict:
            return f"{token.address} was already a member"
        template, subject = "notices/welcome.txt.j2", f"Welcome to {lst.address}"
        result = f"{token.address} joined {lst.address}"
    else:
        try:
            lists.remove_member(conn, lst, token.address)
        except NotFound:
            return f"{token.address} was not a member"
        template, subject = "notices/goodbye.txt.j2", f"You have left {lst.address}"
        result = f"{token.address} left {lst.address}"
    text = templates.render(template, list_address=lst.address, mailing_list=lst.identity,
                            address=token.address)
    queue(conn, Notice(to=token.address, subject=subject, text=text), lst.identity,
          list_id=lst.id, message_id=message_id, now=now)
    return result


def reply(conn: Connection, lst: MailingList, requester: Requester, *, subject: str,
          in_reply_to: str | None, now: float, templates: Templates,
          message_id: int | None) -> None:
    text = templates.render("notices/request-reply.txt.j2", list_address=lst.address,
                            mailing_list=lst.identity, results=requester.results)
    queue(conn, Notice(to=requester.address, subject=reply_subject(subject, "your request"),
                       text=text, in_reply_to=in_reply_to),
          lst.identity, list_id=lst.id, message_id=message_id, now=now)
