"""What leaves the gateway authenticates: DKIM on every copy, ARC on posts, DMARC
mitigation for strict domains, VERP return paths; verified by dkimpy at the sink."""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path

import dkim
import pytest
from click.testing import CliRunner

from gateway import lists
from gateway.authentication import Resolver, keygen, zone_txt_value
from gateway.cli import main
from gateway.store import Store
from tests.conftest import LIST, MEMBERS, Keys
from tests.support import Sink, gateway, post

STRICT = "boss@strict.example"


@pytest.fixture
def signed(tmp_path: Path, config_path: Path, keys: Keys) -> tuple[Path, dict[str, list[str]]]:
    """The list domain has a key in the gateway's dkim/ folder, published in 'DNS'."""
    directory = config_path.parent / "dkim"
    directory.mkdir()
    _path, record = keygen("example.org", "listgate", directory)
    records = dict(keys.resolver_records)
    records["listgate._domainkey.example.org."] = [zone_txt_value(record)]
    records["_dmarc.strict.example."] = ["v=DMARC1; p=reject; rua=mailto:d@strict.example"]
    return config_path, records


def dkim_ok(data: bytes, records: dict[str, list[str]]) -> bool:
    return bool(dkim.verify(data, dnsfunc=Resolver(records=records).dkimpy_dnsfunc()))


def arc_result(data: bytes, records: dict[str, list[str]]) -> bytes:
    cv, _results, _reason = dkim.arc_verify(data, dnsfunc=Resolver(records=records)
                                            .dkimpy_dnsfunc())
    return bytes(cv)


def test_outbound_every_copy_is_dkim_signed_and_arc_sealed(
        signed: tuple[Path, dict[str, list[str]]], sink: Sink) -> None:
    config, records = signed
    with gateway(config, resolver=Resolver(records=records)) as gw:
        gw.send(MEMBERS[1], LIST, post(MEMBERS[1], LIST, "Signed"))
        copies = sink.wait_for(len(MEMBERS))
    for _rcpt, data in copies:
        assert dkim_ok(data, records)
        assert arc_result(data, records) == b"pass"
        msg = email.message_from_bytes(data)
        assert "d=example.org" in msg["DKIM-Signature"].replace("\r\n", "")
        # RFC 8058 4: the one-click fields are covered by the signature.
        signed_fields = re.search(r"h=([^;]+)", msg["DKIM-Signature"]).group(1)  # type: ignore[union-attr]
        assert "list-unsubscribe-post" in signed_fields.lower()


def test_outbound_personal_copies_carry_verp_return_paths(
        signed: tuple[Path, dict[str, list[str]]], sink: Sink) -> None:
    config, records = signed
    with gateway(config, resolver=Resolver(records=records)) as gw:
        gw.send(MEMBERS[1], LIST, post(MEMBERS[1], LIST, "VERP"))
        sink.wait_for(len(MEMBERS))
    # The member's address, then a tag that only the gateway's key makes.
    senders = sorted(re.sub(r"\+[a-z2-7]{12}@", "@", m.mail_from)
                     for m in sink.handler.messages)
    assert senders == sorted(f"discuss-bounces+{a.replace('@', '=')}@example.org"
                             for a in MEMBERS)


def test_outbound_strict_dmarc_domain_gets_from_rewritten_and_still_verifies(
        signed: tuple[Path, dict[str, list[str]]], sink: Sink, store: Store) -> None:
    config, records = signed
    with store.write() as conn:
        lists.add_member(conn, lists.get(conn, LIST), STRICT, now=0.0,
                         display_name="The Boss")
    with gateway(config, resolver=Resolver(records=records)) as gw:
        data = post(STRICT, LIST, "From a strict domain").replace(
            f"From: {STRICT}".encode(), f"From: The Boss <{STRICT}>".encode())
        gw.send(STRICT, LIST, data)
        copies = sink.wait_for(len(MEMBERS) + 1)
    for _rcpt, copy in copies:
        msg = email.message_from_bytes(copy, policy=email.policy.default)
        assert msg["From"].addresses[0].addr_spec == LIST
        assert "The Boss via Discuss" in str(msg["From"])
        assert STRICT in str(msg["Reply-To"])
        assert STRICT in str(msg["X-Original-From"])
        assert dkim_ok(copy, records)


def test_outbound_wrap_mitigation_attaches_the_untouched_post(
        signed: tuple[Path, dict[str, list[str]]], sink: Sink, store: Store) -> None:
    config, records = signed
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        lists.add_member(conn, lst, STRICT, now=0.0)
        lists.update(conn, lst, dmarc_mitigation="wrap")
    original = post(STRICT, LIST, "Wrapped", "Inside.\n")
    with gateway(config, resolver=Resolver(records=records)) as gw:
        gw.send(STRICT, LIST, original)
        copy = sink.wait_for(len(MEMBERS) + 1)[0][1]
    msg = email.message_from_bytes(copy, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == LIST
    inner = next(p for p in msg.walk() if p.get_content_type() == "message/rfc822")
    assert str(inner.get_payload(0)["From"]) == STRICT  # type: ignore[union-attr]
    assert dkim_ok(copy, records)


def test_outbound_notices_are_signed_too(signed: tuple[Path, dict[str, list[str]]],
                                         sink: Sink) -> None:
    config, records = signed
    stranger = "stranger@example.com"
    with gateway(config, resolver=Resolver(records=records)) as gw:
        gw.send(stranger, LIST, post(stranger, LIST, "Hello?"))
        notice = sink.wait_for(1)[0][1]
    assert b"was rejected" in notice
    assert dkim_ok(notice, records)


def test_outbound_without_a_key_mail_goes_out_unsigned(config_path: Path, sink: Sink) -> None:
    with gateway(config_path) as gw:
        gw.send(MEMBERS[1], LIST, post(MEMBERS[1], LIST, "No key"))
        copies = sink.wait_for(len(MEMBERS))
    assert all(b"DKIM-Signature" not in data for _r, data in copies)


def test_outbound_dkim_keygen_prints_the_record_to_publish(tmp_path: Path,
                                                         config_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(config_path), "dkim", "keygen",
                                       "example.org", "--selector", "s2026"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('s2026._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    key = config_path.parent / "dkim" / "s2026._domainkey.example.org.key"
    assert key.stat().st_mode & 0o077 == 0
