"""Tolerant header access over raw bytes: split, edit, re-serialise, make fields."""

from __future__ import annotations

import email.errors
import re
from pathlib import Path

import pytest

from gateway.message import (
    CRLF,
    Field,
    Parts,
    content_type,
    decode_header,
    make_field,
    normalise_eol,
    split,
)
from tests.helpers_unit import corpus_files, parse_default


def names(parts: Parts) -> list[str]:
    return [f.name for f in parts.fields]


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_message_split_on_uniform_line_endings(eol: bytes) -> None:
    raw = eol.join([b"From: alice@example.net", b"Subject: hi", b"", b"line one", b"line two",
                    b""])
    parts = split(raw)
    assert names(parts) == ["From", "Subject"]
    assert parts.get("subject") == "hi"
    assert parts.body == b"line one" + eol + b"line two" + eol
    assert parts.to_bytes() == (b"From: alice@example.net\r\nSubject: hi\r\n\r\n"
                                b"line one\r\nline two\r\n")


def test_message_split_on_mixed_line_endings() -> None:
    raw = b"From: alice@example.net\nSubject: mixed\r\nTo: bob@example.net\n\r\nbody\nend\r\n"
    parts = split(raw)
    assert names(parts) == ["From", "Subject", "To"]
    assert parts.body == b"body\nend\r\n"
    out = parts.to_bytes()
    assert out == (b"From: alice@example.net\r\nSubject: mixed\r\nTo: bob@example.net\r\n\r\n"
                   b"body\r\nend\r\n")


def test_message_folded_fields_keep_their_folding_and_unfold_in_values() -> None:
    raw = (b"Subject: a long\r\n subject\r\n\tacross lines\r\nTo: bob@example.net,\n"
           b"  carol@example.net\n\nbody\n")
    parts = split(raw)
    assert names(parts) == ["Subject", "To"]
    assert parts.fields[0].raw == b"Subject: a long\r\n subject\r\n\tacross lines"
    assert parts.get("Subject") == "a long subject across lines"
    assert parts.get("To") == "bob@example.net,  carol@example.net"
    assert parts.to_bytes().startswith(
        b"Subject: a long\r\n subject\r\n\tacross lines\r\nTo: bob@example.net,\r\n"
        b"  carol@example.net\r\n\r\n")


def test_message_first_line_that_is_a_continuation_is_kept() -> None:
    raw = b" orphan continuation\nFrom: alice@example.net\nSubject: s\n\nbody\n"
    parts = split(raw)
    assert parts.fields[0] == Field("", b" orphan continuation")
    assert parts.get("From") == "alice@example.net"
    assert parts.get("Subject") == "s"
    assert parts.body == b"body\n"
    assert parts.to_bytes() == normalise_eol(raw)


def test_message_header_without_blank_line_before_the_body() -> None:
    # The stdlib records MissingHeaderBodySeparatorDefect for this; we keep the text as body.
    raw = b"From: alice@example.net\nSubject: no separator\nthis line is the body\nand this\n"
    parts = split(raw)
    assert names(parts) == ["From", "Subject"]
    assert parts.body == b"this line is the body\nand this\n"
    out = parts.to_bytes()
    assert out == (b"From: alice@example.net\r\nSubject: no separator\r\n\r\n"
                   b"this line is the body\r\nand this\r\n")
    msg = parse_default(out)
    assert not any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect)
                   for d in msg.defects)
    assert msg["Subject"] == "no separator"


@pytest.mark.parametrize("raw", [
    b"From: alice@example.net\r\nSubject: s",
    b"From: alice@example.net\r\nSubject: s\r\n",
    b"From: alice@example.net\nSubject: s\n\n",
])
def test_message_no_body_at_all(raw: bytes) -> None:
    parts = split(raw)
    assert names(parts) == ["From", "Subject"]
    assert parts.body == b""
    assert parts.to_bytes() == b"From: alice@example.net\r\nSubject: s\r\n\r\n"


def test_message_empty_input() -> None:
    parts = split(b"")
    assert parts.fields == [] and parts.body == b""


def test_message_body_only_after_a_leading_blank_line() -> None:
    parts = split(b"\r\njust a body\r\n")
    assert parts.fields == []
    assert parts.body == b"just a body\r\n"
    assert parts.to_bytes().endswith(b"\r\njust a body\r\n")


def test_message_split_keeps_8bit_fields_raw() -> None:
    raw = b"Subject: caf\xe9\r\nX-Tab:\tvalue \xff\r\n\r\nbody"
    parts = split(raw)
    assert names(parts) == ["Subject", "X-Tab"]
    assert parts.fields[0].raw == b"Subject: caf\xe9"
    assert parts.get("subject") == "caf\udce9"  # undecodable bytes kept as escapes
    assert parts.to_bytes() == raw


def test_message_split_writes_obsolete_fields_in_the_modern_form() -> None:
    # RFC 5322 4.5 allows blanks before the colon; other parsers take such a line
    # for the start of the body, and everything after it would be lost to them.
    raw = (b"Subject : obsolete\r\nDate \t :  Mon, 1 Jan 2001\r\n\tfolded\r\n"
           b"To: a@example.net\r\n\r\nb")
    parts = split(raw)
    assert names(parts) == ["Subject", "Date", "To"]
    assert [f.raw for f in parts.fields] == [b"Subject: obsolete",
                                             b"Date:  Mon, 1 Jan 2001\r\n\tfolded",
                                             b"To: a@example.net"]
    msg = parse_default(parts.to_bytes())
    assert msg["To"] == "a@example.net" and msg.get_content() == "b"


def test_message_mbox_from_line_is_not_a_field() -> None:
    parts = split(b"From alice@example.net Mon Jan  1 00:00:00 2001\nSubject: s\n\nbody\n")
    assert parts.fields == []
    assert parts.body.startswith(b"From alice@example.net Mon")


# -- Parts -----------------------------------------------------------------------

RAW = (b"Received: one\r\nFrom: alice@example.net\r\nReceived: two\r\nSubject: hello\r\n"
       b"X-Keep: \xff raw\r\n\r\nbody\r\n")


def test_message_parts_get_and_get_all_ignore_case() -> None:
    parts = split(RAW)
    assert parts.get("RECEIVED") == "one"
    assert parts.get_all("received") == ["one", "two"]
    assert parts.get("x-missing") is None
    assert parts.get_all("x-missing") == []


def test_message_parts_remove_returns_what_it_removed() -> None:
    parts = split(RAW)
    removed = parts.remove("received", "SUBJECT", "X-None")
    assert [f.raw for f in removed] == [b"Received: one", b"Received: two", b"Subject: hello"]
    assert names(parts) == ["From", "X-Keep"]
    assert parts.remove("Received") == []


def test_message_parts_replace_takes_the_place_of_the_first_and_drops_the_rest() -> None:
    parts = split(RAW)
    parts.replace("received", "new")
    assert names(parts) == ["received", "From", "Subject", "X-Keep"]
    assert parts.get_all("Received") == ["new"]
    parts.replace("X-New", "appended")
    assert names(parts)[-1] == "X-New"


def test_message_parts_add_and_prepend() -> None:
    parts = split(RAW)
    parts.add("X-Last", "z")
    parts.prepend("X-First", "a")
    assert names(parts)[0] == "X-First" and names(parts)[-1] == "X-Last"
    out = parts.to_bytes()
    assert out.startswith(b"X-First: a\r\nReceived: one\r\n")
    assert b"X-Keep: \xff raw\r\nX-Last: z\r\n\r\nbody\r\n" in out


def test_message_untouched_fields_go_out_byte_for_byte() -> None:
    parts = split(RAW)
    parts.add("X-Added", "yes")
    assert parts.to_bytes() == RAW.replace(b"\r\n\r\n", b"\r\nX-Added: yes\r\n\r\n")


@pytest.mark.parametrize("body", [
    b"lf\nonly\n", b"crlf\r\nonly\r\n", b"mixed\nand\r\nmore\n", b"no final newline",
    b"\n\n\nblank lines\n\n",
])
def test_message_to_bytes_gives_crlf_everywhere(body: bytes) -> None:
    parts = split(b"A: 1\nB: 2\n folded\n\n" + body)
    out = parts.to_bytes()
    assert re.search(rb"(?<!\r)\n", out) is None
    assert out.count(b"\n") == out.count(b"\r\n")
    assert out.endswith(normalise_eol(body))


# -- make_field ----------------------------------------------------------------------

def assert_one_safe_field(f: Field) -> None:
    """The raw bytes are one field: every line break is a fold (CRLF then WSP)."""
    assert re.search(rb"\r(?!\n)|(?<!\r)\n|\r\n(?![ \t])", f.raw) is None, f.raw
    assert not f.raw.endswith((b"\r", b"\n"))
    parts = split(f.raw + b"\r\n\r\nbody")
    assert len(parts.fields) == 1 and parts.body == b"body"


@pytest.mark.parametrize("value", [
    "hello\r\nBcc: victim@example.com",
    "hello\nBcc: victim@example.com",
    "hello\rBcc: victim@example.com",
    "hello\r\n\r\nbody injected",
    "hello\n\nbody injected",
    "trailing newline\n",
    "\r\nleading",
    "Grüße\r\nBcc: victim@example.com",
    "x" * 100 + "\r\nBcc: victim@example.com " + "y " * 50,
])
def test_message_make_field_values_cannot_add_fields_or_end_the_header(value: str) -> None:
    f = make_field("Subject", value)
    assert f.name == "Subject"
    assert_one_safe_field(f)
    msg = parse_default(f.raw + b"\r\nFrom: a@example.net\r\n\r\nbody\r\n")
    assert msg["Bcc"] is None
    assert msg.get_content().strip() == "body"


@pytest.mark.parametrize("name", ["X-Tag\r\nBcc", "X-Tag\nBcc", "X-Tag\r\n\r\n", "X Tag",
                                  "X-Tag:", ""])
def test_message_make_field_names_cannot_add_fields_or_end_the_header(name: str) -> None:
    try:
        f = make_field(name, "victim@example.com")
    except ValueError:
        return  # refusing such a name is as good as making it safe
    assert_one_safe_field(f)


@pytest.mark.parametrize("value", [
    "Grüße aus Köln",
    "日本語の件名",
    "Ünïcödé " * 20,
    "emoji 🎉 party",
])
def test_message_make_field_encodes_non_ascii_per_rfc_2047(value: str) -> None:
    f = make_field("Subject", value)
    assert f.raw.isascii()
    assert b"=?utf-8?" in f.raw
    assert_one_safe_field(f)
    assert all(len(line) <= 78 for line in f.raw.split(b"\r\n"))
    assert decode_header(Field("Subject", f.raw).value) == value
    assert str(parse_default(f.raw + b"\r\n\r\n")["Subject"]) == value


def test_message_make_field_short_ascii_is_plain() -> None:
    assert make_field("List-Post", "<mailto:discuss@example.org>").raw == (
        b"List-Post: <mailto:discuss@example.org>")


def test_message_make_field_folds_long_values() -> None:
    value = " ".join(f"word{i}" for i in range(60))
    f = make_field("Subject", value)
    lines = f.raw.split(b"\r\n")
    assert len(lines) > 1
    assert all(len(line) <= 78 for line in lines)
    assert_one_safe_field(f)
    assert Field("Subject", f.raw).value.split() == value.split()


# -- decode_header and content_type ------------------------------------------------------

@pytest.mark.parametrize("value, decoded", [
    ("plain text", "plain text"),
    ("=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus =?iso-8859-1?q?K=F6ln?=", "Grüße aus Köln"),
    ("=?UTF-8?B?5pel5pys6Kqe?=", "日本語"),
    ("=?iso-8859-1?q?caf=E9?=", "café"),
    ("", ""),
    (None, ""),
])
def test_message_decode_header_good_input(value: str | None, decoded: str) -> None:
    assert decode_header(value) == decoded


@pytest.mark.parametrize("value", [
    "=?x-unknown-charset?q?abc?=",
    "=?utf-8?b?!!!not base64?=",
    "=?utf-8?q?unterminated",
    "=?utf-8?x?bad-encoding?=",
    "caf\udce9 raw 8-bit",
    "=?utf-8?q?=FF=FE?=",
    "=?iso-2022-jp?b?GyRCJCIbKEI?=",
    "=?=?=?",
])
def test_message_decode_header_never_raises_on_junk(value: str) -> None:
    decoded = decode_header(value)
    assert isinstance(decoded, str)


def test_message_decode_header_keeps_what_it_cannot_decode() -> None:
    assert decode_header("=?x-unknown-charset?q?abc?=") == "=?x-unknown-charset?q?abc?="


@pytest.mark.parametrize("raw, decoded", [
    (b"caf\xc3\xa9", "café"),  # UTF-8 without RFC 2047
    (b"caf\xe9 \x93quoted\x94", "café \u201cquoted\u201d"),  # Windows-1252
    (b"=?utf-8?q?Gr=C3=BC=C3=9Fe?= caf\xe9", "Grüße café"),  # both at once
])
def test_message_decode_header_reads_raw_8bit_values(raw: bytes, decoded: str) -> None:
    value = split(b"Subject: " + raw + b"\r\n\r\n").get("Subject")
    text = decode_header(value)
    assert text == decoded
    text.encode("utf-8")  # no surrogate escapes left: the text can be re-encoded


@pytest.mark.parametrize("value, type_, params", [
    (None, "text/plain", {}),
    ("", "text/plain", {}),
    ("garbage", "text/plain", {}),
    ("text/HTML; Charset=\"ISO-8859-1\"", "text/html", {"charset": "ISO-8859-1"}),
    ("multipart/mixed; boundary=abc", "multipart/mixed", {"boundary": "abc"}),
    ('Multipart/Alternative;\r\n boundary="b 1"', "multipart/alternative", {"boundary": "b 1"}),
    ("application/octet-stream", "application/octet-stream", {}),
])
def test_message_content_type_defaults(value: str | None, type_: str,
                                       params: dict[str, str]) -> None:
    ctype = content_type(value)
    assert ctype.type == type_
    assert f"{ctype.maintype}/{ctype.subtype}" == type_
    assert ctype.params == params


# -- the corpus of odd messages ------------------------------------------------------------

@pytest.mark.parametrize("path", corpus_files("odd"))
def test_message_odd_corpus_splits_and_keeps_its_body(path: Path) -> None:
    raw = path.read_bytes()
    parts = split(raw)
    out = parts.to_bytes()
    assert raw.endswith(parts.body)
    assert out.endswith(normalise_eol(parts.body))
    # Every byte is accounted for: header fields, then the body.
    assert len(parts.body) <= len(raw)
    head = normalise_eol(raw[:len(raw) - len(parts.body)])
    for f in parts.fields:
        # Obsolete "Name  :" fields come out as "Name:"; the rest of the bytes are theirs.
        assert normalise_eol(f.raw.partition(b":")[2]) in head
        assert f.name.encode("ascii") in head
    assert CRLF + CRLF in out or out.startswith(CRLF)
