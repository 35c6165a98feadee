"""Bounce detection: which recipients a received delivery report says failed, and VERP.

Pure: bytes in, a :class:`BounceReport` out; no I/O, no store, no clock. Whatever
arrives, :func:`parse_bounce` answers and never raises.

How a message is read, most authoritative first:

1. An RFC 3464 delivery status notification: each per-recipient group of a
   ``message/delivery-status`` part (or of its look-alikes: ``global-delivery-status``
   of RFC 6533, vendors' ``x...delivery-status``, or DSN fields pasted into the text
   when a relay broke the MIME structure) names a recipient, an ``Action`` and a
   ``Status``. ``failed`` with a 5.x.x status is permanent; ``delayed``, and
   ``failed`` with a 4.x.x status, are temporary; ``delivered``, ``relayed`` and
   ``expanded`` are successes. The Original-Recipient is preferred to the
   Final-Recipient: it is the address we sent to, before the far end's aliasing.
   A DSN that a gateway forwarded as a ``message/rfc822`` attachment counts too.
2. Otherwise, and only for a message that presents itself as a failure notice (from
   a mail system, a delivery-status report, or a subject that says so), flufl.bounce's
   detectors for the non-standard formats of common MTAs, with their findings checked:
   an address must be one Listgate accepts, must be named in the report itself (not
   only in the returned copy of our message), and must not be one of the report's own
   addresses (our -bounces address, the reporting postmaster).
3. Otherwise, in such a notice, a few conventions shared by MTAs that write plain-text
   notices: ``<addr>: reason`` lines, sendmail's ``addr... reason``, addresses listed
   under "the following recipients failed", an address in a 4xx/5xx SMTP reply, one
   address on a line that says it failed.

A failure notice in which nobody can be read is a bounce with no addresses (the
caller may still know the member from the VERP address it came to).

Every address reported is normalised by gateway.addresses; what it refuses (a bare
local part, ``user@#domain``) is never reported. The heuristics read bounded amounts
of text, so hostile input costs little.

Not bounces: auto-replies (RFC 3834 ``Auto-Submitted: auto-replied`` from anyone but
a mail system, ``X-Autoreply`` and kin, vacation and out-of-office subjects) and
challenge/response messages (the far end asks the sender to confirm or to get on an
allowed list before it delivers). They give ``is_bounce=False`` and no addresses.
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.message
import email.utils
import html
import logging
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flufl.bounce import all_failures

from gateway import addresses
from gateway import headers as h
from gateway.errors import AddressError
from gateway.message import content_charset, decode_header, leaf_payload, parse
from gateway.signing import LinkSigner

log = logging.getLogger(__name__)

VERP_DELIMITER = "+"
VERP_AT = "="
MAX_LOCAL_PART = 64  # octets, RFC 5321 4.5.3.1.1


@dataclass(frozen=True)
class BounceReport:
    """What a received message says about the delivery of our mail."""

    is_bounce: bool  # False for auto-replies, vacation mail, challenge/response, plain mail
    permanent: frozenset[str]  # normalised addresses that failed permanently (5.x.x / hard)
    temporary: frozenset[str]  # addresses delayed or failed temporarily (4.x.x, delayed)
    reason: str  # one line, for logs


# --- VERP ---------------------------------------------------------------------------
#
# The member's address rides in the detail of the list's -bounces address with '@'
# written as '=', as Postfix, qmail and Mailman do: bob@example.net becomes
# discuss-bounces+bob=example.net@example.org. No escaping is needed for that to be
# unambiguous for every address gateway.addresses accepts:
#   - the detail starts after the FIRST '+' of the local part, and a list name never
#     holds a '+' (addresses.check_list_name), so a '+' in the member's local part
#     stays inside the detail;
#   - the member's domain never holds '=' (a host name: letters, digits, '-', '.'),
#     so the LAST '=' of the detail is the one that stood for '@', and an '=' or '-'
#     in the member's local part stays in the local part.
# Every character of the result is dot-atom text, so the address needs no quoting.
#
# That form is guessable, so anyone could send "bounces" to it: what delivery uses is
# the signed form, with a keyed tag (LinkSigner.verp_tag) after the member's domain:
# discuss-bounces+bob=example.net+k7abq2xyzmn4@example.org. A domain never holds '+',
# so a '+' after the last '=' starts the tag, and the untagged form never has one.


def verp_encode(list_name: str, domain: str, member: str) -> str:
    """The untagged VERP address of ``member`` (Mailman's form), of any length.

    ``verp_encode("discuss", "example.org", "bob@example.net")`` is
    ``"discuss-bounces+bob=example.net@example.org"``. Anyone can write it, so the
    bounces stage counts nothing sent to it: return paths come from :func:`signed_verp`.
    Raises :class:`AddressError` when the member, the list name or the result is not an
    address Listgate accepts.
    """
    name = addresses.check_list_name(list_name)
    local, member_domain = addresses.normalise(member).rsplit("@", 1)
    verp = (f"{name}-bounces{VERP_DELIMITER}{local}{VERP_AT}{member_domain}"
            f"@{addresses.normalise_domain(domain)}")
    # check_list_name lets through a name like "a..b", which no address may hold.
    return addresses.normalise(verp)


def signed_verp(list_name: str, domain: str, member: str, signer: LinkSigner) -> str:
    """The return path of ``member``'s copies: the VERP address with its keyed tag.

    ``discuss-bounces+bob=example.net+TAG@example.org``. When that local part would be
    longer than RFC 5321 allows (64 octets), the plain ``discuss-bounces@example.org``:
    a report that comes back to it is read, but counts against nobody (anyone can
    send one there), so such a member's bounces are not scored. Raises
    :class:`AddressError` as :func:`verp_encode` does.
    """
    local, _, list_domain = verp_encode(list_name, domain, member).rpartition("@")
    name = addresses.check_list_name(list_name)
    tag = signer.verp_tag(f"{name}@{list_domain}", addresses.normalise(member))
    local = f"{local}{VERP_DELIMITER}{tag}"
    if len(local) > MAX_LOCAL_PART:
        return f"{name}-bounces@{list_domain}"
    return f"{local}@{list_domain}"


@dataclass(frozen=True)
class Verp:
    """What a VERP detail says: the member it names, and the tag it carries."""

    member: str  # normalised
    tag: str | None  # None in the untagged form


def verp_parse(detail: str) -> Verp | None:
    """The member (unverified) and tag of a VERP detail, or None if it names nobody.

    ``"bob=example.net+k7abq2xyzmn4"`` and the untagged ``"bob=example.net"`` both
    name bob@example.net.
    """
    if not isinstance(detail, str) or "@" in detail:
        return None
    local, at, domain = detail.rpartition(VERP_AT)
    domain, plus, tag = domain.partition(VERP_DELIMITER)
    if not at or not local or not domain:
        return None
    try:
        member = addresses.normalise(f"{local}@{domain}")
    except AddressError:
        return None
    return Verp(member, tag if plus else None)


def verp_decode(detail: str) -> str | None:
    """The member a VERP detail names, tagged or not, normalised, or None.

    Unverified: anyone can write a detail; :func:`verp_verified` says whether we did.
    """
    verp = verp_parse(detail)
    return verp.member if verp is not None else None


def verp_verified(detail: str, *, list_address: str, signer: LinkSigner) -> str | None:
    """The member a VERP detail names, if its tag is the one we gave that member's copies
    of the list at ``list_address``; None for an untagged, wrongly tagged or junk detail."""
    verp = verp_parse(detail)
    if verp is None or verp.tag is None:
        return None
    if not signer.verify_verp_tag(verp.tag, list_address=list_address, member=verp.member):
        return None
    return verp.member


# --- Reading the message -----------------------------------------------------------


@dataclass(frozen=True)
class _Recipient:
    """One per-recipient group of a delivery status notification."""

    address: str
    action: str  # lower-case first word of Action, "" when absent
    status: str  # "5.1.1", or "" when absent or unreadable


_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d])")
# Matches start only where a run of address characters starts, so that a search
# stays linear on hostile input (long runs of address characters).
_EMAIL = re.compile(r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
                    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
# Heuristics read only so much of a notice, and lines only as long as RFC 5322
# allows: MTA notices are short, and regular expressions must stay cheap on junk.
_MAX_SCAN = 64 * 1024
_MAX_LINE = 998
_FLUFL_BUDGET = 256 * 1024
_DSN_SUBTYPE = re.compile(r"^(?:x-?)?(?:global-)?x?delivery-status$")
_RECIPIENT_FIELDS = {"final-recipient", "original-recipient"}
_SUCCESS_ACTIONS = ("delivered", "relayed", "expanded")
_MTA_LOCALS = re.compile(r"^(?:mailer[-_]?daemon|postmaster|mail[-_]?daemon|mdaemon|mmdf|smtp)$",
                         re.IGNORECASE)
_MTA_DISPLAY = re.compile(r"\b(?:mail(?:er)?[- ]?(?:delivery|daemon)|postmaster|"
                          r"mail (?:delivery )?(?:system|subsystem))\b", re.IGNORECASE)
_FAILURE_SUBJECT = re.compile(
    r"undeliver|undelivered|non[- ]?deliver|delivery (?:status )?(?:notification|failure|"
    r"failed|problem|report)|returned mail|mail delivery failed|failure notice|"
    r"delivery fail|could not be delivered|returned to sender|message not delivered|"
    r"delivery has failed|delayed mail|mail delivery warning|message delayed|"
    r"warning: message|user unknown|unknown user|no such user|mailbox (?:unavailable|full)|"
    r"over quota|unzustellbar|non remis|nicht zustellbar",
    re.IGNORECASE)
_DELAY_WORDS = re.compile(
    r"\b(?:delayed|not yet been delivered|will (?:continue to )?(?:be )?retr(?:y|ied)|"
    r"still (?:being )?retr|will keep trying|temporar(?:y|ily)|warning only|"
    r"no action is required|do not need to resend|postponed|continue to (?:try|attempt))\b",
    re.IGNORECASE)
# Subjects of auto-replies in the languages list mail most often meets.
_AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[ -]?(?:reply|response|answer|antwort)|autoreply|autoresponse|"
    r"auto:|out of (?:the )?office|away from (?:the |my )?(?:office|desk)|on vacation|"
    r"vacation|abwesenheit|automatische antwort|r[ée]ponse automatique|"
    r"respuesta autom[aá]tica|risposta automatica|automatyczna odpowied|autosvar|"
    r"automatisch antwoord)"
    r"|\((?:auto(?:matic)?[ -]?(?:reply|response))\)|\[auto(?:matic)?[ -]?(?:reply|response)",
    re.IGNORECASE)
_AUTO_REPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Auto-Reply",
                       "X-Vacation", "X-AutoReply-From", "X-Mail-Autoreply")
# A challenge/response system holds the mail until the sender proves itself or is
# put on the recipient's list of allowed senders; the recipient's address is fine.
_CHALLENGE = re.compile(
    r"\b(?:guest|allowed|approved|safe|trusted)[- ]?(?:senders?[- ]?)?list\b|"
    r"\bsender (?:is )?not (?:pre-?)?approved\b|"
    r"\b(?:click|visit)\b.{0,160}?\b(?:to confirm|to verify|to be added|"
    r"have your (?:e-?mail )?address added|to approve)\b|"
    r"\b(?:confirm|verify|prove) (?:that )?(?:you are|you're|your identity)\b|"
    r"\brequires? confirmation\b|\bwaitlisted\b|\bchallenge[- ]response\b",
    re.IGNORECASE | re.DOTALL)
# A line that introduces the returned copy of our message in a plain-text notice,
# as exim, qmail, sendmail and most others write it; the whole line must match.
_RETURNED_MARKER = re.compile(
    r"^[\s>*=_#-]*(?:"
    r"(?:this is )?a copy of (?:the|your) (?:original )?message\b.*|"
    r"below this line is a copy of the message\b.*|"
    r"(?:the )?(?:original|returned|unsent|undelivered|undeliverable|rejected) "
    r"(?:message|mail|e-?mail)(?: headers?| text| body)?"
    r"(?: follows?| below| (?:is |are )?(?:attached|included|following))?|"
    r"(?:the )?(?:original )?message headers? follows?|"
    r"(?:the )?headers? of (?:the )?(?:original|returned|your) message"
    r"(?: is following| follows?)?)"
    r"[\s.:=_*#-]*$",
    re.IGNORECASE)
_HEADER_LINE = re.compile(r"^(?:return-path|received|message-id|date|from|to|subject|"
                          r"mime-version|content-type|x-[a-z-]+|delivered-to|reply-to)"
                          r"[ \t]*:", re.IGNORECASE)


def parse_bounce(raw: bytes) -> BounceReport:
    """Who a received message says could not be reached; never raises.

    Each step guards what it reads; this is the last line for bytes from anywhere.
    """
    try:
        return _read(raw, parse(raw))
    except RecursionError:
        return _not_bounce("unreadable message: MIME nested too deeply")
    except Exception as exc:  # hostile input must get an answer, not crash the stage
        log.exception("bounce parsing failed on a %d-byte message", len(raw))
        return _not_bounce(f"unreadable message: {type(exc).__name__}")


def _read(raw: bytes, msg: email.message.Message) -> BounceReport:
    subject = _header(msg, h.SUBJECT)
    root = _report_root(msg)
    report_text = _notification_text(root)
    dsn_text = "\n\n".join(_dsn_texts(root))
    from_mta = _from_mail_system(msg)
    is_report = root is not msg or _is_report(msg)
    failure_subject = bool(_FAILURE_SUBJECT.search(subject))
    looks_failed = from_mta or is_report or failure_subject

    recipients = _dsn_recipients(dsn_text)
    if not recipients and looks_failed:
        # Some relays break the MIME structure or paste the DSN into the text part.
        recipients = _dsn_recipients(report_text)
    challenge = _challenge(report_text + "\n" + dsn_text)
    if challenge is not None:
        return _not_bounce(f"challenge/response: {challenge!r}")
    failed = [r for r in recipients if r.action not in _SUCCESS_ACTIONS]
    if failed:
        permanent, temporary = _classify(failed)
        return _bounce(permanent, temporary, "delivery status notification", recipients)
    if recipients:
        return _not_bounce("delivery status notification without failures "
                           f"({', '.join(sorted({r.action or r.status for r in recipients}))})")

    auto_reply = None if from_mta else _auto_reply(msg, subject)
    if auto_reply is not None:
        return _not_bounce(f"auto-reply: {auto_reply}")
    if not looks_failed:
        # flufl.bounce's looser detectors are kept for what says it is a failure notice.
        return _not_bounce("not a failure notice")

    own = _own_addresses(msg)
    checked_text = (report_text + "\n" + dsn_text).lower()
    reporters = _reporter_domains(msg)
    # flufl.bounce reads every line of every part, returned message included: give it
    # the start of a big message only (the notice comes first).
    temporary, permanent = _flufl(msg if len(raw) <= _FLUFL_BUDGET
                                  else parse(raw[:_FLUFL_BUDGET]))
    permanent = _checked(permanent, own, checked_text, reporters)
    temporary = _checked(temporary, own, checked_text, reporters) - permanent
    if permanent or temporary:
        return _bounce(permanent, temporary, "non-standard failure notice (flufl.bounce)")
    permanent, temporary = _plain_text_failures(report_text, own, subject)
    if permanent or temporary:
        return _bounce(permanent, temporary, "plain-text failure notice")
    if is_report or failure_subject:
        return BounceReport(True, frozenset(), frozenset(),
                            f"failure notice naming no recipient we can read "
                            f"(subject {subject[:80]!r})")
    return _not_bounce("from a mail system, but not a failure notice")


def _bounce(permanent: Iterable[str], temporary: Iterable[str], how: str,
            recipients: list[_Recipient] | None = None) -> BounceReport:
    perm = frozenset(permanent)
    temp = frozenset(temporary) - perm
    statuses = ""
    if recipients:
        statuses = " " + ", ".join(sorted({f"{r.action or '-'} {r.status or '-'}"
                                           for r in recipients}))
    return BounceReport(True, perm, temp,
                        f"{how}: {len(perm)} permanent, {len(temp)} temporary{statuses}")


def _not_bounce(reason: str) -> BounceReport:
    return BounceReport(False, frozenset(), frozenset(), reason)


def _classify(recipients: list[_Recipient]) -> tuple[set[str], set[str]]:
    """Split failed recipients into (permanent, temporary)."""
    permanent: set[str] = set()
    temporary: set[str] = set()
    for r in recipients:
        klass = r.status[:1]
        if r.action.startswith("delay") or klass == "4":
            temporary.add(r.address)
        elif r.action.startswith(("fail", "error")) or klass == "5":
            permanent.add(r.address)
    return permanent, temporary - permanent


# --- Headers -----------------------------------------------------------------------


def _header(msg: email.message.Message, name: str) -> str:
    """A field's value, RFC 2047-decoded where possible, on one line; "" when absent."""
    try:
        value = msg.get(name)
        if value is None:
            return ""
        text = str(value)
    except Exception:  # compat32 can choke on a malformed field when asked for it
        return ""
    try:
        text = decode_header(text)
    except email.errors.MessageError:  # an encoded word naming a bogus charset
        pass
    return " ".join(text.split())


def _header_addresses(msg: email.message.Message, *names: str) -> set[str]:
    values: list[str] = []
    for name in names:
        try:
            values.extend(str(v) for v in msg.get_all(name) or [])
        except Exception:  # as in _header
            continue
    found = set(addresses.header_addresses(values))
    for value in values:  # Delivered-To and the like may hold a bare address
        found.update(a for a in (_address(m) for m in _EMAIL.findall(value)) if a)
    return found


def _own_addresses(msg: email.message.Message) -> set[str]:
    """The report's own addresses: never the recipient that failed."""
    # Not X-Original-To: Exchange copies the failed recipient's into its reports.
    return _header_addresses(msg, h.FROM, h.SENDER, h.TO, h.RETURN_PATH, h.DELIVERED_TO,
                             "Envelope-To", "Errors-To")


def _from_mail_system(msg: email.message.Message) -> bool:
    """Whether the message comes from a mail system rather than a person's mailbox."""
    value = _header(msg, h.FROM)
    for name, address in email.utils.getaddresses([value]):
        local = address.rpartition("@")[0] or address
        if _MTA_LOCALS.match(local) or _MTA_DISPLAY.search(name):
            return True
    return False


def _is_report(msg: email.message.Message) -> bool:
    try:
        return (msg.get_content_type() == "multipart/report"
                and str(msg.get_param("report-type", "")).lower() == "delivery-status")
    except Exception:  # a malformed Content-Type
        return False


def _auto_reply(msg: email.message.Message, subject: str) -> str | None:
    """Why this looks like an auto-reply, or None."""
    auto = _header(msg, h.AUTO_SUBMITTED).lower()
    if auto.startswith("auto-replied"):
        return f"Auto-Submitted: {auto}"
    for name in _AUTO_REPLY_HEADERS:
        if _header(msg, name):
            return f"{name} header"
    if _header(msg, h.PRECEDENCE).lower() in ("auto_reply", "auto-reply"):
        return "Precedence: auto_reply"
    if _AUTO_REPLY_SUBJECT.search(subject):
        return f"subject {subject!r}"
    return None


def _challenge(text: str) -> str | None:
    m = _CHALLENGE.search(" ".join(text.split()))
    return m.group(0)[:60] if m else None


# --- The parts of a report ---------------------------------------------------------


def _parts(msg: email.message.Message) -> Iterator[email.message.Message]:
    """The leaves of the report itself, never inside a returned message; a
    delivery-status part counts as a leaf (compat32 splits it into header blocks)."""
    if _is_dsn_type(msg.get_content_type()):
        yield msg
        return
    if msg.is_multipart():
        payload = msg.get_payload()
        if isinstance(payload, list):
            for part in payload:
                if isinstance(part, email.message.Message) and not _is_returned(part):
                    yield from _parts(part)
        return
    yield msg


def _report_root(msg: email.message.Message) -> email.message.Message:
    """The report itself: the message, or a DSN that a gateway forwarded as an
    attachment (a returned copy of list mail is never a delivery report itself)."""
    if any(_is_dsn_type(part.get_content_type()) for part in _parts(msg)):
        return msg
    payload = msg.get_payload() if msg.is_multipart() else None
    for part in payload if isinstance(payload, list) else []:
        if not (isinstance(part, email.message.Message)
                and part.get_content_type() == "message/rfc822"):
            continue
        inner = part.get_payload()
        if (isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message)
                and _is_report(inner[0])):
            return inner[0]
    return msg


def _is_returned(part: email.message.Message) -> bool:
    ctype = part.get_content_type()
    if ctype in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers",
                 "message/global", "message/global-headers", "message/partial"):
        return True
    return ctype.startswith("message/") and not _is_dsn_type(ctype)


def _is_dsn_type(ctype: str) -> bool:
    maintype, _, subtype = ctype.partition("/")
    return maintype in ("message", "text") and bool(_DSN_SUBTYPE.match(subtype))


def _decoded(part: email.message.Message) -> str:
    """A leaf's text, transfer-decoded and charset-decoded as well as we can."""
    try:
        data = part.get_payload(decode=True)
    except Exception:  # broken base64 or quoted-printable
        data = None
    if not isinstance(data, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = "utf-8"
    try:
        charset = content_charset(part) or "utf-8"
        return data.decode(charset, "replace")
    except (LookupError, UnicodeError, ValueError):
        return data.decode("utf-8", "replace")


def _notification_text(msg: email.message.Message) -> str:
    """The human-readable text of the report, without the returned message."""
    texts = []
    for part in _parts(msg):
        ctype = part.get_content_type()
        # A multipart that is a leaf is one whose boundary was never found: its
        # payload is the whole body as text.
        if part.get_content_maintype() not in ("text", "multipart") or _is_dsn_type(ctype):
            continue
        text = _decoded(part)[:_MAX_SCAN]
        if ctype == "text/html":
            text = html.unescape(re.sub(r"(?s)<(?:style|script)\b.*?</(?:style|script)>|<[^>]*>",
                                        " ", text))
        texts.append(_cut_returned(text))
    return "\n\n".join(texts)[:4 * _MAX_SCAN]


def _cut_returned(text: str) -> str:
    """The text before the returned copy of the message, when a notice inlines one."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if _RETURNED_MARKER.match(line) or _starts_header_block(lines, i):
            return "\n".join(lines[:i])
    return text


def _starts_header_block(lines: list[str], i: int) -> bool:
    """An inlined message header after a blank line: three header fields in a row,
    the first a trace or identity field."""
    if i == 0 or lines[i - 1].strip():
        return False
    window = lines[i:i + 3]
    if len(window) < 3 or not all(_HEADER_LINE.match(line) or
                                  (line[:1] in (" ", "\t") and line.strip())
                                  for line in window):
        return False
    return bool(re.match(r"(?i)(return-path|received|message-id|date|from|to|subject)\s*:",
                         window[0]))


def _dsn_texts(msg: email.message.Message) -> Iterator[str]:
    """The text of each delivery-status part, as the MTA wrote it."""
    for part in _parts(msg):
        if _is_dsn_type(part.get_content_type()):
            yield _blocks_text(part) if part.is_multipart() else _decoded(part)


def _blocks_text(part: email.message.Message) -> str:
    """The fields of a parsed delivery-status part, as text again.

    A block with a body is a relay's re-encoding (the fields went base64 or
    quoted-printable after a Content-Transfer-Encoding field), so the body is decoded
    by the most recent encoding named.
    """
    encoding = _header(part, h.CONTENT_TRANSFER_ENCODING).lower()
    out: list[str] = []
    payload = part.get_payload()
    for block in payload if isinstance(payload, list) else []:
        if not isinstance(block, email.message.Message):
            continue
        for name, value in block.items():
            if name.lower() == h.CONTENT_TRANSFER_ENCODING.lower():
                encoding = str(value).strip().lower()
            out.append(f"{name}: {' '.join(str(value).split())}")
        body = leaf_payload(block)
        if body.strip():
            out.append("")
            out.append(_transfer_decode(body, encoding))
        out.append("")
    return "\n".join(out)


def _transfer_decode(text: str, encoding: str) -> str:
    try:
        if encoding == "base64":
            return base64.b64decode("".join(text.split()), validate=False).decode("utf-8",
                                                                                  "replace")
        if encoding == "quoted-printable":
            return quopri.decodestring(text.encode("utf-8", "replace")).decode("utf-8",
                                                                               "replace")
    except (binascii.Error, ValueError):
        pass
    return text


# --- RFC 3464 per-recipient groups --------------------------------------------------


def _field_groups(text: str) -> Iterator[list[tuple[str, str]]]:
    """Groups of (lower-case name, value) fields, split at blank lines and at a repeated
    recipient field (some MTAs write no blank line between recipients)."""
    group: list[tuple[str, str]] = []
    for line in _unfolded(text):
        if not line.strip():
            if group:
                yield group
            group = []
            continue
        m = _FIELD.match(line)
        if m is None:
            continue
        name, value = m.group(1).lower(), " ".join(m.group(2).split())
        names = {n for n, _ in group}
        if (name in _RECIPIENT_FIELDS and names & _RECIPIENT_FIELDS
                and (name in names or names & {"action", "status"})):
            yield group
            group = []
        group.append((name, value))
    if group:
        yield group


def _unfolded(text: str) -> Iterator[str]:
    """Lines with RFC 5322 continuation lines joined to the line they continue."""
    current: list[str] = []
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and current and line.strip():
            current.append(line.strip())
            continue
        if current:
            yield " ".join(current)
        current = [line]
    if current:
        yield " ".join(current)


def _dsn_recipients(text: str) -> list[_Recipient]:
    """The recipients that a DSN's per-recipient groups give a verdict on."""
    found: list[_Recipient] = []
    for group in _field_groups(text):
        fields: dict[str, str] = {}
        for name, value in group:
            fields.setdefault(name, value)
        address = (_recipient_address(fields.get("original-recipient", ""))
                   or _recipient_address(fields.get("final-recipient", "")))
        if address is None:
            continue
        action = fields.get("action", "").lower().split(" ", 1)[0].strip(";,.()")
        m = _STATUS.search(fields.get("status", ""))
        status = ".".join(m.groups()) if m else ""
        if action or status:  # a group without either says nothing about delivery
            found.append(_Recipient(address, action, status))
    return found


def _recipient_address(value: str) -> str | None:
    """The address of an RFC 3464 recipient field: ``rfc822; bob@example.net``."""
    if not value:
        return None
    # The address type comes before the last ';' (some MTAs repeat it: "rfc822; rfc822;a@b").
    candidate = value.rsplit(";", 1)[-1].strip()
    return _address(candidate)


def _address(value: str) -> str | None:
    value = value.strip().strip("<>\"'()[],;:.").strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    try:
        address = addresses.normalise(value)
    except AddressError:
        return None
    local = address.partition("@")[0]
    if _MTA_LOCALS.match(local):
        return None
    return address


# --- Other formats -----------------------------------------------------------------


def _flufl(msg: email.message.Message) -> tuple[set[str], set[str]]:
    """flufl.bounce's (temporary, permanent) findings, as normalised addresses."""
    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # a third-party heuristic on hostile input: no finding
        log.debug("flufl.bounce failed on a message: %s: %s", type(exc).__name__, exc)
        return set(), set()
    return _addresses(temporary), _addresses(permanent)


def _addresses(found: Iterable[bytes | str]) -> set[str]:
    out = set()
    for item in found:
        text = item.decode("ascii", "replace") if isinstance(item, bytes) else str(item)
        address = _address(text)
        if address:
            out.add(address)
    return out


def _checked(found: set[str], own: set[str], report_text: str,
             reporters: set[str]) -> set[str]:
    """Heuristic findings that the report itself names and that are not its own.

    A mail system may name its own users by local part alone ("userx: no such user");
    such a finding stands when the report names that local part and the address is in
    the reporting system's own organisation.
    """
    kept = set()
    for address in found:
        if address in own:
            continue
        if address in report_text:
            kept.add(address)
            continue
        local, _, domain = address.rpartition("@")
        named = re.search(r"(?<![\w.+=-])" + re.escape(local) + r"(?![\w@+=-]|\.\w)",
                          report_text)
        if named and _organisation(domain) in {_organisation(r) for r in reporters}:
            kept.add(address)
    return kept


def _organisation(domain: str) -> str:
    """The registered domain, near enough: the last two labels, or three under a
    two-letter country code with a short second level (example.co.uk)."""
    labels = domain.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and len(labels[-2]) <= 3:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _reporter_domains(msg: email.message.Message) -> set[str]:
    return {a.rpartition("@")[2] for a in _header_addresses(msg, h.FROM, h.SENDER)}


# Words with which failure notices say a recipient could not be reached.
_FAILURE_PHRASE = re.compile(
    r"undeliverable|undelivered|not (?:be )?delivered|could not (?:be )?(?:delivered|reached)|"
    r"unable to deliver|did not reach|delivery (?:has )?failed|\bfailed\b|rejected|"
    r"user unknown|unknown (?:user|recipient|address|mailbox)|no such (?:user|mailbox|address)|"
    r"not (?:found|listed|known)\b|invalid (?:\w+ )?(?:address|mailbox|recipient|userid|user)|"
    r"mailbox (?:is )?(?:full|unavailable)|over ?quota|quota (?:exceeded|violation)|"
    r"exceeds? (?:the )?(?:allowed|storage|size|quota)|does not exist|no longer valid|"
    r"not yet been delivered|postponed|not accepting",
    re.IGNORECASE)
# Text that introduces a list of failed addresses, one per line.
_LIST_INTRO = re.compile(
    r"(?:following|these) (?:e-?mail )?(?:address(?:es|\(es\))?|recipients?\b|users?\b|"
    r"destinations?)|permanent fatal errors|failed recipients?:",
    re.IGNORECASE)
_SMTP_REPLY = re.compile(r"(?<![\d.])([45])\d\d(?:[ -]|$)")
# Lines that repeat the returned message's own header fields in a summary.
_SUMMARY_FIELD = re.compile(r"^\s*[*-]*\s*(?:from|sender|reply-to|subject|date|sent|cc)\s*:",
                            re.IGNORECASE)
_FROM_ADDRESS = re.compile(r"(?i)\b(?:from|sender|by)\s*:?\s*[<\"]?$")
_POSTFIX_LINE = re.compile(r"^\s*<([^<>\s@]+@[^<>\s@]+)>\s*:")
_SENDMAIL_LINE = re.compile(r"(?<![^\s<(])<?([^\s<>@]+@[^\s<>@]+?)>?\.\.\.\s*\S")
_ANGLE_ADDRESS = re.compile(r"<([^<>\s@]+@[^<>\s@]+)>")
_LIST_ITEM = re.compile(
    r"^(?:[*>#-]+\s*)?(?:recipient(?: address)?:\s*)?[<\[\"']?(?:smtp:)?"
    r"([^\s<>\[\]\"'@]+@[^\s<>\[\]\"':,;()@]*[A-Za-z0-9])[>\]\"']*(?:\s*[:(,.].*|\s+.*)?$",
    re.IGNORECASE)


def _plain_text_failures(text: str, own: set[str], subject: str) -> tuple[set[str], set[str]]:
    """(permanent, temporary) addresses from MTA conventions in a plain-text notice."""
    found: dict[str, str] = {}  # address -> "5", "4" or "" (unknown class)
    lines = [line[:_MAX_LINE].rstrip() for line in text[:_MAX_SCAN].splitlines()]

    def note(raw: str, klass: str) -> None:
        address = _address(raw)
        if address and address not in own and not found.get(address):
            found[address] = klass

    for i, line in enumerate(lines):
        if re.search(r"(?i)\bmail\s+from\s*:", line) or _SUMMARY_FIELD.match(line):
            continue  # our own return path in a transcript, or the returned message's sender
        # Postfix and qmail: "<bob@example.net>: host ... said: 550 ..." at line start.
        m = _POSTFIX_LINE.match(line)
        if m:
            note(m.group(1), _reply_class(" ".join(lines[i:i + 4])))
            continue
        # sendmail: "bob@example.net... User unknown", often after an SMTP code.
        m = _SENDMAIL_LINE.search(line)
        if m:
            note(m.group(1), _reply_class(line))
            continue
        # An SMTP reply naming the address: "550 5.1.1 <bob@example.net>: unknown".
        m = _SMTP_REPLY.search(line)
        if m:
            addr = _ANGLE_ADDRESS.search(line, m.start())
            if addr and re.search(r"(?i)rcpt|recipient|user|mailbox|address", line):
                note(addr.group(1), m.group(1))
                continue
        if _LIST_INTRO.search(line) or (_FAILURE_PHRASE.search(line)
                                        and line.rstrip().endswith(":")):
            listed = list(_listed_addresses(lines[i + 1:i + 25]))
            for address in listed:
                note(address, "")
            if listed:
                continue
        # One address on a line that says it failed: "undeliverable to bob@example.net".
        if _FAILURE_PHRASE.search(line):
            candidates = [m for m in _EMAIL.finditer(line)
                          if _address(m.group(0)) not in own
                          and not _FROM_ADDRESS.search(line[:m.start()])]
            if len(candidates) == 1:
                note(candidates[0].group(0), _reply_class(line))
    delayed = bool(_DELAY_WORDS.search(subject) or _DELAY_WORDS.search(text))
    permanent = {a for a, k in found.items() if k == "5" or (not k and not delayed)}
    temporary = {a for a, k in found.items() if k == "4" or (not k and delayed)}
    return permanent, temporary - permanent


def _listed_addresses(lines: list[str]) -> Iterator[str]:
    """Addresses listed one per line after an introduction, up to the end of the list."""
    seen = False
    for line in lines:
        stripped = line.strip()
        if not stripped:
            if seen:
                return
            continue
        # Bullets, quoting and "Recipient: [SMTP:...]" wrappers come and go by MTA.
        m = _LIST_ITEM.match(stripped)
        if m and _address(m.group(1)):
            seen = True
            yield m.group(1)
        elif not seen or not line[:1].isspace():
            return  # the list starts right after its introduction, or there is none


def _reply_class(text: str) -> str:
    """"5" or "4" from the first SMTP reply or enhanced status code in text, else ""."""
    m = _STATUS.search(text)
    if m:
        return m.group(1) if m.group(1) in "45" else ""
    m = _SMTP_REPLY.search(text)
    return m.group(1) if m else ""
