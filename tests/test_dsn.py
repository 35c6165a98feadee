"""Bounce detection on real bounces from many MTAs, and VERP addresses that round-trip,
signed with a tag that nobody without the key can write."""

from __future__ import annotations

import csv
import re
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import addresses
from gateway.dsn import (
    MAX_LOCAL_PART,
    BounceReport,
    Verp,
    parse_bounce,
    signed_verp,
    verp_decode,
    verp_encode,
    verp_parse,
    verp_verified,
)
from gateway.errors import AddressError
from gateway.signing import VERP_TAG_LENGTH, LinkSigner
from tests.helpers_unit import NO_CORPUS, corpus_files
from tests.support import CORPUS

BOUNCES = CORPUS / "bounces"
NOT_A_BOUNCE = "not-a-bounce"

# Labels the parser disagrees with on purpose; bench/bounce_eval.py says why at length.
# Strict xfails: if the parser ever agrees with one of them, the test says so.
DISPUTED = {
    "bounceparser__autoreply.msg.eml": "a person's auto-reply, labelled a bounce",
    "bounceparser__sendmail-host-unknown.msg.eml": "recipient@#example.net is no address",
    "bounceparser__warning-2.msg.eml": "the DSN fails two recipients, the label names one",
    "bounceparser__warning-3.msg.eml": "the label '1' is a bare local part",
    "bounceparser__warning-8.msg.eml": "a delay warning: reported as temporary by design",
    "bounceparser__warning-9.msg.eml": "the label drops the 'expanded from' original address",
}
# The manifest follows flufl.bounce, which calls every Action: failed permanent; a
# failure with a 4.x.x status (here 4.4.7, delivery time expired) is temporary here.
KIND_DISPUTED = {"flufl__dsn_02.txt.eml": "Action: failed with Status 4.4.7 is temporary here"}


def manifest_params(wanted: str, *, known: dict[str, str]) -> list[Any]:
    """(file name, expected addresses, kind) of the manifest rows of one sort:
    ``bounce`` (an expected address), ``kind`` (labelled permanent or temporary) or
    ``not-a-bounce``."""
    if not (BOUNCES / "MANIFEST.tsv").is_file():
        return [pytest.param(None, set(), "", id="no-corpus",
                             marks=pytest.mark.skip(reason=NO_CORPUS))]
    params = []
    with open(BOUNCES / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            kind = row["expected_kind"].strip()
            expected = {clean(a) for a in row["expected"].split(",") if a.strip()}
            chosen = {
                "bounce": kind != NOT_A_BOUNCE and bool(expected),
                "kind": kind in ("permanent", "temporary") and bool(expected),
                NOT_A_BOUNCE: kind == NOT_A_BOUNCE,
            }[wanted]
            if not chosen:
                continue
            marks = ([pytest.mark.xfail(strict=True, reason=known[row["file"]])]
                     if row["file"] in known else [])
            params.append(pytest.param(row["file"], expected, kind, id=row["file"],
                                       marks=marks))
    return params


def clean(label: str) -> str:
    """A manifest address as Listgate would store it (labels carry "rfc822;" and "<>")."""
    value = label.strip().rsplit(";", 1)[-1].strip().strip("<>")
    try:
        return addresses.normalise(value)
    except AddressError:
        return value.lower()


def read(name: str) -> BounceReport:
    return parse_bounce((BOUNCES / name).read_bytes())


# --- The corpus --------------------------------------------------------------------


@pytest.mark.parametrize("path", corpus_files("bounces"))
def test_parse_bounce_reads_every_corpus_file(path: Path) -> None:
    report = parse_bounce(path.read_bytes())
    reported = report.permanent | report.temporary
    assert all(addresses.normalise(a) == a for a in reported)
    assert not report.permanent & report.temporary
    assert report.is_bounce or not reported
    assert report.reason and "\n" not in report.reason


@pytest.mark.parametrize(("name", "expected", "kind"), manifest_params("bounce", known=DISPUTED))
def test_parse_bounce_finds_every_expected_address(name: str, expected: set[str],
                                                   kind: str) -> None:
    report = read(name)
    assert report.is_bounce, report.reason
    assert expected <= report.permanent | report.temporary, report.reason
    assert report.permanent | report.temporary <= expected, report.reason


@pytest.mark.parametrize(("name", "expected", "kind"),
                         manifest_params("kind", known={**DISPUTED, **KIND_DISPUTED}))
def test_parse_bounce_tells_permanent_from_temporary(name: str, expected: set[str],
                                                     kind: str) -> None:
    report = read(name)
    assert expected <= (report.permanent if kind == "permanent" else report.temporary), (
        report.reason)


@pytest.mark.parametrize(("name", "expected", "kind"),
                         manifest_params(NOT_A_BOUNCE, known=DISPUTED))
def test_parse_bounce_not_a_bounce_names_nobody(name: str, expected: set[str],
                                                kind: str) -> None:
    report = read(name)
    assert not report.is_bounce, report.reason
    assert not report.permanent | report.temporary


def test_parse_bounce_reads_no_promotional_mail_as_a_bounce() -> None:
    promo = CORPUS / "labeled" / "promo"
    if not promo.is_dir():
        pytest.skip(NO_CORPUS)
    flagged = {}
    for path in sorted(promo.glob("*.eml")):
        report = parse_bounce(path.read_bytes())
        if report.is_bounce or report.permanent or report.temporary:
            flagged[path.name] = report
    assert not flagged


# --- Rules, on small reports of the RFC 3464 shape -----------------------------------


def dsn(*groups: str, headers: str = "") -> bytes:
    """A multipart/report DSN from a mail system with the given per-recipient groups."""
    recipients = "\r\n\r\n".join(g.strip().replace("\n", "\r\n") for g in groups)
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\r\n"
        "To: discuss-bounces@example.org\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"{headers}"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"{recipients}\r\n"
        "\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "From: alice@example.net\r\nTo: discuss@example.org\r\nSubject: hello\r\n"
        "\r\n--B--\r\n"
    ).encode()


@pytest.mark.parametrize(("action", "status", "permanent", "temporary"), [
    ("failed", "5.1.1", True, False),
    ("failed", "4.4.7", False, True),
    ("delayed", "4.4.1", False, True),
    ("error", "5.0.0", True, False),  # OpenSMTPD's non-standard word for failed
    ("", "5.2.2", True, False),
])
def test_parse_bounce_classifies_dsn_action_and_status(action: str, status: str,
                                                       permanent: bool,
                                                       temporary: bool) -> None:
    fields = f"Final-Recipient: rfc822; Bob@Example.NET\nStatus: {status}"
    if action:
        fields += f"\nAction: {action}"
    report = parse_bounce(dsn(fields))
    assert report.is_bounce
    assert report.permanent == ({"bob@example.net"} if permanent else set())
    assert report.temporary == ({"bob@example.net"} if temporary else set())


@pytest.mark.parametrize("action", ["delivered", "relayed", "expanded"])
def test_parse_bounce_success_notification_is_not_a_bounce(action: str) -> None:
    report = parse_bounce(dsn(f"Final-Recipient: rfc822; bob@example.net\n"
                              f"Action: {action}\nStatus: 2.0.0"))
    assert not report.is_bounce
    assert not report.permanent | report.temporary


def test_parse_bounce_prefers_the_original_recipient() -> None:
    report = parse_bounce(dsn("Original-Recipient: rfc822; bob@example.net\n"
                              "Final-Recipient: rfc822; bob.smith@mail.example.net\n"
                              "Action: failed\nStatus: 5.1.1"))
    assert report.permanent == {"bob@example.net"}


def test_parse_bounce_separates_recipients_without_blank_lines() -> None:
    report = parse_bounce(dsn("Final-Recipient: rfc822; bob@example.net\n"
                              "Action: failed\nStatus: 5.1.1\n"
                              "Final-Recipient: rfc822; carol@example.net\n"
                              "Action: delayed\nStatus: 4.2.2"))
    assert report.permanent == {"bob@example.net"}
    assert report.temporary == {"carol@example.net"}


# A block with a body (a line that is no field) and 8-bit text, in a charset the
# stdlib's get_payload() cannot use: it raised, and the whole report was read as no
# bounce. Both found by fuzz/fuzz_parse.py.
@pytest.mark.parametrize("charset", [
    "charset*=utf-8''us-ascii",  # RFC 2231: kept as a tuple, TypeError
    'charset="utf\x00-8"',  # a NUL in the codec's name: ValueError, not LookupError
], ids=["rfc2231", "nul"])
def test_parse_bounce_reads_a_status_block_whose_charset_the_stdlib_cannot_use(
        charset: str, caplog: pytest.LogCaptureFixture) -> None:
    report = parse_bounce(dsn("Final-Recipient: rfc822; bob@example.net\n"
                              "Action: failed\nStatus: 5.1.1\n"
                              f"Content-Type: text/plain; {charset}\n"
                              "no field here: Zo\u00eb"))
    assert report.permanent == {"bob@example.net"}
    assert "bounce parsing failed" not in caplog.text


def test_parse_bounce_dsn_marked_auto_replied_is_still_a_bounce() -> None:
    # Postfix marks its bounces "Auto-Submitted: auto-replied".
    report = parse_bounce(dsn("Final-Recipient: rfc822; bob@example.net\n"
                              "Action: failed\nStatus: 5.1.1",
                              headers="Auto-Submitted: auto-replied\r\n"))
    assert report.permanent == {"bob@example.net"}


@pytest.mark.parametrize("headers", [
    "Auto-Submitted: auto-replied\r\nSubject: Re: hello\r\n",
    "X-Autoreply: yes\r\nSubject: Re: hello\r\n",
    "Subject: Out of Office: hello\r\n",
    "Subject: Automatic reply: hello\r\n",
])
def test_parse_bounce_auto_reply_is_not_a_bounce(headers: str) -> None:
    raw = (f"From: Bob <bob@example.net>\r\nTo: discuss-bounces@example.org\r\n{headers}"
           "\r\nI am away; your message to bob@example.net could not be read until Monday.\r\n")
    report = parse_bounce(raw.encode())
    assert not report.is_bounce, report.reason
    assert not report.permanent | report.temporary


def test_parse_bounce_challenge_response_is_not_a_bounce() -> None:
    raw = dsn("Final-Recipient: rfc822; bob@example.net\nAction: failed\nStatus: 4.7.0\n"
              "Diagnostic-Code: X-Notice; Sender not pre-approved. Click the link to be "
              "added to my Guest List.")
    report = parse_bounce(raw)
    assert not report.is_bounce, report.reason
    assert not report.permanent | report.temporary


@given(st.binary(max_size=2000))
@settings(max_examples=200)
@example(b"")
@example(b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\n"
         b"Content-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822;")
@example(b"Subject: =?\xfftf-8?q?Undelivered?=\r\n\r\nbob@example.net... User unknown\r\n")
def test_parse_bounce_never_raises_on_junk(raw: bytes) -> None:
    report = parse_bounce(raw)
    assert isinstance(report, BounceReport)
    assert report.is_bounce or not report.permanent | report.temporary


# --- VERP --------------------------------------------------------------------------

# What gateway.addresses accepts in a local part: dot-atom text without '%' and '!'.
ATEXT = string.ascii_letters + string.digits + "#$&'*+/=?^_`{|}~-"
local_parts = st.lists(st.text(ATEXT, min_size=1, max_size=10), min_size=1,
                       max_size=3).map(".".join)
labels = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=2, max_size=4).map(".".join)
# check_list_name also allows "a..b", which no address may hold (see the test below).
list_names = st.from_regex(r"[a-z0-9](?:[a-z0-9._-]{0,12}[a-z0-9])?",
                           fullmatch=True).filter(lambda name: ".." not in name)


def detail_of(verp: str, list_name: str) -> str:
    local, _, _domain = verp.rpartition("@")
    prefix = f"{list_name}-bounces+"
    assert local.startswith(prefix)
    return local[len(prefix):]


@given(list_names, domains, local_parts, domains)
@settings(max_examples=300)
def test_verp_round_trips_every_accepted_address(list_name: str, list_domain: str,
                                                 local: str, domain: str) -> None:
    member = f"{local}@{domain}"
    verp = verp_encode(list_name, list_domain, member)
    assert addresses.normalise(verp) == verp  # a plain dot-atom address, no quoting
    assert verp.endswith("@" + list_domain.lower())
    assert verp_decode(detail_of(verp, list_name)) == addresses.normalise(member)


@pytest.mark.parametrize(("member", "verp"), [
    ("bob@example.net", "discuss-bounces+bob=example.net@example.org"),
    ("Bob+lists@Example.NET", "discuss-bounces+bob+lists=example.net@example.org"),
    ("a=b@example.net", "discuss-bounces+a=b=example.net@example.org"),
    ("x-bounces+y=z@mail.example.net",
     "discuss-bounces+x-bounces+y=z=mail.example.net@example.org"),
    ("first.last-name@sub-domain.example.net",
     "discuss-bounces+first.last-name=sub-domain.example.net@example.org"),
])
def test_verp_encode_uses_the_conventional_form(member: str, verp: str) -> None:
    assert verp_encode("discuss", "example.org", member) == verp
    assert verp_decode(detail_of(verp, "discuss")) == addresses.normalise(member)


@pytest.mark.parametrize(("list_name", "member"), [
    ("discuss", "bob"),
    ("discuss", "bob@localhost"),
    ("discuss", '"bob smith"@example.net'),
    ("discuss", "a%b@example.net"),
    ("discuss", "@route:bob@example.net"),
    ("Not a list", "bob@example.net"),
    ("a..b", "bob@example.net"),
])
def test_verp_encode_refuses_what_listgate_does_not_accept(list_name: str,
                                                           member: str) -> None:
    with pytest.raises(AddressError):
        verp_encode(list_name, "example.org", member)


@pytest.mark.parametrize("detail", [
    "", "=", "bob", "bob=", "=example.net", "bob=example", "bob@example.net",
    "bob=exa_mple.net", "bo b=example.net", "bob=-example.net", '"bob"=example.net',
    "bob..x=example.net", "a%b=example.net", "bob=example..net",
])
def test_verp_decode_of_junk_is_none(detail: str) -> None:
    assert verp_decode(detail) is None


@given(st.text(max_size=80))
def test_verp_decode_gives_none_or_an_accepted_address(detail: str) -> None:
    decoded = verp_decode(detail)
    assert decoded is None or addresses.normalise(decoded) == decoded


# -- signed VERP ---------------------------------------------------------------------------

SIGNER = LinkSigner(b"the installation's key, 32 bytes")
OTHER_KEY = LinkSigner(b"another installation's key, too!")
BOB_SIGNED = signed_verp("discuss", "example.org", "bob@example.net", SIGNER)


def verified(detail: str, signer: LinkSigner = SIGNER,
             list_address: str = "discuss@example.org") -> str | None:
    return verp_verified(detail, list_address=list_address, signer=signer)


def test_verp_signed_form_is_the_verp_address_with_a_tag() -> None:
    m = re.fullmatch(r"discuss-bounces\+bob=example\.net\+([a-z2-7]+)@example\.org", BOB_SIGNED)
    assert m is not None, BOB_SIGNED
    assert len(m.group(1)) == VERP_TAG_LENGTH
    untagged = verp_encode("discuss", "example.org", "bob@example.net")
    assert untagged.replace("@", f"+{m.group(1)}@") == BOB_SIGNED
    detail = detail_of(BOB_SIGNED, "discuss")
    assert verp_parse(detail) == Verp("bob@example.net", m.group(1))
    assert verified(detail) == "bob@example.net"
    assert verp_decode(detail) == "bob@example.net"
    # The same for every copy (a late bounce of any post is bob's), another for carol.
    assert signed_verp("Discuss", "EXAMPLE.org", "Bob@Example.NET", SIGNER) == BOB_SIGNED
    assert signed_verp("discuss", "example.org", "carol@example.net", SIGNER) != \
        BOB_SIGNED.replace("bob", "carol")


@given(list_names, domains, local_parts, domains)
@settings(max_examples=300)
@example("discuss", "example.org", "a+b=c", "example.net")
def test_verp_signed_round_trips_or_falls_back_within_64_octets(
        list_name: str, list_domain: str, local: str, domain: str) -> None:
    member = addresses.normalise(f"{local}@{domain}")
    signed = signed_verp(list_name, list_domain, member, SIGNER)
    assert addresses.normalise(signed) == signed
    signed_local, _, signed_domain = signed.rpartition("@")
    assert len(signed_local) <= MAX_LOCAL_PART and signed_domain == list_domain.lower()
    long_local = f"{verp_encode(list_name, list_domain, member).rpartition('@')[0]}+" \
                 f"{'x' * VERP_TAG_LENGTH}"
    if len(long_local) > MAX_LOCAL_PART:
        assert signed == f"{list_name}-bounces@{signed_domain}"
        return
    detail = detail_of(signed, list_name)
    assert verified(detail, list_address=f"{list_name}@{signed_domain}") == member
    # The tag binds the list too: the same member's tag means nothing on another list.
    assert verified(detail, list_address=f"other-{list_name}@{signed_domain}") is None


def flip(tag: str) -> str:
    return ("b" if tag[0] == "a" else "a") + tag[1:]


BOB_DETAIL = detail_of(BOB_SIGNED, "discuss")
BOB_TAG = BOB_DETAIL.rpartition("+")[2]
CAROL_TAG = detail_of(signed_verp("discuss", "example.org", "carol@example.net", SIGNER),
                      "discuss").rpartition("+")[2]
OTHER_KEY_TAG = detail_of(signed_verp("discuss", "example.org", "bob@example.net", OTHER_KEY),
                          "discuss").rpartition("+")[2]


@pytest.mark.parametrize("detail", [
    "bob=example.net",  # the guessable, untagged form
    f"bob=example.net+{flip(BOB_TAG)}",  # one character changed
    f"bob=example.net+{BOB_TAG[:-1]}",  # cut short
    f"bob=example.net+{BOB_TAG}a",  # made longer
    f"bob=example.net+{CAROL_TAG}",  # another member's tag
    f"bob=example.net+{OTHER_KEY_TAG}",  # another installation's key
    "bob=example.net+",
    f"bob=example.net+{'a' * VERP_TAG_LENGTH}",
    f"carol=example.net+{BOB_TAG}",  # bob's tag on carol's address
    f"bob=example.net+{BOB_TAG}+{BOB_TAG}",
    f"bob=example.net+{BOB_TAG[:-1]}\u00e9",  # not even ASCII
    f"bob=example.net+{BOB_TAG[:-1]}\u017f",  # a long s, which folds to "s" in Unicode
    f"{BOB_TAG}",
])
def test_verp_untagged_or_tampered_tag_is_not_verified(detail: str) -> None:
    assert verified(detail) is None


def test_verp_tag_survives_an_mta_that_changes_case() -> None:
    assert verified(BOB_DETAIL.upper()) == "bob@example.net"


@pytest.mark.parametrize(("list_name", "member", "fits"), [
    # "discuss-bounces+" (16) + local=domain + "+" and a 12-character tag (13) <= 64
    ("discuss", "a" * 23 + "@example.net", True),  # exactly 64 octets
    ("discuss", "a" * 24 + "@example.net", False),  # 65
    ("a-rather-long-list-name-for-announcements", "bob@example.net", False),
])
def test_verp_signed_local_part_too_long_falls_back_to_the_plain_address(
        list_name: str, member: str, fits: bool) -> None:
    signed = signed_verp(list_name, "example.org", member, SIGNER)
    if fits:
        assert len(signed.rpartition("@")[0]) == MAX_LOCAL_PART
        assert verified(detail_of(signed, list_name), list_address=f"{list_name}@example.org") \
            == member
    else:
        # What comes back to it counts against nobody (tests/test_bounces.py).
        assert signed == f"{list_name}-bounces@example.org"


@pytest.mark.parametrize(("detail", "parsed"), [
    ("bob=example.net", Verp("bob@example.net", None)),
    ("Bob=Example.net+ABC", Verp("bob@example.net", "ABC")),
    ("a+b=c=example.net+tag", Verp("a+b=c@example.net", "tag")),
    ("a+b=c=example.net", Verp("a+b=c@example.net", None)),
    ("bob=example.net+", Verp("bob@example.net", "")),
    ("bob=+tag", None),
    ("bob+tag", None),
])
def test_verp_parse_separates_member_and_tag(detail: str, parsed: Verp | None) -> None:
    assert verp_parse(detail) == parsed
