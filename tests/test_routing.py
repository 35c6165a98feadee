"""The route table and address checks: which role an address plays, or why it plays none."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import addresses
from gateway.dsn import signed_verp, verp_verified
from gateway.errors import AddressError
from gateway.message import split
from gateway.routing import (
    RESERVED_SUFFIXES,
    ROUTES,
    Hit,
    ListRef,
    Miss,
    Role,
    Router,
    Stage,
    list_name_is_free,
)
from gateway.signing import LinkSigner

LISTS = {
    (ref.name, ref.domain): ref for ref in (
        ListRef(1, "discuss", "example.org"),
        ListRef(2, "python-dev", "example.org"),
        ListRef(3, "python", "example.org"),
        ListRef(4, "announce", "lists.example.com"),
        ListRef(5, "discuss", "xn--bcher-kva.example"),  # bücher.example
        ListRef(6, "a.b_c", "example.org"),
    )
}
TOKEN = "abcdefghijklmnopqrstuvwxyz234567"


def router() -> Router:
    domains = {domain for _name, domain in LISTS}
    return Router(lambda name, domain: LISTS.get((name, domain)),
                  serves_domain=lambda domain: domain in domains)


@pytest.mark.parametrize("address, role, list_address, detail", [
    ("discuss@example.org", Role.POST, "discuss@example.org", None),
    ("discuss-request@example.org", Role.REQUEST, "discuss@example.org", None),
    ("discuss-join@example.org", Role.JOIN, "discuss@example.org", None),
    ("discuss-subscribe@example.org", Role.JOIN, "discuss@example.org", None),
    ("discuss-leave@example.org", Role.LEAVE, "discuss@example.org", None),
    ("discuss-unsubscribe@example.org", Role.LEAVE, "discuss@example.org", None),
    ("discuss-owner@example.org", Role.OWNER, "discuss@example.org", None),
    (f"discuss-confirm+{TOKEN}@example.org", Role.CONFIRM, "discuss@example.org", TOKEN),
    ("discuss-confirm+" + "a" * 16 + "@example.org", Role.CONFIRM, "discuss@example.org",
     "a" * 16),
    ("discuss-confirm+" + "Z9_-" * 32 + "@example.org", Role.CONFIRM, "discuss@example.org",
     "Z9_-" * 32),
    # A token may end in what looks like another role's suffix.
    ("discuss-confirm+abcdefghijklmnop-owner@example.org", Role.CONFIRM, "discuss@example.org",
     "abcdefghijklmnop-owner"),
    ("discuss-confirm+abcdefghijklmnop-request@example.org", Role.CONFIRM,
     "discuss@example.org", "abcdefghijklmnop-request"),
    ("discuss-bounces@example.org", Role.BOUNCES, "discuss@example.org", None),
    ("discuss-bounces+bob=example.net@example.org", Role.BOUNCES, "discuss@example.org",
     "bob=example.net"),
    ("discuss-bounces+x-request@example.org", Role.BOUNCES, "discuss@example.org", "x-request"),
    # The signed VERP form: the member's address, then its tag (gateway.dsn.signed_verp).
    ("discuss-bounces+bob=example.net+k7abq2xyzmn4@example.org", Role.BOUNCES,
     "discuss@example.org", "bob=example.net+k7abq2xyzmn4"),
    ("discuss-bounces+a+b=example.net+K7ABQ2XYZMN4@example.org", Role.BOUNCES,
     "discuss@example.org", "a+b=example.net+K7ABQ2XYZMN4"),
    # A VERP-encoded member address may itself be another list's bounce address.
    ("discuss-bounces+python-dev-bounces+x=example.net@example.org", Role.BOUNCES,
     "discuss@example.org", "python-dev-bounces+x=example.net"),
    (f"python-dev-confirm+{TOKEN}-bounces@example.org", Role.CONFIRM, "python-dev@example.org",
     f"{TOKEN}-bounces"),
    # Lists whose names contain hyphens, next to a list named like their first part.
    ("python@example.org", Role.POST, "python@example.org", None),
    ("python-dev@example.org", Role.POST, "python-dev@example.org", None),
    ("python-dev-request@example.org", Role.REQUEST, "python-dev@example.org", None),
    ("python-dev-join@example.org", Role.JOIN, "python-dev@example.org", None),
    ("python-dev-leave@example.org", Role.LEAVE, "python-dev@example.org", None),
    ("python-dev-owner@example.org", Role.OWNER, "python-dev@example.org", None),
    (f"python-dev-confirm+{TOKEN}@example.org", Role.CONFIRM, "python-dev@example.org", TOKEN),
    ("python-dev-bounces+bob=example.net@example.org", Role.BOUNCES, "python-dev@example.org",
     "bob=example.net"),
    ("python-request@example.org", Role.REQUEST, "python@example.org", None),
    ("a.b_c-owner@example.org", Role.OWNER, "a.b_c@example.org", None),
    ("announce@lists.example.com", Role.POST, "announce@lists.example.com", None),
    # Case does not matter in list names and domains; tokens keep their case.
    ("Discuss@Example.ORG", Role.POST, "discuss@example.org", None),
    ("PYTHON-DEV-request@example.org", Role.REQUEST, "python-dev@example.org", None),
    ("discuss-request@EXAMPLE.org", Role.REQUEST, "discuss@example.org", None),
    ("DISCUSS-confirm+AbCdEfGhIjKlMnOpQr@example.org", Role.CONFIRM, "discuss@example.org",
     "AbCdEfGhIjKlMnOpQr"),
    # The forms an envelope address may come in.
    ("<discuss@example.org>", Role.POST, "discuss@example.org", None),
    ("  discuss@example.org  ", Role.POST, "discuss@example.org", None),
    ("discuss@example.org.", Role.POST, "discuss@example.org", None),
    # IDN domains are matched in their ASCII (punycode) form.
    ("discuss@bücher.example", Role.POST, "discuss@xn--bcher-kva.example", None),
    ("discuss-request@BÜCHER.example", Role.REQUEST, "discuss@xn--bcher-kva.example", None),
    ("discuss@xn--bcher-kva.example", Role.POST, "discuss@xn--bcher-kva.example", None),
])
def test_routing_hits(address: str, role: Role, list_address: str, detail: str | None) -> None:
    found = router().resolve(address)
    assert isinstance(found, Hit), found
    assert found.route.role is role
    assert found.mailing_list.address == list_address
    assert found.detail == detail
    assert found.address == address
    assert role.value in found.reason and list_address in found.reason


@pytest.mark.parametrize("member", [
    "bob@example.net", "x-bounces+y=z@mail.example.net", "a+b@example.net",
])
def test_routing_signed_verp_reaches_its_list_with_a_detail_that_verifies(member: str) -> None:
    signer = LinkSigner(b"the installation's key, 32 bytes")
    for list_address in ("discuss@example.org", "python-dev@example.org"):
        name, domain = list_address.split("@")
        found = router().resolve(signed_verp(name, domain, member, signer))
        assert isinstance(found, Hit), found
        assert found.route.role is Role.BOUNCES
        assert found.mailing_list.address == list_address and found.detail is not None
        assert verp_verified(found.detail, list_address=list_address, signer=signer) == member
        # A tag is good for one list only.
        other = "python@example.org" if name == "discuss" else "discuss@example.org"
        assert verp_verified(found.detail, list_address=other, signer=signer) is None


@pytest.mark.parametrize("address, role", [
    ("discuss-REQUEST@example.org", Role.REQUEST),
    ("Discuss-Owner@example.org", Role.OWNER),
    ("DISCUSS-BOUNCES+bob=example.net@example.org", Role.BOUNCES),
    (f"discuss-Confirm+{TOKEN}@example.org", Role.CONFIRM),
])
def test_routing_role_suffixes_ignore_case(address: str, role: Role) -> None:
    found = router().resolve(address)
    assert isinstance(found, Hit), found
    assert found.route.role is role


@pytest.mark.parametrize("address, reason", [
    ("nosuchlist@example.org", "'nosuchlist' is neither a list nor a list's -request"),
    ("nosuchlist-request@example.org", "'nosuchlist-request' is neither a list"),
    ("discuss@elsewhere.example", "no list is served at elsewhere.example; "
                                  "the gateway never relays"),
    ("announce@example.org", "'announce' is neither a list"),  # a list, but at another domain
    ("discuss@sub.example.org", "no list is served at sub.example.org"),
    ("discuss-confirm@example.org", "'discuss-confirm' is neither a list"),
    ("discuss-confirm+@example.org", "is neither a list"),
    ("discuss-confirm+abcdefghijklmno@example.org", "is neither a list"),  # 15 characters
    ("discuss-confirm+" + "a" * 129 + "@example.org", "is neither a list"),
    ("discuss-confirm+abcdefgh.jklmnopq@example.org", "is neither a list"),
    ("discuss-bounces+@example.org", "is neither a list"),
    ("discuss+tag@example.org", "is neither a list"),
    ("@relay.example:discuss@example.org", "source routes are not accepted"),
    ("<@relay.example,@other.example:discuss@example.org>", "source routes are not accepted"),
    ("discuss%elsewhere.example@example.org", "the local part has characters"),
    ("elsewhere.example!discuss@example.org", "the local part has characters"),
    ('"discuss"@example.org', "quoted local parts are not accepted"),
    ('"user@elsewhere.example"@example.org', "quoted local parts are not accepted"),
    ("discuss@[192.0.2.1]", "not a valid domain name"),
    ("discuss@[IPv6:2001:db8::1]", "source routes are not accepted"),
    ("discuss@localhost", "not a valid domain name"),
    ("discuss@-bad.example.org", "not a valid domain name"),
    ("discuss@exa_mple.org", "not a valid domain name"),
    ("discuss@exa..mple.org", "not a valid domain name"),
    ("discuss", "not of the form local@domain"),
    ("@example.org", "source routes are not accepted"),
    ("discuss@", "not of the form local@domain"),
    ("", "not of the form local@domain"),
    (".discuss@example.org", "the local part has characters"),
    ("dis cuss@example.org", "the local part has characters"),
])
def test_routing_misses_say_why(address: str, reason: str) -> None:
    found = router().resolve(address)
    assert isinstance(found, Miss), found
    assert found.address == address
    assert reason in found.reason, found.reason


def test_routing_table_ends_with_the_post_route_and_covers_every_role() -> None:
    assert ROUTES[-1].role is Role.POST
    assert {r.role for r in ROUTES} == set(Role)
    assert {r.role: r.stage for r in ROUTES} == {
        Role.POST: Stage.MODERATION, Role.REQUEST: Stage.COMMANDS, Role.JOIN: Stage.COMMANDS,
        Role.LEAVE: Stage.COMMANDS, Role.CONFIRM: Stage.COMMANDS, Role.OWNER: Stage.OWNER,
        Role.BOUNCES: Stage.BOUNCES,
    }


@pytest.mark.parametrize("name", ["discuss", "python-dev", "requests", "foo-requester",
                                  "owners", "my-ownerlist", "confirm", "bounces-list", "join"])
def test_routing_list_name_is_free(name: str) -> None:
    assert list_name_is_free(name) is None


@pytest.mark.parametrize("suffix", RESERVED_SUFFIXES)
def test_routing_list_name_with_reserved_suffix_is_not_free(suffix: str) -> None:
    why = list_name_is_free(f"python-dev{suffix}")
    assert why is not None
    assert repr(suffix) in why
    assert f"clash with the {suffix[1:]} address" in why


@pytest.mark.parametrize("address", [
    "discuss-request@example.org", "discuss-join@example.org", "discuss-subscribe@example.org",
    "discuss-leave@example.org", "discuss-unsubscribe@example.org", "discuss-owner@example.org",
    "discuss-bounces@example.org", "discuss-confirm@example.org",
])
def test_routing_no_role_address_can_be_a_list_name(address: str) -> None:
    """Every role address of a list is reserved, so no list can shadow it."""
    local = address.split("@")[0]
    assert list_name_is_free(local) is not None
    found = router().resolve(address)
    if local == "discuss-confirm":  # needs its token
        assert isinstance(found, Miss)
    else:
        assert isinstance(found, Hit) and found.route.role is not Role.POST


# -- addresses.py ---------------------------------------------------------------

@pytest.mark.parametrize("address, normalised", [
    ("Alice@Example.NET", "alice@example.net"),
    ("<bob@example.net>", "bob@example.net"),
    ("carol+tag@sub.example.net.", "carol+tag@sub.example.net"),
    ("o'brien@example.ie", "o'brien@example.ie"),
    ("juergen@bücher.example", "juergen@xn--bcher-kva.example"),
])
def test_addresses_normalise(address: str, normalised: str) -> None:
    assert addresses.normalise(address) == normalised


@pytest.mark.parametrize("address", [
    "jürgen@example.org",  # a non-ASCII local part (SMTPUTF8) is not taken
    "a@b",
    "a b@example.org",
    "a..b@example.org",
    "a@example..org",
    "a@" + "x" * 64 + ".example",
])
def test_addresses_normalise_refuses(address: str) -> None:
    with pytest.raises(AddressError):
        addresses.normalise(address)


@pytest.mark.parametrize("name, ok", [
    ("discuss", True), ("Python-Dev", True), ("a", True), ("a.b_c-d", True), ("x" * 64, True),
    ("x" * 65, False), ("a..b", False), ("-discuss", False), ("discuss-", False),
    ("dis cuss", False), ("dis+cuss", False), ("", False), (".x", False),
])
def test_addresses_check_list_name(name: str, ok: bool) -> None:
    if ok:
        assert addresses.check_list_name(name) == name.lower()
    else:
        with pytest.raises(AddressError, match="a list name is 1-64"):
            addresses.check_list_name(name)


def test_addresses_header_addresses_skip_junk() -> None:
    values = ['"Alice A." <Alice@Example.net>, bob@example.net',
              "undisclosed-recipients:;", "Carol <carol%x@example.net>", "junk", ""]
    assert addresses.header_addresses(values) == ["alice@example.net", "bob@example.net"]


@pytest.mark.parametrize("value, first", [
    ('"Alice" <ALICE@example.net>', "alice@example.net"),
    ("bob@example.net (Bob)", "bob@example.net"),
    ("", None),
    (None, None),
    ("not an address", None),
])
def test_addresses_first_address(value: str | None, first: str | None) -> None:
    assert addresses.first_address(value) == first


def test_addresses_hostile_address_header_does_not_exhaust_the_stack(corpus: Path) -> None:
    # 130 kB of nested groups: the stdlib parser recurses once per group.
    parts = split((corpus / "odd" / "mimekit__stack-overflow.txt.eml").read_bytes())
    to = parts.get_all("To")
    assert len(to[0]) > 100_000
    assert isinstance(addresses.header_addresses(to), list)
    found = addresses.first_address(to[0])
    assert found is None or "@" in found
