"""Decoration on the way out: list headers, trace, subject prefix, and footers in every body."""

from __future__ import annotations

import base64
import email.utils
import logging
import quopri
from pathlib import Path

import pytest

from gateway.decorate import (
    ListIdentity,
    Trace,
    decorate_post,
    message_id_for,
    prefixed_subject,
    received_field,
)
from gateway.message import normalise_eol, split
from tests.helpers_unit import corpus_files, parse_default

LIST = ListIdentity("discuss", "example.org", "Discuss", "[Discuss]", None)
ARCHIVED = ListIdentity("discuss", "example.org", 'The "Discuss" List', "[Discuss]",
                        "https://lists.example.org/archive/discuss/")
TRACE = Trace(helo="mx.example.net", peer="192.0.2.7", hostname="lists.test", protocol="lmtp",
              queue_id=42, recipient="discuss@example.org", received_at=1_800_000_000.0)
FOOTER = "--\nDiscuss mailing list -- discuss@example.org\nTo leave: discuss-leave@example.org\n"
FOOTER_LINE = "Discuss mailing list -- discuss@example.org"


def message(headers: str, body: bytes | str, *, eol: str = "\r\n") -> bytes:
    base = ("From: Alice <alice@example.net>\nTo: discuss@example.org\nSubject: Topic\n"
            "Message-ID: <m1@example.net>\nDate: Sun, 22 Nov 2026 10:00:00 +0000\n")
    head = (base + headers).replace("\n", eol).encode("ascii")
    data = body.encode("utf-8") if isinstance(body, str) else body
    return head + eol.encode() + data


def decorate(raw: bytes, lst: ListIdentity = LIST, footer: str = FOOTER) -> bytes:
    return decorate_post(raw, lst, footer=footer, trace=TRACE)


def header_names(data: bytes) -> list[str]:
    return [f.name for f in split(data).fields]


# -- headers -----------------------------------------------------------------------

def test_decorate_adds_the_list_fields() -> None:
    out = decorate(message("", "Hello.\n"))
    msg = parse_default(out)
    assert msg["List-Id"] == '"Discuss" <discuss.example.org>'
    assert msg["List-Post"] == "<mailto:discuss@example.org>"
    assert msg["List-Help"] == "<mailto:discuss-request@example.org?subject=help>"
    assert msg["List-Subscribe"] == "<mailto:discuss-join@example.org>"
    assert msg["List-Unsubscribe"] == "<mailto:discuss-leave@example.org>"
    assert msg["List-Owner"] == "<mailto:discuss-owner@example.org>"
    assert msg["List-Archive"] is None
    assert msg["Precedence"] == "list"
    assert msg["X-Loop"] == "discuss@example.org"


def test_decorate_adds_list_archive_only_when_the_list_has_one() -> None:
    out = decorate(message("", "Hello.\n"), ARCHIVED)
    msg = parse_default(out)
    assert msg["List-Archive"] == "<https://lists.example.org/archive/discuss/>"
    # The display name is an RFC 5322 quoted string, quotes escaped.
    assert split(out).get("List-Id") == '"The \\"Discuss\\" List" <discuss.example.org>'


def test_decorate_puts_a_received_field_first() -> None:
    out = decorate(message("Received: from older.example by mx.example.net; x\n", "Hi.\n"))
    fields = split(out).fields
    assert fields[0].name == "Received"
    assert [f.raw for f in fields[1:] if f.name == "Received"] == [
        b"Received: from older.example by mx.example.net; x"]
    value = fields[0].value
    assert value.startswith("from mx.example.net (192.0.2.7) by lists.test (Listgate) with LMTP")
    assert "id 42 for <discuss@example.org>;" in value
    assert value.endswith(email.utils.formatdate(TRACE.received_at))
    assert value == received_field(TRACE)


def test_decorate_received_field_cleans_the_helo_name() -> None:
    trace = Trace("evil\r\nBcc: x@example.com", "192.0.2.7", "lists.test", "smtp", 1,
                  "discuss@example.org", 0.0)
    assert received_field(trace).startswith("from evilBcc:x@example.com (192.0.2.7) by")
    assert received_field(Trace("", "192.0.2.7", "lists.test", "smtp", 1, "d@example.org",
                                0.0)).startswith("from unknown (192.0.2.7)")


def test_decorate_removes_the_posters_own_list_fields() -> None:
    raw = message(
        "List-Id: Other <other.example.com>\n"
        "List-Unsubscribe: <mailto:evil@example.com>\n"
        "list-post: <mailto:elsewhere@example.com>\n"
        "List-Archive: <https://evil.example.com/>\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
        "Precedence: bulk\n"
        "X-Loop: other@example.com\n"
        "Return-Path: <bounce@example.com>\n"
        "Delivered-To: someone@example.com\n", "Hi.\n")
    out = decorate(raw)
    parts = split(out)
    for name in ("List-Id", "List-Post", "List-Unsubscribe", "Precedence", "X-Loop"):
        assert len(parts.get_all(name)) == 1, name
    assert parts.get("List-Id") == '"Discuss" <discuss.example.org>'
    assert parts.get("X-Loop") == "discuss@example.org"
    assert parts.get("Precedence") == "list"
    for gone in ("List-Archive", "List-Unsubscribe-Post", "Return-Path", "Delivered-To"):
        assert parts.get(gone) is None, gone
    assert b"evil" not in out and b"elsewhere@" not in out and b"other.example.com" not in out


def test_decorate_keeps_unknown_headers_byte_for_byte() -> None:
    odd = (b"X-Odd:   lots   of   space\r\n\tand a fold \xe9\xff\r\n"
           b"x-lower-case: kept\r\n"
           b"Authentication-Results: mx.example.net; dkim=pass header.d=example.net\r\n"
           b"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=s;\r\n"
           b"  h=from:to:subject; bh=abc=; b=def=\r\n")
    raw = message("", "Hi.\n").replace(b"\r\n\r\n", b"\r\n" + odd + b"\r\n", 1)
    out = decorate(raw)
    assert odd in out
    assert b"From: Alice <alice@example.net>\r\nTo: discuss@example.org\r\n" in out


def test_decorate_keeps_message_id_and_date_when_present() -> None:
    out = decorate(message("", "Hi.\n"))
    parts = split(out)
    assert parts.get_all("Message-ID") == ["<m1@example.net>"]
    assert parts.get_all("Date") == ["Sun, 22 Nov 2026 10:00:00 +0000"]


def test_decorate_adds_message_id_and_date_when_missing() -> None:
    raw = b"From: alice@example.net\r\nSubject: bare\r\n\r\nHi.\r\n"
    out = decorate(raw)
    parts = split(out)
    assert parts.get_all("Message-ID") == [message_id_for(raw, "example.org")]
    assert parts.get("Message-ID").endswith("@example.org>")  # type: ignore[union-attr]
    assert parts.get_all("Date") == [email.utils.formatdate(TRACE.received_at)]
    # The same post gets the same Message-ID in every copy; another post another one.
    assert decorate(raw) == out
    assert message_id_for(raw + b"x", "example.org") != message_id_for(raw, "example.org")


def test_decorate_prefixes_the_subject() -> None:
    out = decorate(message("", "Hi.\n").replace(b"Subject: Topic", b"Subject: Re: [Discuss] Topic"))
    assert parse_default(out)["Subject"] == "[Discuss] Re: Topic"
    assert len(split(out).get_all("Subject")) == 1


def test_decorate_adds_a_subject_when_there_is_none() -> None:
    out = decorate(b"From: alice@example.net\r\n\r\nHi.\r\n")
    assert parse_default(out)["Subject"] == "[Discuss] (no subject)"


def test_decorate_decodes_and_re_encodes_an_rfc_2047_subject() -> None:
    raw = message("", "Hi.\n").replace(
        b"Subject: Topic", b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus =?iso-8859-1?q?K=F6ln?=")
    out = decorate(raw)
    subject = split(out).fields
    assert all(f.raw.isascii() for f in subject)
    assert parse_default(out)["Subject"] == "[Discuss] Grüße aus Köln"


@pytest.mark.parametrize("subject, decoded", [
    (b"caf\xe9 ol\xe9", "café olé"),  # Windows-1252, the usual culprit
    (b"caf\xc3\xa9", "café"),  # UTF-8 without RFC 2047
])
def test_decorate_survives_a_raw_8bit_subject(subject: bytes, decoded: str) -> None:
    raw = message("", "Hi.\n").replace(b"Subject: Topic", b"Subject: " + subject)
    out = decorate(raw)
    assert all(f.raw.isascii() for f in split(out).fields if f.name == "Subject")
    assert parse_default(out)["Subject"] == f"[Discuss] {decoded}"


@pytest.mark.parametrize("subject, prefix, expected", [
    ("hello", "[p]", "[p] hello"),
    ("Re: [p] x", "[p]", "[p] Re: x"),
    ("RE:  [p]   x", "[p]", "[p] RE: x"),
    ("[p] x", "[p]", "[p] x"),
    ("[p] Re: x", "[p]", "[p] Re: x"),
    ("Re: [p] Re: x", "[p]", "[p] Re: x"),
    ("Re: Re: x", "[p]", "[p] Re: x"),
    ("Aw: [p] x", "[p]", "[p] Aw: x"),
    ("Fwd: x", "[p]", "[p] Fwd: x"),
    ("Review: x", "[p]", "[p] Review: x"),
    ("", "[p]", "[p] (no subject)"),
    ("[p]", "[p]", "[p] (no subject)"),
    ("x", "[p] ", "[p] x"),
    ("Re: x", "", "Re: x"),
    ("[p] x", "", "[p] x"),
    ("", "", "(no subject)"),
    ("Grüße", "[Liste]", "[Liste] Grüße"),
])
def test_decorate_prefixed_subject(subject: str, prefix: str, expected: str) -> None:
    assert prefixed_subject(subject, prefix) == expected


def test_decorate_prefix_is_idempotent() -> None:
    once = prefixed_subject("Re: [p] topic", "[p]")
    assert prefixed_subject(once, "[p]") == once
    assert prefixed_subject("Re: " + once, "[p]") == once


def test_decorate_with_no_prefix_leaves_the_subject() -> None:
    lst = ListIdentity("discuss", "example.org", "Discuss", "", None)
    out = decorate(message("", "Hi.\n"), lst)
    assert split(out).get_all("Subject") == ["Topic"]


# -- footers ---------------------------------------------------------------------------

def body_text(out: bytes) -> str:
    msg = parse_default(out)
    assert not msg.is_multipart()
    content = msg.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")  # 7bit/8bit content keeps the wire's CRLF


def test_decorate_footer_on_7bit_text() -> None:
    raw = message("Content-Type: text/plain; charset=us-ascii\n", "Line one.\nLine two.\n")
    out = decorate(raw)
    text = body_text(out)
    assert text.startswith("Line one.\nLine two.\n")
    assert FOOTER_LINE in text
    assert out.endswith(b"Line one.\r\nLine two.\r\n--\r\n" + FOOTER_LINE.encode()
                        + b"\r\nTo leave: discuss-leave@example.org\r\n")
    assert split(out).get("Content-Transfer-Encoding") is None


def test_decorate_footer_on_a_body_without_final_newline() -> None:
    out = decorate(message("", "no newline at the end"))
    text = body_text(out)
    assert text.startswith("no newline at the end\n--\n")


def test_decorate_footer_on_8bit_latin1_text_keeps_the_charset() -> None:
    raw = message("MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
                  "Content-Transfer-Encoding: 8bit\n", "Caf\xe9 cr\xe8me\n".encode("latin-1"))
    out = decorate(raw)
    assert b"Caf\xe9 cr\xe8me\r\n" in out
    msg = parse_default(out)
    assert msg.get_content_charset() == "iso-8859-1"
    text = body_text(out)
    assert text.startswith("Café crème\n")
    assert FOOTER_LINE in text


def test_decorate_non_ascii_footer_on_latin1_text_switches_to_utf8() -> None:
    raw = message("MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1; "
                  "format=flowed\nContent-Transfer-Encoding: 8bit\n",
                  "Caf\xe9\n".encode("latin-1"))
    footer = "Liste « Discuss » — désinscription : discuss-leave@example.org 🎈\n"
    out = decorate(raw, footer=footer)
    msg = parse_default(out)
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_param("format") == "flowed"
    text = body_text(out)
    assert text.startswith("Café\n")
    assert footer in text


def test_decorate_footer_on_quoted_printable_text() -> None:
    original = "Caf\xe9 na\xefve, with a line long enough to need a soft break " * 3 + "\n"
    encoded = quopri.encodestring(original.encode("latin-1"))
    raw = message("MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
                  "Content-Transfer-Encoding: quoted-printable\n", encoded)
    out = decorate(raw)
    assert split(out).get("Content-Transfer-Encoding") == "quoted-printable"
    text = body_text(out)
    assert text.startswith(original)
    assert FOOTER_LINE in text


def test_decorate_footer_on_base64_text() -> None:
    original = "Grüße aus Köln.\nZweite Zeile.\n"
    encoded = base64.encodebytes(original.encode("utf-8"))
    raw = message("MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
                  "Content-Transfer-Encoding: base64\n", encoded)
    out = decorate(raw)
    assert split(out).get("Content-Transfer-Encoding") == "base64"
    text = body_text(out)
    assert text.startswith(original)
    assert FOOTER_LINE in text
    body = split(out).body
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))


@pytest.mark.parametrize("headers, body", [
    ("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n",
     b"!!!! not base64 at all ????\n"),
    ("Content-Type: text/plain; charset=x-no-such-charset\n", b"text\n"),
    ("Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: x-uuencode\n",
     b"begin 644 f\n`\nend\n"),
])
def test_decorate_text_we_cannot_reencode_is_wrapped_untouched(headers: str, body: bytes) -> None:
    out = decorate(message("MIME-Version: 1.0\n" + headers, body))
    msg = parse_default(out)
    assert msg.get_content_type() == "multipart/mixed"
    first, footer = list(msg.iter_parts())
    # The line break before a boundary belongs to the boundary (RFC 2046 5.1.1).
    payload = first.get_payload(decode=False)
    assert isinstance(payload, str)
    assert payload.encode("ascii", "surrogateescape") + b"\r\n" == normalise_eol(body)
    assert FOOTER_LINE in footer.get_content()


MIXED = b"""MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="XYZ"

This is a multi-part message in MIME format.
--XYZ
Content-Type: text/plain; charset=us-ascii

The text part.

--XYZ
Content-Type: application/octet-stream; name="data.bin"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="data.bin"

AAECAwQFBgcICQ==

--XYZ--
epilogue
"""


def test_decorate_multipart_mixed_gets_an_extra_part() -> None:
    raw = message("", b"").rstrip(b"\r\n").replace(b"\r\nDate", b"\r\nDate") + b"\r\n"
    raw = raw + MIXED.replace(b"\n", b"\r\n")
    before = parse_default(raw)
    out = decorate(raw)
    msg = parse_default(out)
    assert msg.get_content_type() == "multipart/mixed"
    assert msg.get_boundary() == "XYZ"
    parts = list(msg.iter_parts())
    old = list(before.iter_parts())
    assert len(parts) == len(old) + 1
    for a, b in zip(old, parts, strict=False):
        assert a.get_content_type() == b.get_content_type()
        assert a.get_payload(decode=True) == b.get_payload(decode=True)
    assert parts[1].get_payload(decode=True) == bytes(range(10))
    footer = parts[-1]
    assert footer.get_content_type() == "text/plain"
    assert FOOTER_LINE in footer.get_content()
    assert out.endswith(b"--XYZ--\r\nepilogue\r\n")


@pytest.mark.parametrize("footer", [
    "Désinscription : discuss-leave@example.org\n",
    "Unsubscribe — discuss-leave@example.org\n",
])
def test_decorate_multipart_mixed_with_non_ascii_footer(footer: str) -> None:
    raw = message("", b"").rstrip(b"\r\n") + b"\r\n" + MIXED.replace(b"\n", b"\r\n")
    msg = parse_default(decorate(raw, footer=footer))
    last = list(msg.iter_parts())[-1]
    assert last.get_content_charset() == "utf-8"
    assert last.get_content().replace("\r\n", "\n") == footer


def test_decorate_multipart_mixed_without_closing_boundary_is_left_unchanged(
        caplog: pytest.LogCaptureFixture) -> None:
    unclosed = MIXED.replace(b"--XYZ--\nepilogue\n", b"").replace(b"\n", b"\r\n")
    raw = message("", b"").rstrip(b"\r\n") + b"\r\n" + unclosed
    with caplog.at_level(logging.WARNING, logger="gateway.decorate"):
        out = decorate(raw)
    assert split(out).body == split(raw).body
    assert "without a usable closing boundary" in caplog.text
    assert parse_default(out)["List-Id"] == '"Discuss" <discuss.example.org>'


ALTERNATIVE = b"""MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="ALT"

--ALT
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Plain version, caf\xc3\xa9.
--ALT
Content-Type: text/html; charset=utf-8

<p>HTML version</p>
--ALT--
"""


def test_decorate_multipart_alternative_is_wrapped_in_mixed() -> None:
    raw = message("", b"").rstrip(b"\r\n") + b"\r\n" + ALTERNATIVE.replace(b"\n", b"\r\n")
    out = decorate(raw)
    msg = parse_default(out)
    assert msg.get_content_type() == "multipart/mixed"
    assert msg["MIME-Version"] == "1.0"
    assert len(split(out).get_all("MIME-Version")) == 1
    inner, footer = list(msg.iter_parts())
    assert inner.get_content_type() == "multipart/alternative"
    assert inner.get_boundary() == "ALT"
    plain, html = list(inner.iter_parts())
    # The line break before a boundary belongs to the boundary (RFC 2046 5.1.1).
    assert plain.get_content() == "Plain version, café."
    assert html.get_content() == "<p>HTML version</p>"
    assert FOOTER_LINE in footer.get_content()
    # The original body is carried over byte for byte.
    assert split(raw).body.replace(b"\r\n", b"\n") in out.replace(b"\r\n", b"\n")


def test_decorate_text_html_is_wrapped_with_the_part_intact() -> None:
    html = "<html><body><p>Hello <b>members</b> – ça va?</p></body></html>\n"
    raw = message("MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n"
                  "Content-Transfer-Encoding: 8bit\n", html)
    out = decorate(raw)
    msg = parse_default(out)
    assert msg.get_content_type() == "multipart/mixed"
    first, footer = list(msg.iter_parts())
    assert first.get_content_type() == "text/html"
    assert first["Content-Transfer-Encoding"] == "8bit"
    assert first.get_content() + "\n" == html  # its last line break goes with the boundary
    assert footer.get_content_type() == "text/plain"
    assert FOOTER_LINE in footer.get_content()
    # The content fields moved into the inner part: none left at the top but ours.
    top = split(out)
    assert top.get_all("Content-Type")[0].startswith("multipart/mixed")
    assert top.get("Content-Transfer-Encoding") is None


@pytest.mark.parametrize("footer", ["", "   \n", "\n"])
def test_decorate_without_footer_leaves_the_body(footer: str) -> None:
    raw = message("", "Body.\n")
    out = decorate(raw, footer=footer)
    assert split(out).body == b"Body.\r\n"


def test_decorate_never_changes_the_raw_input() -> None:
    raw = message("List-Id: <x.example.com>\n", "Body.\n")
    copy = bytes(raw)
    decorate(raw)
    assert raw == copy


# -- the corpus of odd messages ------------------------------------------------------------

@pytest.mark.parametrize("path", corpus_files("odd"))
def test_decorate_odd_corpus(path: Path) -> None:
    raw = path.read_bytes()
    out = decorate(raw)
    msg = parse_default(out)
    # A member's mail client sees our fields: nothing before them ended the header early.
    assert msg["List-Id"] == '"Discuss" <discuss.example.org>'
    assert msg["X-Loop"] == "discuss@example.org"
    assert msg["Precedence"] == "list"
