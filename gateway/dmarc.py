"""DMARC mitigation for list mail: the From rewritten to the list, or the post wrapped.

A list changes what it relays (subject prefix, footer), which breaks the author's DKIM
signature; when the author's domain publishes p=reject or p=quarantine, receivers then
refuse or junk the list's copy. RFC 7960 4.1.3 describes the two ways out that GNU
Mailman offers as dmarc_moderation_action "munge_from" and "wrap_message":

- rewrite_from(): the list's address takes the From, so the list's own DKIM signature
  aligns; the author moves to Reply-To (or Cc), and the display name keeps who wrote it:
  ``"Alice Example via Discuss" <discuss@example.org>``.
- wrap(): the post travels untouched, signature and all, as a message/rfc822 part of a
  message From the list.

Both are pure functions of the message; nothing here raises on malformed input.

Beyond Mailman, the original From (and a Sender, which no longer tells the truth once
the list is the author of record) are kept verbatim in X-Original-From and
X-Original-Sender (the name Google Groups uses). Reply-To or Cc carries the author for
people; these carry the exact original for filters, archives and anyone reversing the
rewrite, even when the original From was too broken to copy anywhere else. They cost
nothing with receivers: DMARC reads only From.
"""

from __future__ import annotations

import email.header
import enum
import hashlib
import re
from email.utils import getaddresses

from gateway import headers as h
from gateway.errors import ConfigError
from gateway.identity import ListIdentity
from gateway.message import CRLF, Field, Parts, decode_header, normalise_eol, split

X_ORIGINAL_FROM = "X-Original-From"
X_ORIGINAL_SENDER = "X-Original-Sender"
REPLY_TO_CHOICES = ("poster", "cc")

# Policies whose mail a receiver refuses or junks when DMARC fails (RFC 7489 6.3).
_ENFORCING = ("reject", "quarantine")
# A display name is for people: past this, the rest of a long author list says nothing.
MAX_DISPLAY_NAME = 200
# An address we copy into Reply-To or Cc: an addr-spec with nothing in it that could end
# the address, the field or the line (8-bit allowed: RFC 6532 mail has it).
_ADDRESS = re.compile(r'[^\s<>()\[\],;:"\\@]+@[^\s<>()\[\],;:"\\@]+')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")

# The fields of a wrapped post that its wrapper repeats (threading and addressing).
_WRAPPER_COPIES = (h.TO, h.CC, h.DATE, h.MESSAGE_ID, h.IN_REPLY_TO, h.REFERENCES)


class Mitigation(enum.Enum):
    """What a list does to posts from domains that publish an enforcing DMARC policy."""

    NONE = "none"
    REWRITE = "rewrite"
    WRAP = "wrap"


def needs_mitigation(policy: str | None) -> bool:
    """Whether mail From a domain with this DMARC policy (AuthResults.dmarc_policy) is
    refused or junked when the list breaks the author's signature: p=reject, p=quarantine."""
    return policy is not None and policy.strip().lower() in _ENFORCING


# ------------------------------------------------------------------ From rewriting


def rewrite_from(parts: Parts, lst: ListIdentity, *, reply_to: str = "poster") -> None:
    """Make the list the From of a post (in place), keeping the author in view.

    The whole From (every From field, every mailbox in it: RFC 5322 allows several with
    a Sender) becomes one mailbox, the list's post address, under the display name
    "<author> via <list>"; the author is the original display name, or the address when
    there is none. The authors' mailboxes go into Reply-To (reply_to="poster"), after
    any Reply-To the post already had, or into Cc (reply_to="cc"); an address already
    there is not repeated. The original From and Sender are kept in X-Original-From and
    X-Original-Sender. A post without a From, or already From the list, is left alone.
    """
    if reply_to not in REPLY_TO_CHOICES:
        raise ConfigError(f"DMARC From rewriting: reply_to={reply_to!r}: expected one of "
                          f"{', '.join(REPLY_TO_CHOICES)}")
    originals = [f for f in parts.fields if f.name.lower() == h.FROM.lower()]
    if not originals:
        return
    authors = _mailboxes([f.value for f in originals])
    if [address.lower() for _name, address in authors] == [lst.post_address.lower()]:
        return  # rewritten already (or the list wrote it): once is enough

    parts.remove(X_ORIGINAL_FROM, X_ORIGINAL_SENDER)  # only ours may claim to be the original
    senders = parts.remove(h.SENDER)
    first = parts.fields.index(originals[0])
    parts.fields[first] = _list_from(_author_text(originals, authors), lst)
    parts.fields = [f for f in parts.fields if f not in originals[1:]]
    _add_addresses(parts, h.REPLY_TO if reply_to == "poster" else h.CC, authors)
    for f in originals:
        parts.fields.append(_renamed(f, X_ORIGINAL_FROM))
    for f in senders:
        parts.fields.append(_renamed(f, X_ORIGINAL_SENDER))


def _mailboxes(values: list[str]) -> list[tuple[str, str]]:
    """(decoded display name, address) of every mailbox in these address fields, groups
    flattened; parts that are not an address are dropped."""
    found: list[tuple[str, str]] = []
    for name, address in _getaddresses(values):
        address = address.strip()
        if _ADDRESS.fullmatch(address):
            found.append((_clean(decode_header(name)), address))
    return found


def _getaddresses(values: list[str]) -> list[tuple[str, str]]:
    """email.utils.getaddresses, reading each RFC 2047 encoded word as the one atom it is:
    the stdlib would take a ':' or ',' inside one (which a sender can put there) for
    group or list syntax, and find addresses nobody wrote."""
    text = ", ".join(values)
    words: dict[str, str] = {}

    def protect(m: re.Match[str]) -> str:
        n = len(words)
        while f"lgEW{n}x" in text:
            n += 1_000_000  # a token already in the text: pick one that is not
        words[f"lgEW{n}x"] = m.group(0)
        return f"lgEW{n}x"

    protected = _ENCODED_WORD.sub(protect, text)
    if not words:
        return getaddresses([text])
    token = re.compile("|".join(re.escape(t) for t in words))

    def restore(value: str) -> str:
        return token.sub(lambda m: words[m.group(0)], value)

    return [(restore(name), restore(address)) for name, address in getaddresses([protected])]


def _clean(text: str) -> str:
    """Text fit for a display name: no control characters (CR and LF among them), no
    runs of blanks."""
    return re.sub(r"\s+", " ", _CONTROL.sub(" ", text)).strip()


def _author_text(originals: list[Field], authors: list[tuple[str, str]]) -> str:
    """Who wrote it, for the display name: names (or addresses) of all authors."""
    if authors:
        text = ", ".join(name or address for name, address in authors)
    else:
        # No address we can read: the From as it was is still the best name we have.
        text = _clean(decode_header(" ".join(f.value for f in originals)))
    text = _unescaped(text)
    if len(text) > MAX_DISPLAY_NAME:
        text = text[:MAX_DISPLAY_NAME - 3].rstrip() + "..."
    return text or "unknown sender"


def _unescaped(text: str) -> str:
    """Raw 8-bit bytes (kept as surrogate escapes) read as UTF-8 where they are, else as
    Windows-1252, as gateway.message.decode_header reads them."""
    raw = text.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


def _list_from(author: str, lst: ListIdentity) -> Field:
    list_name = _clean(lst.display_name) or lst.name
    return Field(h.FROM, f"{h.FROM}: ".encode("ascii")
                 + _mailbox(f"{author} via {list_name}", lst.post_address, h.FROM))


def _mailbox(name: str, address: str, field_name: str) -> bytes:
    """A name-addr: the name as a quoted string, or RFC 2047 encoded words when it is
    not ASCII (never the address: encoded words there are not decoded)."""
    raw_address = address.encode("utf-8", "surrogateescape")
    name = _clean(_unescaped(name))
    if not name:
        return raw_address
    if name.isascii():
        phrase = ('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"').encode("ascii")
    else:
        phrase = email.header.Header(name, "utf-8", header_name=field_name).encode(
            linesep="\r\n").encode("ascii")
    if CRLF in phrase:
        used = len(phrase) - phrase.rfind(CRLF) - 2
    else:
        used = len(field_name) + 2 + len(phrase)
    fold = CRLF + b" " if used + len(raw_address) + 3 > 78 else b" "
    return phrase + fold + b"<" + raw_address + b">"


def _add_addresses(parts: Parts, name: str, mailboxes: list[tuple[str, str]]) -> None:
    """Append mailboxes to the address field `name` (merged into one field, kept where the
    first one was), leaving out addresses it already holds."""
    existing = [f for f in parts.fields if f.name.lower() == name.lower()]
    present = {address.lower() for _n, address in _getaddresses([f.value for f in existing])}
    added: list[bytes] = []
    for display, address in mailboxes:
        if address.lower() not in present:
            present.add(address.lower())
            added.append(_mailbox(display, address, name))
    if not added:
        return
    entries = [f.raw.partition(b":")[2].strip().rstrip(b", \t") for f in existing]
    entries = [e for e in entries if e] + added
    field = Field(name, name.encode("ascii") + b": " + (b"," + CRLF + b" ").join(entries))
    if existing:
        at = parts.fields.index(existing[0])
        parts.fields[at] = field
        parts.fields = [f for f in parts.fields if f not in existing[1:]]
    else:
        parts.fields.append(field)


def _renamed(original: Field, name: str) -> Field:
    """The same value, byte for byte, under another name."""
    return Field(name, name.encode("ascii") + b":" + original.raw.partition(b":")[2])


# ------------------------------------------------------------------------ wrapping


def wrap(raw: bytes, lst: ListIdentity, *, subject: str) -> bytes:
    """The post as a message/rfc822 part of a new message From the list (Mailman's
    wrap_message): its author's signature still verifies inside.

    The wrapper is From "<author> via <list>" at the list's post address, with the
    author in Reply-To after the post's own Reply-To; it repeats the post's To, Cc, Date,
    Message-ID, In-Reply-To and References (threading and addressing), and carries
    `subject`. Decoration (list fields, footer) is for the wrapper, after this.
    Line endings are made CRLF; the post's bytes are otherwise untouched.
    """
    post = normalise_eol(raw)
    if not post.endswith(CRLF):
        post += CRLF
    original = split(post)
    froms = [f for f in original.fields if f.name.lower() == h.FROM.lower()]
    authors = _mailboxes([f.value for f in froms])
    outer = Parts([_list_from(_author_text(froms, authors), lst)])
    outer.fields += [f for f in original.fields if f.name.lower() == h.REPLY_TO.lower()]
    _add_addresses(outer, h.REPLY_TO, authors)
    for name in _WRAPPER_COPIES:
        outer.fields += [f for f in original.fields if f.name.lower() == name.lower()]
    outer.add(h.SUBJECT, _clean(subject) or "(no subject)")
    outer.add(h.MIME_VERSION, "1.0")
    boundary = _boundary(post)
    outer.add(h.CONTENT_TYPE, f'multipart/mixed; boundary="{boundary}"')
    # RFC 2046 5.2.1: a message/rfc822 part is never base64 or quoted-printable.
    encoding = "7bit" if post.isascii() else "8bit"
    delimiter = b"--" + boundary.encode("ascii")
    outer.body = (
        b"This is a message from the list in MIME format: the post is attached.\r\n"
        + delimiter + CRLF
        + b"Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n"
        + b"Content-Transfer-Encoding: " + encoding.encode("ascii") + CRLF + CRLF
        # The line break before a delimiter belongs to it (RFC 2046 5.1.1), so one more:
        # the part is the post to the last byte.
        + post + CRLF + delimiter + b"--" + CRLF)
    return outer.to_bytes()


def _boundary(post: bytes) -> str:
    """A boundary that occurs nowhere in the post (RFC 2046 5.1.1)."""
    seed = hashlib.sha256(post).hexdigest()
    for n in range(1000):
        boundary = f"=_listgate_wrap_{seed[:24]}_{n}"
        if boundary.encode("ascii") not in post:
            return boundary
    raise AssertionError("no boundary absent from the post")  # beyond any real message
