"""Property tests (hypothesis) of the parsing and encoding paths hostile input reaches:
header fields, dot-stuffing, addresses and routing, VERP. Examples are bounded so the
module runs in seconds; a failure prints the smallest input that shows it."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway import addresses
from gateway.dsn import verp_decode, verp_encode
from gateway.errors import AddressError
from gateway.intake import IntakeSMTP, printable
from gateway.message import decode_header, make_field, split
from gateway.routing import Hit, ListRef, Miss, Role, Router
from gateway.smtpclient import MAX_LINE, dot_stuff

settings.register_profile("listgate", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("listgate")

LIST = ListRef(1, "discuss", "example.org")
ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&'*+/=?^_`{|}~-"
LABEL = st.from_regex(r"\A[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?\Z")
DOMAIN = st.lists(LABEL, min_size=1, max_size=3).map(lambda labels: ".".join([*labels, "net"]))
LOCAL = st.lists(st.text(ATEXT, min_size=1, max_size=12), min_size=1, max_size=3).map(".".join)
MEMBER = st.builds(lambda local, domain: f"{local}@{domain}", LOCAL, DOMAIN)
# Anything a client could put in an address: controls, quotes, routing characters, IDN.
ANY_ADDRESS = st.one_of(
    st.text(max_size=60),
    st.builds(lambda a, b: f"{a}@{b}", st.text(max_size=20), st.text(max_size=20)),
    st.builds(lambda a, b: f"discuss{a}@{b}",
              st.text("+-=%!\"@:.<>\\ \x00\r\nabc", max_size=12),
              st.sampled_from(["example.org", "EXAMPLE.org.", "exаmple.org", "other.example"])),
)


def router() -> Router:
    return Router(lambda name, domain: LIST if (name, domain) == ("discuss", "example.org")
                  else None, serves_domain=lambda domain: domain == "example.org")


# -- header fields ------------------------------------------------------------------------

@given(value=st.text(max_size=300))
def test_properties_header_field_cannot_add_fields_or_end_the_header(value: str) -> None:
    """Whatever a display name, subject or command puts in a value: one field comes
    out, and the header goes on after it (no injection, RFC 5322 2.2.3)."""
    raw = make_field("Subject", value).raw + b"\r\nX-After: yes\r\n\r\nbody\r\n"
    parts = split(raw)
    assert [f.name for f in parts.fields] == ["Subject", "X-After"]
    assert parts.body == b"body\r\n"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


@given(value=st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp", "Zs")),
                     max_size=120),
       spaces=st.lists(st.integers(0, 120), max_size=6))
def test_properties_header_value_survives_encoding_and_decoding(value: str,
                                                                spaces: list[int]) -> None:
    """make_field (RFC 2047 words for non-ASCII, folding for long lines) then split and
    decode_header give the text back (words separated by single spaces)."""
    for at in sorted(set(spaces), reverse=True):
        value = value[:at] + " " + value[at:]
    value = " ".join(value.split())
    parts = split(make_field("Subject", value).raw + b"\r\n\r\n")
    assert decode_header(parts.get("Subject")) == value


@given(raw=st.binary(max_size=2000))
def test_properties_split_never_raises_and_keeps_every_body_byte(raw: bytes) -> None:
    parts = split(raw)
    assert raw.endswith(parts.body)
    for f in parts.fields:
        decode_header(f.value)  # never raises on what the header holds


# -- dot-stuffing -------------------------------------------------------------------------

LINE = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
DOTTY_LINE = st.one_of(LINE, st.builds(lambda x: b"." + x, LINE), st.just(b"."),
                       st.just(b".."))


def unstuff(payload: bytes) -> bytes:
    """What an SMTP server reads back from a DATA payload (RFC 5321 4.5.2)."""
    assert payload.endswith(b"\r\n.\r\n")
    lines = payload[:-3].split(b"\r\n")
    assert b"." not in lines[:-1], "a lone dot before the end would end DATA early"
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@given(lines=st.lists(DOTTY_LINE, max_size=30), ending=st.sampled_from([b"\r\n", b"\n"]),
       last=st.booleans())
def test_properties_dot_stuffing_round_trips(lines: list[bytes], ending: bytes,
                                             last: bool) -> None:
    data = ending.join(lines) + (ending if last and lines else b"")
    expected = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(dot_stuff(data)) == expected


@given(data=st.binary(max_size=3000))
def test_properties_dot_stuffing_of_anything_ends_once_and_keeps_lines_short(
        data: bytes) -> None:
    payload = dot_stuff(data)
    unstuff(payload)
    assert all(len(line) <= MAX_LINE + 1 for line in payload.split(b"\r\n"))  # +1: a dot


# -- addresses and routing ----------------------------------------------------------------

@given(address=ANY_ADDRESS)
def test_properties_address_parsing_raises_only_address_errors(address: str) -> None:
    # A local part ending in a newline is taken: see the test below.
    assume(not re.search(r"\n\s*@", address))
    try:
        normal = addresses.normalise(address)
    except AddressError:
        return
    assert normal == addresses.normalise(normal)  # normalising is idempotent
    assert normal.isascii() and not re.search(r"[\s\"%!:<>\x00-\x1f]", normal)


@given(domain=st.one_of(st.text(st.characters(max_codepoint=127), max_size=80),
                      DOMAIN, st.from_regex(r"\A[a-z0-9.-]{0,70}\Z")))
def test_properties_ascii_domain_is_read_as_the_idna_codec_reads_it(domain: str) -> None:
    """An ASCII domain skips the IDNA codec: the same name, or the same refusal."""
    def through_codec(name: str) -> str:
        name = name.rstrip(".").lower()
        try:
            encoded = name.encode("idna").decode("ascii")
        except UnicodeError:
            return "refused"
        labels = encoded.split(".")
        ok = len(labels) >= 2 and all(addresses._LABEL.fullmatch(label) for label in labels)
        return encoded if ok else "refused"

    try:
        ours = addresses.normalise_domain(domain)
    except AddressError:
        ours = "refused"
    assert ours == through_codec(domain)


@pytest.mark.parametrize("address", ["bob\n@example.net", "discuss\n@example.org"])
def test_properties_address_with_a_newline_in_it_is_refused(address: str) -> None:
    """Found by the property above: "bob\\n@example.net" normalises to itself."""
    with pytest.raises(AddressError):
        addresses.normalise(address)


@given(address=ANY_ADDRESS)
def test_properties_routing_never_raises_and_never_relays(address: str) -> None:
    found = router().resolve(address)
    assert isinstance(found, Hit | Miss)
    if isinstance(found, Hit):
        assert found.mailing_list is LIST
        assert addresses.normalise(address).endswith("@example.org")


@given(values=st.lists(st.text(max_size=80), max_size=4))
def test_properties_header_addresses_never_raise(values: list[str]) -> None:
    for address in addresses.header_addresses(values):
        assert addresses.normalise(address) == address
    addresses.first_address(values[0] if values else None)


@given(text=st.text(max_size=200))
def test_properties_printable_escapes_every_control_character(text: str) -> None:
    shown = printable(text)
    assert shown.isascii() and not re.search(r"[\x00-\x1f\x7f]", shown)
    if re.fullmatch(r"[\x20-\x7e]*", text):
        assert shown == text


# -- VERP ---------------------------------------------------------------------------------

@given(member=MEMBER)
def test_properties_verp_round_trips_and_routes_to_the_bounces_of_the_list(
        member: str) -> None:
    try:
        expected = addresses.normalise(member)
    except AddressError:
        return  # not an address a member can have
    verp = verp_encode("discuss", "example.org", member)
    found = router().resolve(verp)
    assert isinstance(found, Hit), found
    assert found.route.role is Role.BOUNCES and found.mailing_list is LIST
    assert found.detail is not None and verp_decode(found.detail) == expected


# -- MAIL and RCPT paths ------------------------------------------------------------------

PARAMS = st.sampled_from(["", " SIZE=1024", " BODY=8BITMIME", "  SMTPUTF8 x", ">", " <>"])


@given(arg=st.one_of(
    st.builds(lambda space, member, rest: f"{space}<{member}>{rest}",
              st.sampled_from(["", " ", "\t"]), MEMBER, PARAMS),
    st.builds(lambda member, rest: f"{member}{rest}", MEMBER, PARAMS),
    ANY_ADDRESS.map(lambda text: f"<{text}>"),
    ANY_ADDRESS,
), limit=st.sampled_from([0, 8, 64]))
def test_properties_intake_reads_a_path_as_aiosmtpd_does(arg: str, limit: int) -> None:
    """Intake's fast reading of <local@domain> gives what aiosmtpd's own parser gives,
    address and rest, for every argument (the unusual ones still go to that parser)."""
    intake = object.__new__(IntakeSMTP)
    intake.local_part_limit = limit

    def outcome(parse: Callable[[str], object]) -> object:
        try:
            return parse(arg)
        except Exception as exc:  # aiosmtpd's parser raises on some input ("0@"): alike
            return type(exc)

    assert outcome(intake._getaddr) == outcome(lambda a: SMTP._getaddr(intake, a))
