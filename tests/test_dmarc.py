"""DMARC mitigation: From rewriting and wrapping, on crafted tables and the odd corpus."""

from __future__ import annotations

import collections
import csv
import email.message
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.authentication import Resolver, verify
from gateway.decorate import Trace, decorate_post
from gateway.dmarc import Mitigation, needs_mitigation, rewrite_from, wrap
from gateway.errors import ConfigError
from gateway.identity import ListIdentity
from gateway.message import normalise_eol, split
from tests.helpers_unit import NO_CORPUS, corpus_files, parse_default
from tests.support import CORPUS

LIST = ListIdentity("discuss", "example.org", "Discuss", "[Discuss]", None)
LIST_ADDRESS = "discuss@example.org"
DKIM_DIR = CORPUS / "dkim"


def message(headers: str, body: str = "Hello, list.\n") -> bytes:
    """A post: the given header fields (From among them), then the usual ones."""
    text = (headers + "To: discuss@example.org\nSubject: Topic\nMessage-ID: <m1@example.net>\n"
            "Date: Sun, 22 Nov 2026 10:00:00 +0000\n\n" + body)
    return normalise_eol(text.encode("utf-8"))


def rewritten(raw: bytes, lst: ListIdentity = LIST, *, reply_to: str = "poster") -> bytes:
    parts = split(raw)
    rewrite_from(parts, lst, reply_to=reply_to)
    return parts.to_bytes()


def addresses(msg: email.message.EmailMessage, name: str) -> list[str]:
    header = msg[name]
    return [] if header is None else [a.addr_spec for a in header.addresses]


def display_name(msg: email.message.EmailMessage) -> str:
    [address] = msg["From"].addresses
    assert address.addr_spec == LIST_ADDRESS
    return str(address.display_name)


# ---------------------------------------------------------------------- policy


@pytest.mark.parametrize(("policy", "expected"), [
    ("reject", True), ("quarantine", True), (" Reject ", True), ("none", False),
    (None, False), ("", False), ("bogus", False),
])
def test_needs_mitigation_for_enforcing_policies_only(policy: str | None, expected: bool) -> None:
    assert needs_mitigation(policy) is expected


def test_mitigation_values_are_the_config_words() -> None:
    assert [m.value for m in Mitigation] == ["none", "rewrite", "wrap"]
    assert Mitigation("wrap") is Mitigation.WRAP


# ------------------------------------------------------------------- rewriting


@dataclass(frozen=True)
class Case:
    headers: str              # the post's From (and any Reply-To, Cc, Sender)
    display: str              # the new From's display name, decoded
    reply_to: list[str]       # Reply-To's addresses afterwards
    cc: list[str] | None = None   # Cc's addresses afterwards, when the case is about Cc
    mode: str = "poster"


REWRITES = {
    "name and address": Case(
        "From: Alice Example <alice@example.com>\n",
        "Alice Example via Discuss", ["alice@example.com"]),
    "address only": Case(
        "From: alice@example.com\n", "alice@example.com via Discuss", ["alice@example.com"]),
    "angle address only": Case(
        "From: <alice@example.com>\n", "alice@example.com via Discuss", ["alice@example.com"]),
    "name in a comment": Case(
        "From: alice@example.com (Alice Example)\n",
        "Alice Example via Discuss", ["alice@example.com"]),
    "quoted name with a comma": Case(
        'From: "Doe, John" <john@example.com>\n', "Doe, John via Discuss",
        ["john@example.com"]),
    "RFC 2047 UTF-8 name": Case(
        "From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jm@example.de>\n",
        "Jürgen Müller via Discuss", ["jm@example.de"]),
    "RFC 2047 Latin-1 base64 name": Case(
        "From: =?iso-8859-1?b?UmVu6Q==?= <rene@example.fr>\n", "René via Discuss",
        ["rene@example.fr"]),
    "raw UTF-8 name": Case(
        "From: Zoë Ådahl <zoe@example.se>\n", "Zoë Ådahl via Discuss", ["zoe@example.se"]),
    "existing Reply-To kept first": Case(
        "From: Alice <alice@example.com>\nReply-To: Team <team@example.com>\n",
        "Alice via Discuss", ["team@example.com", "alice@example.com"]),
    "existing Reply-To already the author": Case(
        "From: Alice <alice@example.com>\nReply-To: ALICE@example.com\n",
        "Alice via Discuss", ["ALICE@example.com"]),
    "two Reply-To fields merged": Case(
        "From: Alice <alice@example.com>\nReply-To: a@example.net\nReply-To: b@example.net\n",
        "Alice via Discuss", ["a@example.net", "b@example.net", "alice@example.com"]),
    "several authors with a Sender": Case(
        "From: Alice <alice@example.com>, bob@example.net\nSender: alice@example.com\n",
        "Alice, bob@example.net via Discuss", ["alice@example.com", "bob@example.net"]),
    "two From fields": Case(
        "From: Alice <alice@example.com>\nFrom: Bob <bob@example.net>\n",
        "Alice, Bob via Discuss", ["alice@example.com", "bob@example.net"]),
    "group syntax": Case(
        "From: Authors: alice@example.com, Bob <bob@example.net>;\n",
        "alice@example.com, Bob via Discuss", ["alice@example.com", "bob@example.net"]),
    "author in Cc": Case(
        "From: Alice <alice@example.com>\nCc: carol@example.org\nReply-To: r@example.com\n",
        "Alice via Discuss", ["r@example.com"], ["carol@example.org", "alice@example.com"],
        mode="cc"),
    "author in a new Cc": Case(
        "From: Alice <alice@example.com>\n", "Alice via Discuss", [], ["alice@example.com"],
        mode="cc"),
    "no usable address": Case("From: Alice Example\n", "Alice Example via Discuss", []),
    "empty From": Case("From:\n", "unknown sender via Discuss", []),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=k) for k, c in REWRITES.items()])
def test_rewrite_from_makes_the_list_the_author_of_record(case: Case) -> None:
    raw = message(case.headers)
    out = rewritten(raw, reply_to=case.mode)
    msg = parse_default(out)
    assert len(msg.get_all("From") or []) == 1
    assert display_name(msg) == case.display
    assert addresses(msg, "Reply-To") == case.reply_to
    if case.cc is not None:
        assert addresses(msg, "Cc") == case.cc
    assert msg["Sender"] is None
    # The exact original stays, byte for byte, one X-Original-From per From field.
    originals = [f.raw.partition(b":")[2] for f in split(raw).fields if f.name == "From"]
    assert [f.raw.partition(b":")[2] for f in split(out).fields
            if f.name == "X-Original-From"] == originals
    assert out.partition(b"\r\n\r\n")[2] == raw.partition(b"\r\n\r\n")[2]
    assert split(out).fields[0].raw.isascii()  # RFC 2047 where the name needs it


def test_rewrite_from_keeps_the_sender_as_x_original_sender() -> None:
    raw = message("From: Alice <alice@example.com>, bob@example.net\n"
                  "Sender: Alice <alice@example.com>\n")
    msg = parse_default(rewritten(raw))
    assert msg["Sender"] is None
    assert msg["X-Original-Sender"] == "Alice <alice@example.com>"


def test_rewrite_from_leaves_every_other_field_as_it_was() -> None:
    raw = message("Received: from a by b; Sun, 22 Nov 2026 10:00:00 +0000\n"
                  "From: Alice <alice@example.com>\nX-Thing: =?bogus?q?x?=\n")
    before = [f.raw for f in split(raw).fields]
    after = [f.raw for f in split(rewritten(raw)).fields]
    assert after[0] == before[0] and after[2:7] == before[2:]
    assert after[1].startswith(b'From: "Alice via Discuss" <discuss@example.org>')


@pytest.mark.parametrize("headers", [
    # A quoted name trying to close its quotes and add a recipient.
    'From: "Mallory\\" <m@evil.example>, \\"x" <mallory@evil.example>\n',
    # Encoded words that decode to a line break and a new field.
    "From: =?utf-8?q?Eve=0D=0ABcc:_victim@example.org?= <eve@example.com>\n",
    "From: =?utf-8?b?RXZlDQpCY2M6IHZpY3RpbUBleGFtcGxlLm9yZw==?= <eve@example.com>\n",
    # Angle brackets, semicolons, backslashes and NUL in a name.
    'From: "<admin@example.org>; \\\\ \\"\x00" <eve@example.com>\n',
])
def test_rewrite_from_cannot_be_made_to_add_fields_or_recipients(headers: str) -> None:
    raw = message(headers)
    out = rewritten(raw)
    names = sorted(f.name for f in split(out).fields)
    assert names == sorted(["From", "Reply-To", "X-Original-From", "To", "Subject",
                            "Message-ID", "Date"])
    msg = parse_default(out)
    assert msg["Bcc"] is None and addresses(msg, "To") == [LIST_ADDRESS]
    display_name(msg)  # exactly one mailbox: the list
    assert len(addresses(msg, "Reply-To")) == 1
    assert b"\x00" not in out.partition(b"X-Original-From")[0]


def test_rewrite_from_with_a_non_ascii_list_name_and_a_long_name() -> None:
    lst = ListIdentity("discuss", "example.org", 'Größe "Liste"', "[G]", None)
    raw = message("From: " + "Bartholomew " * 30 + "<b@example.com>\n")
    out = rewritten(raw, lst)
    msg = parse_default(out)
    name = display_name(msg)
    assert name.endswith('... via Größe "Liste"') and len(name) < 250
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))
    assert out.partition(b"\r\n\r\n")[0].isascii()


def test_rewrite_from_removes_a_forged_x_original_from() -> None:
    raw = message("X-Original-From: ceo@bank.example\nFrom: alice@example.com\n")
    msg = parse_default(rewritten(raw))
    assert msg.get_all("X-Original-From") == ["alice@example.com"]


@pytest.mark.parametrize("headers", ["", "From: Discuss <DISCUSS@example.org>\n"])
def test_rewrite_from_leaves_a_post_without_author_or_from_the_list(headers: str) -> None:
    raw = message(headers)
    assert rewritten(raw) == raw


def test_rewrite_from_twice_is_rewriting_once() -> None:
    once = rewritten(message("From: Alice <alice@example.com>\nReply-To: t@example.com\n"))
    assert rewritten(once) == once


def test_rewrite_from_refuses_an_unknown_reply_to_choice() -> None:
    with pytest.raises(ConfigError, match="reply_to"):
        rewrite_from(split(message("From: a@example.com\n")), LIST, reply_to="list")


# ------------------------------------------------------------------------ wrap


def parts_of(wrapped: bytes) -> tuple[email.message.EmailMessage, bytes]:
    """The wrapper, parsed, and the bytes of the post inside it (taken from the raw
    bytes between the boundaries, as a verifier would)."""
    msg = parse_default(wrapped)
    assert msg.get_content_type() == "multipart/mixed"
    [inner] = list(msg.iter_parts())
    assert inner.get_content_type() == "message/rfc822"
    boundary = msg.get_boundary()
    assert boundary is not None
    delimiter = b"--" + boundary.encode()
    section = wrapped.split(delimiter + b"\r\n", 1)[1].rsplit(b"\r\n" + delimiter + b"--", 1)[0]
    return msg, section.partition(b"\r\n\r\n")[2]


def test_wrap_carries_the_post_untouched_from_the_list() -> None:
    raw = message("From: Alice <alice@example.com>\nCc: carol@example.org\n"
                  "Reply-To: team@example.com\nIn-Reply-To: <m0@example.net>\n"
                  "References: <m-1@example.net> <m0@example.net>\n")
    wrapped = wrap(raw, LIST, subject="[Discuss] Topic")
    msg, inner = parts_of(wrapped)
    assert inner == raw
    assert display_name(msg) == "Alice via Discuss"
    assert addresses(msg, "Reply-To") == ["team@example.com", "alice@example.com"]
    assert addresses(msg, "To") == [LIST_ADDRESS] and addresses(msg, "Cc") == ["carol@example.org"]
    assert msg["Subject"] == "[Discuss] Topic"
    for name in ("Message-ID", "Date", "In-Reply-To", "References"):
        assert msg[name] == parse_default(raw)[name], name
    assert msg["Content-Transfer-Encoding"] is None
    [part] = list(msg.iter_parts())
    assert part["Content-Transfer-Encoding"] == "7bit"
    assert part.get_content_disposition() == "inline"


def test_wrap_8bit_post_and_a_hostile_subject() -> None:
    raw = message("From: Zoë <zoe@example.se>\n", body="Grüße\n")
    wrapped = wrap(raw, LIST, subject="Größe\r\nBcc: victim@example.org")
    msg, inner = parts_of(wrapped)
    assert inner == raw
    assert msg["Subject"] == "Größe Bcc: victim@example.org" and msg["Bcc"] is None
    [part] = list(msg.iter_parts())
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert wrapped.partition(b"\r\n\r\n")[0].isascii()


def test_wrap_without_date_or_message_id_leaves_them_to_decoration() -> None:
    raw = normalise_eol(b"From: alice@example.com\nSubject: x\n\nbody")  # no final newline
    wrapped = wrap(raw, LIST, subject="x")
    msg, inner = parts_of(wrapped)
    assert inner == raw + b"\r\n"
    assert msg["Date"] is None and msg["Message-ID"] is None
    trace = Trace(helo="mx.example.net", peer="192.0.2.7", hostname="lists.test",
                  protocol="lmtp", queue_id=1, recipient=LIST_ADDRESS,
                  received_at=1_800_000_000.0)
    decorated = parse_default(decorate_post(wrapped, LIST, footer="-- \nDiscuss\n", trace=trace))
    assert decorated["Message-ID"] and decorated["Date"] and decorated["List-Id"]
    types = [p.get_content_type() for p in decorated.iter_parts()]
    assert types == ["message/rfc822", "text/plain"]  # the footer goes beside the post


def test_wrap_keeps_the_authors_dkim_signature_valid_inside() -> None:
    if not DKIM_DIR.is_dir():
        pytest.skip(NO_CORPUS)
    records: dict[str, list[str]] = collections.defaultdict(list)
    with open(DKIM_DIR / "keys.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            records[row["name"]].append(row["txt_record"])
    resolver = Resolver(records=records)
    raw = (DKIM_DIR / "dkimpy__rfc6376.signed.msg.eml").read_bytes()
    assert verify(raw, resolver).dkim_aligned_pass
    _msg, inner = parts_of(wrap(raw, LIST, subject="[Discuss] x"))
    assert verify(inner, resolver).dkim_aligned_pass


# ------------------------------------------------------------------ odd corpus


@pytest.mark.parametrize("path", corpus_files("odd"))
def test_rewrite_from_and_wrap_survive_odd_mail(path: Path) -> None:
    raw = path.read_bytes()
    parts = split(raw)
    had_from = parts.get("From") is not None
    untouched = {f.raw for f in parts.fields
                 if f.name.lower() not in ("from", "reply-to", "sender", "x-original-from",
                                           "x-original-sender")}
    rewrite_from(parts, LIST)
    out = parts.to_bytes()
    msg = parse_default(out)
    if had_from:
        display_name(msg)
        addresses(msg, "Reply-To")
    assert untouched <= {f.raw for f in split(out).fields}
    # Decoding is the stdlib's business for fields we copied as they came.
    for name in ("From", "Reply-To", "X-Original-From", "X-Original-Sender"):
        for value in msg.get_all(name) or []:
            str(value)

    wrapped = wrap(raw, LIST, subject="[Discuss] odd")
    outer, inner = parts_of(wrapped)
    expected = normalise_eol(raw)
    assert inner == (expected if expected.endswith(b"\r\n") else expected + b"\r\n")
    if had_from:
        display_name(outer)
    assert re.match(rb"From: ", wrapped)
