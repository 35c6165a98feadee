"""Mail authentication: DKIM/ARC verification on real signed mail, our signing, DMARC
policy, trusted Authentication-Results, and the caching resolver over a real UDP stub."""

from __future__ import annotations

import base64
import collections
import csv
import os
import re
import socket
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import dkim
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.authentication import (
    AuthResults,
    Resolver,
    Signer,
    SigningKeys,
    aligned,
    arc_seal,
    arc_verify,
    dmarc_policy,
    keygen,
    parse_authentication_results,
    sign_and_seal,
    verify,
    zone_txt_value,
)
from gateway.clock import ManualClock
from gateway.errors import ConfigError, SigningError, TemporaryDNSError
from tests.support import CORPUS, post

DKIM_DIR = CORPUS / "dkim"
ODD_DIR = CORPUS / "odd"
NO_CORPUS = f"the shared mail corpus is not at {CORPUS}; these tests need it"

LIST_DOMAIN = "lists.example.org"
LIST_HEADERS = (
    "List-Id: Discuss <discuss.lists.example.org>\r\n"
    "List-Post: <mailto:discuss@lists.example.org>\r\n"
    "List-Unsubscribe: <https://lists.example.org/u/Zm9vYmFy>, "
    "<mailto:discuss-leave@lists.example.org>\r\n"
    "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
)


# ----------------------------------------------------------------- corpus tables


def _manifest(directory: Path) -> list[dict[str, str]]:
    with open(directory / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _corpus_params(directory: Path) -> list[object]:
    if not directory.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_CORPUS), id="no-corpus")]
    return [pytest.param(row, id=row["file"]) for row in _manifest(directory)]


def _odd_params() -> list[object]:
    if not ODD_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_CORPUS), id="no-corpus")]
    return [pytest.param(p, id=p.name) for p in sorted(ODD_DIR.glob("*.eml"))]


@pytest.fixture(scope="module")
def corpus_resolver() -> Resolver:
    if not DKIM_DIR.is_dir():
        pytest.skip(NO_CORPUS)
    records: dict[str, list[str]] = collections.defaultdict(list)
    with open(DKIM_DIR / "keys.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            records[row["name"]].append(row["txt_record"])
    return Resolver(records=records)


# Where we differ from the test suite's own verdict (`expected`), and why.
KNOWN_VS_EXPECTED = {
    # The ARC draft suite predates RFC 8617 and RFC 8301: rsa-sha1 is no longer valid.
    "arc__ams_fields_a_sha1.eml": "arc-cv=fail",
    "arc__as_fields_a_sha1.eml": "arc-cv=fail",
    # AMS without c=: dkimpy assumes relaxed/relaxed for ARC where the suite assumes
    # RFC 6376's default simple/simple, so the signature verifies for dkimpy.
    "arc__ams_fields_c_na.eml": "arc-cv=pass",
}


def _expected_verdict(expected: str) -> str:
    # The suite leaves cv empty where a seal already said cv=fail; RFC 8617 5.2 calls
    # that chain "fail".
    return "arc-cv=fail" if expected == "arc-cv=" else expected


def _signature_verdicts(results: AuthResults) -> list[str]:
    # A key absent from keys.tsv is NXDOMAIN to the injected resolver: RFC 6376 6.1.2 makes
    # that a permanent failure; the manifest calls it "temperror:no-key-offline".
    return [{"permerror": "temperror:no-key-offline"}.get(r, r) for _d, r in results.dkim]


@pytest.mark.parametrize("row", _corpus_params(DKIM_DIR))
def test_verify_corpus_message_matches_the_source_verdict(
        row: dict[str, str], corpus_resolver: Resolver) -> None:
    raw = (DKIM_DIR / row["file"]).read_bytes()
    results = verify(raw, corpus_resolver)
    if row["file"].startswith("arc__"):
        verdict = f"arc-cv={results.arc}"
        assert verdict == KNOWN_VS_EXPECTED.get(row["file"], _expected_verdict(row["expected"]))
        assert results.dkim == ()  # dkimpy_offline: dkim=no-signature
        return
    verdicts = _signature_verdicts(results)
    assert verdicts == row["dkimpy_offline"].split(",")
    assert [d for d, _r in results.dkim] == row["signing_domains"].split(",")
    if row["expected"] == "pass":
        assert set(verdicts) == {"pass"}
    elif row["expected"] == "fail":
        assert "pass" not in verdicts


def test_verify_corpus_agreement_counts(corpus_resolver: Resolver) -> None:
    """The counts the report quotes: our verdicts against `expected` and `dkimpy_offline`."""
    agree_expected = agree_dkimpy = with_expected = 0
    differ_dkimpy: dict[str, str] = {}
    for row in _manifest(DKIM_DIR):
        results = verify((DKIM_DIR / row["file"]).read_bytes(), corpus_resolver)
        if row["file"].startswith("arc__"):
            ours = f"arc-cv={results.arc}"
            offline = row["dkimpy_offline"].split(" ;")[0]
        else:
            ours = ",".join(_signature_verdicts(results))
            offline = row["dkimpy_offline"]
        if row["expected"]:
            with_expected += 1
            expected = _expected_verdict(row["expected"])
            if row["file"].startswith("arc__"):
                agree_expected += ours == expected
            else:
                agree_expected += ("pass" in ours.split(",")) == (expected == "pass")
        if ours == offline:
            agree_dkimpy += 1
        else:
            differ_dkimpy[row["file"]] = f"{ours} vs {offline}"
    assert (with_expected, agree_expected) == (173, 170)
    assert agree_dkimpy == 173
    assert differ_dkimpy == {
        # dkimpy returns None (printed "none") when a seal says cv=fail: we say fail.
        "arc__cv_fail_i1_as_cv_fail.eml": "arc-cv=fail vs arc-cv=none",
        "arc__cv_fail_i2_as2_fail.eml": "arc-cv=fail vs arc-cv=none",
        "arc__cv_fail_i2_as1_fail.eml": "arc-cv=fail vs arc-cv=none",
        # A 512-bit ARC key: under RFC 8301's 1024 bits, so the seal fails (as the suite says).
        "arc__as_fields_b_512.eml": "arc-cv=fail vs arc-cv=pass",
    }


@pytest.mark.parametrize("path", _odd_params())
def test_verify_odd_message_does_not_raise(path: Path, corpus_resolver: Resolver) -> None:
    raw = path.read_bytes()
    for use in ("dkim", "trusted-ar", "either"):
        results = verify(raw, corpus_resolver, use=use, trusted_authserv_ids=["mx.example.org"])
        assert results.dmarc in {"pass", "fail", "none", "temperror"}
        assert results.arc in {"pass", "fail", "none"}
    assert arc_verify(raw, corpus_resolver) in {"pass", "fail", "none"}


# ------------------------------------------------------------------- signing


@dataclass(frozen=True)
class Keys:
    rsa_path: Path
    rsa_record: str
    ed_path: Path
    ed_record: str

    def resolver(self, *, rsa: bool = True, ed: bool = True,
                 extra: dict[str, list[str]] | None = None) -> Resolver:
        records = dict(extra or {})
        if rsa:
            records[f"rsa._domainkey.{LIST_DOMAIN}"] = [zone_txt_value(self.rsa_record)]
        if ed:
            records[f"ed._domainkey.{LIST_DOMAIN}"] = [zone_txt_value(self.ed_record)]
        return Resolver(records=records)

    def signer(self, *, ed25519: bool = False, clock: ManualClock | None = None) -> Signer:
        return Signer(LIST_DOMAIN, "rsa", self.rsa_path.read_bytes(),
                      ed25519=("ed", self.ed_path.read_bytes()) if ed25519 else None,
                      clock=clock)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("dkim-keys")
    rsa_path, rsa_record = keygen(LIST_DOMAIN, "rsa", directory)
    ed_path, ed_record = keygen(LIST_DOMAIN, "ed", directory, ed25519=True)
    return Keys(rsa_path, rsa_record, ed_path, ed_record)


def list_copy(sender: str = f"alice@{LIST_DOMAIN}", body: str = "Hello, list.\n") -> bytes:
    """A message as decoration leaves it, about to be signed."""
    return post(sender, f"discuss@{LIST_DOMAIN}", "[Discuss] Hello", body,
                extra_headers=LIST_HEADERS)


def _dkimpy_verifies(data: bytes, resolver: Resolver, idx: int = 0) -> bool:
    checker = dkim.DKIM(data)
    try:
        return bool(checker.verify(idx, dnsfunc=resolver.dkimpy_dnsfunc()))
    except dkim.ValidationError:  # how dkimpy reports a changed body
        return False


def test_keygen_writes_a_private_key_only_the_owner_can_read(keys: Keys) -> None:
    for path in (keys.rsa_path, keys.ed_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.rsa_record.startswith(f"rsa._domainkey.{LIST_DOMAIN}. IN TXT \"v=DKIM1; k=rsa; p=")
    assert keys.ed_record.startswith(f"ed._domainkey.{LIST_DOMAIN}. IN TXT \"v=DKIM1; k=ed25519;")
    # Zone files cap each string at 255 octets: a 2048-bit key needs two.
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', keys.rsa_record))
    assert len(re.findall(r'"([^"]*)"', keys.rsa_record)) == 2
    public = base64.b64decode(zone_txt_value(keys.rsa_record).split("p=", 1)[1])
    key = serialization.load_der_public_key(public)
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


def test_keygen_never_overwrites_a_key(keys: Keys) -> None:
    before = keys.rsa_path.read_bytes()
    with pytest.raises(ConfigError, match="never overwritten"):
        keygen(LIST_DOMAIN, "rsa", keys.rsa_path.parent)
    assert keys.rsa_path.read_bytes() == before


def test_signer_signature_verifies_with_dkimpy_against_the_keygen_record(keys: Keys) -> None:
    signed = keys.signer().sign(list_copy())
    resolver = keys.resolver()
    assert _dkimpy_verifies(signed, resolver)
    results = verify(signed, resolver)
    assert results.dkim == ((LIST_DOMAIN, "pass"),)
    assert results.dkim_aligned_pass and results.authenticated


def test_signer_signs_list_headers_and_oversigns_from(keys: Keys) -> None:
    signed = keys.signer().sign(list_copy())
    tags = dkim.util.parse_tag_value(dkim.DKIM(signed).headers[0][1])
    h = [n.strip() for n in tags[b"h"].decode().split(":")]
    assert tags[b"a"] == b"rsa-sha256" and tags[b"c"] == b"relaxed/relaxed"
    for name in ("list-id", "list-post", "list-unsubscribe", "list-unsubscribe-post",
                 "subject", "date", "message-id", "to", "mime-version", "content-type"):
        assert name in h
    assert h.count("from") == 2  # one From present, signed once more


def test_signer_timestamp_comes_from_the_clock(keys: Keys) -> None:
    clock = ManualClock(1_900_000_000.0)
    signed = keys.signer(clock=clock).sign(list_copy())
    assert dkim.util.parse_tag_value(dkim.DKIM(signed).headers[0][1])[b"t"] == b"1900000000"


@pytest.mark.parametrize(("what", "old", "new"), [
    ("List-Unsubscribe changed", b"/u/Zm9vYmFy>", b"/u/ZXZpbA>"),
    ("List-Unsubscribe-Post changed", b"List-Unsubscribe=One-Click", b"List-Unsubscribe=No"),
    ("List-Id changed", b"<discuss.lists.example.org>", b"<other.lists.example.org>"),
    ("List-Post changed", b"<mailto:discuss@", b"<mailto:evil@"),
    ("second List-Unsubscribe added", b"List-Unsubscribe:",
     b"List-Unsubscribe: <https://evil.example/u>\r\nList-Unsubscribe:"),
    ("second From added", b"From:", b"From: mallory@evil.example\r\nFrom:"),
    ("body changed", b"Hello, list.", b"Hello, lost."),
])
def test_signer_signature_fails_when_the_message_is_altered(
        keys: Keys, what: str, old: bytes, new: bytes) -> None:
    signed = keys.signer().sign(list_copy())
    head, sep, body = signed.partition(b"\r\n\r\n")
    if what == "body changed":
        altered = head + sep + body.replace(old, new, 1)
    else:
        # Past our own signature field, so that only the message is touched.
        sig_end = head.index(b"\r\n", head.index(b"b="))
        altered = head[:sig_end] + head[sig_end:].replace(old, new, 1) + sep + body
    assert altered != signed, what
    resolver = keys.resolver()
    assert not _dkimpy_verifies(altered, resolver), what
    assert verify(altered, resolver).dkim[0][1] == "fail", what


def test_signer_second_ed25519_signature_verifies_on_its_own(keys: Keys) -> None:
    signed = keys.signer(ed25519=True).sign(list_copy())
    checker = dkim.DKIM(signed)
    algorithms = [dkim.util.parse_tag_value(v)[b"a"] for n, v in checker.headers
                  if n.lower() == b"dkim-signature"]
    assert algorithms == [b"rsa-sha256", b"ed25519-sha256"]
    assert _dkimpy_verifies(signed, keys.resolver(), idx=1)
    assert verify(signed, keys.resolver()).dkim == ((LIST_DOMAIN, "pass"), (LIST_DOMAIN, "pass"))
    # With the RSA key unpublished, the ed25519 signature alone still authenticates.
    alone = verify(signed, keys.resolver(rsa=False))
    assert alone.dkim == ((LIST_DOMAIN, "permerror"), (LIST_DOMAIN, "pass"))
    assert alone.authenticated


def test_signer_from_files_refuses_a_key_others_can_read(keys: Keys, tmp_path: Path) -> None:
    key = tmp_path / "dkim.key"
    key.write_bytes(keys.rsa_path.read_bytes())
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError) as raised:
        Signer.from_files(LIST_DOMAIN, "rsa", key)
    message = str(raised.value)
    assert str(key) in message and f"chmod 600 {key}" in message and "0644" in message
    assert "PRIVATE KEY" not in message and "MII" not in message
    os.chmod(key, 0o600)
    signer = Signer.from_files(LIST_DOMAIN, "rsa", key, ed25519_selector="ed",
                               ed25519_key_path=keys.ed_path)
    assert "PRIVATE" not in repr(signer)
    assert _dkimpy_verifies(signer.sign(list_copy()), keys.resolver(), idx=1)


# A throwaway 512-bit key (`openssl genrsa 512`), only ever to be refused;
# `cryptography` will not generate one this small.
SMALL_KEY = b"""\
-----BEGIN PRIVATE KEY-----
MIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAxxsniOTZRwUu3bc2
G8F8OCrR8OOR1IDFqPfkovcBGPgI3hPzu4u+ZfJZ/axUn30EYegXKGNH/OMohvuT
KzqmJwIDAQABAkBxXyfqzgxeYTgnbTw1H74gqVkzphEShGSIaubYWHdahFdsRknb
qo3hyF3R6LBPVpSakCTbz2WKfqi8P4IPEKQZAiEA9M5o0uTcLo6/LzZPJea3XnbF
cYIfd9+S66l9kbAKAX0CIQDQNcyT0mGzzJemfiKktY4vKx1h5+aoGZuKPAs9hizX
cwIhAOnMT7RKOjaEwfZXCdQKukmPaRX0zhTwAyLqZjBDTesJAiEAnNDoVC2QCKt/
TJaT4RodDMmcR7ExuEoRK/wtOxljjKECIQDRE40LjsUsctdGyOSy5JJlJ0QB39eV
X+Moc1WcvpsFHQ==
-----END PRIVATE KEY-----
"""


def test_signer_refuses_a_key_that_is_not_rsa_or_too_small(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        Signer(LIST_DOMAIN, "rsa", b"not a key")
    with pytest.raises(ConfigError, match="512 bits"):
        Signer(LIST_DOMAIN, "rsa", SMALL_KEY)
    with pytest.raises(ConfigError, match="selector"):
        keygen(LIST_DOMAIN, "../escape", tmp_path)
    with pytest.raises(ConfigError, match="2048 to 4096"):
        keygen(LIST_DOMAIN, "weak", tmp_path, bits=1024)


def test_verify_rejects_what_rfc_8301_forbids_though_dkimpy_accepts_sha1(keys: Keys) -> None:
    message = list_copy()
    sha1 = dkim.sign(message, b"rsa", LIST_DOMAIN.encode(), keys.rsa_path.read_bytes(),
                     signature_algorithm=b"rsa-sha1") + message
    resolver = keys.resolver()
    assert _dkimpy_verifies(sha1, resolver)
    assert verify(sha1, resolver).dkim == ((LIST_DOMAIN, "permerror"),)
    small = dkim.sign(message, b"small", LIST_DOMAIN.encode(), SMALL_KEY) + message
    public = serialization.load_pem_private_key(SMALL_KEY, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode()
    small_resolver = Resolver(records={f"small._domainkey.{LIST_DOMAIN}": [record]})
    assert verify(small, small_resolver).dkim == ((LIST_DOMAIN, "permerror"),)


def test_verify_from_domain_alignment(keys: Keys) -> None:
    resolver = keys.resolver()
    signer = keys.signer()
    sub = verify(signer.sign(list_copy(sender="bob@news.lists.example.org")), resolver)
    assert sub.from_domain == "news.lists.example.org" and sub.dkim_aligned_pass
    foreign = verify(signer.sign(list_copy(sender="bob@example.net")), resolver)
    assert foreign.dkim == ((LIST_DOMAIN, "pass"),) and not foreign.authenticated
    two_froms = signer.sign(b"From: x@example.net\r\n" + list_copy())
    both = verify(two_froms, resolver)
    assert both.from_domain is None and not both.authenticated


@pytest.mark.parametrize(("d", "from_domain", "expected"), [
    ("example.com", "example.com", True),
    ("Example.COM.", "example.com", True),
    ("example.com", "mail.example.com", True),
    ("mail.example.com", "example.com", True),
    ("attacker.co.uk", "victim.co.uk", False),   # siblings under a public suffix
    ("a.example.com", "b.example.com", False),   # stricter than RFC 7489 here: fails closed
    ("com", "example.com", False),
    ("example.com.evil.net", "example.com", False),
    ("badexample.com", "example.com", False),
])
def test_aligned_by_ancestry(d: str, from_domain: str, expected: bool) -> None:
    assert aligned(d, from_domain) is expected


# --------------------------------------------- trusted Authentication-Results


def _with_ar(*fields: str, sender: str = "alice@example.net") -> bytes:
    ar = "".join(f"Authentication-Results: {v}\r\n" for v in fields)
    return post(sender, "discuss@lists.example.org", "Hi", extra_headers=ar)


TRUSTED = ["mx.lists.example.org"]


@pytest.mark.parametrize(("fields", "authenticated", "trusted"), [
    # Only an untrusted authserv-id vouches: anyone can write that.
    (["mx.evil.example; dmarc=pass header.from=example.net"], False, None),
    # The trusted MTA's field (topmost) says fail; a sender's copy below says pass.
    (["mx.lists.example.org; dmarc=fail header.from=example.net",
      "mx.lists.example.org; dmarc=pass header.from=example.net"],
     False, "dmarc=fail header.from=example.net"),
    # An untrusted field above the trusted one does not hide it.
    (["mx.evil.example; dmarc=fail", "MX.Lists.Example.Org 1; dmarc=pass"], True, "dmarc=pass"),
    (["mx.lists.example.org; spf=pass smtp.mailfrom=example.net; "
      "dkim=pass (2048-bit key) header.d=example.net header.i=@example.net; "
      "dmarc=pass (p=reject dis=none) header.from=example.net"],
     True, "dmarc=pass header.from=example.net"),
    # dmarc=pass for another From domain than ours is not about this author.
    (["mx.lists.example.org; dmarc=pass header.from=other.example"], False,
     "dmarc=pass header.from=other.example"),
    (["mx.lists.example.org; dkim=pass header.d=example.net"], True,
     "dkim=pass header.d=example.net"),
    (["mx.lists.example.org; dkim=pass header.i=@mail.example.net"], True,
     "dkim=pass header.d=mail.example.net"),
    (["mx.lists.example.org; dkim=pass header.d=evil.example"], False,
     "dkim=pass header.d=evil.example"),
    # Text a sender controls cannot smuggle a result past the parser.
    (['mx.lists.example.org; dkim=fail (forged "; dmarc=pass") header.d=example.net'], False,
     "dkim=fail header.d=example.net"),
    (['mx.lists.example.org; dmarc=fail header.from="x; dmarc=pass"'], False,
     "dmarc=fail header.from=x; dmarc=pass"),
    # The topmost trusted field cannot be read: it still hides the forged one below.
    (["mx.lists.example.org; dmarc=fail header.from=ev(il.example",
      "mx.lists.example.org; dmarc=pass"], False, "none"),
    (["(front) mx.lists.example.org; dmarc=pass"], True, "dmarc=pass"),
    (["mx.lists.example.org; none"], False, "none"),
    ([], False, None),
])
def test_verify_trusted_ar_believes_only_the_topmost_trusted_field(
        fields: list[str], authenticated: bool, trusted: str | None) -> None:
    results = verify(_with_ar(*fields), Resolver(records={}), use="trusted-ar",
                     trusted_authserv_ids=TRUSTED)
    assert results.authenticated is authenticated
    assert results.trusted == trusted
    assert results.dkim == ()


def test_verify_dkim_mode_ignores_authentication_results() -> None:
    raw = _with_ar("mx.lists.example.org; dmarc=pass header.from=example.net")
    results = verify(raw, Resolver(records={}), use="dkim", trusted_authserv_ids=TRUSTED)
    assert results.trusted is None and not results.authenticated


def test_verify_either_mode_authenticates_by_whichever_passes(keys: Keys) -> None:
    resolver = keys.resolver()
    unsigned = _with_ar("mx.lists.example.org; dmarc=pass header.from=example.net")
    assert verify(unsigned, resolver, use="either", trusted_authserv_ids=TRUSTED).authenticated
    signed = keys.signer().sign(list_copy())
    results = verify(signed, resolver, use="either", trusted_authserv_ids=TRUSTED)
    assert results.authenticated and results.trusted is None


def test_verify_trusted_ar_on_a_corpus_message(corpus_resolver: Resolver) -> None:
    raw = (DKIM_DIR / "arc__cv_pass_i1_1.eml").read_bytes()
    results = verify(raw, corpus_resolver, use="trusted-ar",
                     trusted_authserv_ids=["lists.example.org"])
    assert results.from_domain == "d1.example.org"
    assert results.trusted == "dmarc=pass" and results.dmarc == "pass" and results.authenticated
    assert not verify(raw, corpus_resolver, use="trusted-ar",
                      trusted_authserv_ids=["mx.other.example"]).authenticated


def test_verify_refuses_an_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="use="):
        verify(post("a@example.net", "b@example.org", "x"), Resolver(records={}), use="spf")


def test_parse_authentication_results_handles_versions_comments_and_quotes() -> None:
    parsed = parse_authentication_results(
        'mx.example.org 1; (c; "x") dkim/1 = pass (good (nested)) header.d="example.net"; '
        "auth=pass smtp.auth=joe;")
    assert parsed is not None
    authserv, results = parsed
    assert authserv == "mx.example.org"
    assert [(r.method, r.result, r.properties) for r in results] == [
        ("dkim", "pass", (("header.d", "example.net"),)),
        ("auth", "pass", (("smtp.auth", "joe"),))]
    assert parse_authentication_results("mx.example.org; dkim=pass (unbalanced") is None


# ----------------------------------------------------------------------- DMARC

DMARC_RECORDS = {
    "_dmarc.reject.example": ["v=DMARC1; p=reject; rua=mailto:d@reject.example"],
    "_dmarc.quarantine.example": ["v=DMARC1;p=quarantine;pct=50"],
    "_dmarc.none.example": ["v=DMARC1; p=none"],
    "_dmarc.sp.example": ["v=DMARC1; p=reject; sp=none"],
    "_dmarc.sub.sp.example": ["v=DMARC1; p=quarantine"],
    "_dmarc.nosp.example": ["v=DMARC1; p=quarantine"],
    "_dmarc.twice.example": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    "_dmarc.badp-rua.example": ["v=DMARC1; p=bogus; rua=mailto:d@badp-rua.example"],
    "_dmarc.badp.example": ["v=DMARC1; p=bogus"],
    "_dmarc.spf.example": ["v=spf1 -all"],
    "_dmarc.mixed.example": ["some verification token", "v=DMARC1; p=reject"],
    "_dmarc.h.i.j.k.l.m.deep.example": ["v=DMARC1; p=none"],
    "_dmarc.deep.example": ["v=DMARC1; p=reject"],
}


@pytest.mark.parametrize(("domain", "policy"), [
    ("reject.example", "reject"),
    ("quarantine.example", "quarantine"),
    ("none.example", "none"),
    ("sp.example", "reject"),
    ("mail.sp.example", "none"),             # sp= of the organisational record
    ("a.b.nosp.example", "quarantine"),      # no sp=: p= applies to subdomains
    ("x.sub.sp.example", "quarantine"),      # the nearest record on the way up wins
    ("sub.sp.example", "quarantine"),
    ("twice.example", None),                 # RFC 7489 6.6.3: two records, no policy
    ("badp-rua.example", "none"),            # invalid p= with rua=: as p=none
    ("badp.example", None),
    ("spf.example", None),
    ("mixed.example", "reject"),
    ("absent.example", None),
    ("example", None),
    # Eight labels or more: the walk jumps to the last seven, skipping the record at nine.
    ("a.b.c.d.e.f.g.h.i.j.k.l.m.deep.example", "reject"),
    ("j.k.l.m.deep.example", "reject"),
])
def test_dmarc_policy_from_injected_records(domain: str, policy: str | None) -> None:
    assert dmarc_policy(domain, Resolver(records=DMARC_RECORDS)) == policy


def test_verify_dmarc_result_follows_policy_and_alignment(keys: Keys) -> None:
    resolver = keys.resolver(extra={f"_dmarc.{LIST_DOMAIN}": ["v=DMARC1; p=reject"],
                                    "_dmarc.example.net": ["v=DMARC1; p=quarantine"]})
    signed = keys.signer().sign(list_copy())
    ours = verify(signed, resolver)
    assert (ours.dmarc_policy, ours.dmarc) == ("reject", "pass")
    forwarded = verify(keys.signer().sign(list_copy(sender="bob@example.net")), resolver)
    assert (forwarded.dmarc_policy, forwarded.dmarc) == ("quarantine", "fail")
    unsigned = verify(list_copy(sender="bob@example.org"), resolver)
    assert (unsigned.dmarc_policy, unsigned.dmarc) == (None, "none")


# ------------------------------------------------------------------------- ARC


def _dkimpy_arc(data: bytes, resolver: Resolver) -> bytes | None:
    """dkimpy's own chain verdict: b"pass", b"fail", b"none", or None (a seal says fail)."""
    cv: bytes | None = dkim.arc_verify(data, dnsfunc=resolver.dkimpy_dnsfunc())[0]
    return cv


def _instances(data: bytes) -> list[int]:
    """The i= of each ARC-Seal, top to bottom, as dkimpy reads them."""
    return [int(dkim.util.parse_tag_value(v)[b"i"]) for n, v in dkim.DKIM(data).headers
            if n.lower() == b"arc-seal"]


def _seal_tags(data: bytes) -> dict[bytes, bytes]:
    [(name, value)] = [(n, v) for n, v in dkim.DKIM(data).headers[:1]]
    assert name == b"ARC-Seal"
    return dict(dkim.util.parse_tag_value(value))


def _arc_corpus_params() -> list[object]:
    if not DKIM_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_CORPUS), id="no-corpus")]
    return [pytest.param(p, id=p.name) for p in sorted(DKIM_DIR.glob("*.eml"))]


# The ARC suite's chains that an earlier hop already sealed with cv=fail.
TERMINATED = {"arc__cv_fail_i1_as_cv_fail.eml", "arc__cv_fail_i2_as1_fail.eml",
              "arc__cv_fail_i2_as2_fail.eml"}


@pytest.mark.parametrize("path", _arc_corpus_params())
def test_arc_seal_on_every_corpus_message_validates_with_dkimpy(
        path: Path, signer: Signer, merged_resolver: Resolver) -> None:
    """Chains we start (none), extend (pass) and record as broken (fail), as dkimpy sees
    them: ours is the next instance, cv= is the chain as we received it."""
    raw = path.read_bytes()
    results = verify(raw, merged_resolver)
    before, _sets = dkim.ARC(raw).sorted_arc_headers()
    if path.name in TERMINATED:
        assert results.arc == "fail"
        with pytest.raises(SigningError, match="cannot be continued"):
            arc_seal(raw, signer=signer, authserv_id=LIST_DOMAIN, results=results)
        return
    sealed = arc_seal(raw, signer=signer, authserv_id=LIST_DOMAIN, results=results)
    tags = _seal_tags(sealed)
    assert (tags[b"i"], tags[b"cv"]) == (b"%d" % (before + 1), results.arc.encode())
    assert (tags[b"a"], tags[b"d"], tags[b"s"]) == (b"rsa-sha256", LIST_DOMAIN.encode(), b"rsa")
    expected = {"none": b"pass", "pass": b"pass", "fail": None}[results.arc]
    verdict = _dkimpy_arc(sealed, merged_resolver)
    # dkimpy gives up before our cv=fail seal on a chain it cannot even take apart.
    assert verdict == expected or (results.arc == "fail" and verdict == b"fail"), verdict
    assert arc_verify(sealed, merged_resolver) == ("fail" if results.arc == "fail" else "pass")


def test_arc_seal_extends_a_passing_chain(keys: Keys, merged_resolver: Resolver) -> None:
    raw = (DKIM_DIR / "arc__cv_pass_i1_1.eml").read_bytes()
    results = verify(raw, merged_resolver)
    assert results.arc == "pass"
    sealed = arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN, results=results)
    assert sealed.startswith(b"ARC-Seal: i=2; cv=pass;")
    assert _dkimpy_arc(sealed, merged_resolver) == b"pass"
    # A third hop can extend ours in turn.
    again = verify(sealed, merged_resolver)
    assert again.arc == "pass"
    third = arc_seal(sealed, signer=keys.signer(), authserv_id="mx2.example.org", results=again)
    assert third.startswith(b"ARC-Seal: i=3; cv=pass;")
    assert _dkimpy_arc(third, merged_resolver) == b"pass"


def test_arc_seal_starts_a_chain_and_drops_forged_results_in_our_name(keys: Keys) -> None:
    raw = _with_ar(f"{LIST_DOMAIN}; dmarc=pass header.from=bank.example",
                   "mx.other.example; dkim=pass header.d=example.net")
    resolver = keys.resolver()
    results = verify(raw, resolver)
    assert results.arc == "none"
    sealed = arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN, results=results)
    assert sealed.startswith(b"ARC-Seal: i=1; cv=none;")
    assert _dkimpy_arc(sealed, resolver) == b"pass"
    assert arc_verify(sealed, resolver) == "pass"
    assert b"bank.example" not in sealed
    assert b"Authentication-Results: mx.other.example" in sealed  # others' are kept
    aar = re.search(rb"ARC-Authentication-Results: (.*?)\r\n(?![ \t])", sealed, re.S)
    assert aar is not None and aar.group(1).startswith(b"i=1; lists.example.org;")
    assert b"dmarc=none header.from=example.net" in aar.group(1)


def test_arc_seal_message_signature_breaks_when_the_copy_is_altered(keys: Keys) -> None:
    resolver = keys.resolver()
    raw = list_copy()
    sealed = arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN,
                      results=verify(raw, resolver))
    for old, new in ((b"Hello, list.", b"Hello, lost."), (b"[Discuss] Hello", b"[Discuss] Bye"),
                     (b"cv=none", b"cv=pass")):
        altered = sealed.replace(old, new, 1)
        assert altered != sealed
        assert _dkimpy_arc(altered, resolver) == b"fail", old


def test_arc_seal_records_a_failed_chain(keys: Keys, merged_resolver: Resolver) -> None:
    raw = (DKIM_DIR / "arc__cv_fail_i1_ams_invalid.eml").read_bytes()
    results = verify(raw, merged_resolver)
    assert results.arc == "fail"
    sealed = arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN, results=results)
    assert sealed.startswith(b"ARC-Seal: i=2; cv=fail;")
    assert arc_verify(sealed, merged_resolver) == "fail"


def test_arc_seal_after_a_failure_covers_only_its_own_set(
        keys: Keys, merged_resolver: Resolver) -> None:
    """RFC 8617 5.1.2. No validator checks a cv=fail seal, so check it by hand: with the
    broken set i=1 taken out, dkimpy finds our seal valid over our set alone."""
    raw = (DKIM_DIR / "arc__cv_fail_i1_ams_invalid.eml").read_bytes()
    sealed = arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN,
                      results=verify(raw, merged_resolver))
    head, sep, body = sealed.partition(b"\r\n\r\n")
    lines = re.split(rb"\r\n(?![ \t])", head)
    ours = [f for f in lines if re.match(rb"ARC-[A-Za-z-]+: i=2;", f)]
    assert len(ours) == 3
    others = [f for f in lines if not f.lower().startswith(b"arc-")]
    alone = b"\r\n".join(ours + others) + sep + body
    checker = dkim.ARC(alone)
    _max, sets = checker.sorted_arc_headers()
    result = checker.verify_instance(sets, 2, dnsfunc=merged_resolver.dkimpy_dnsfunc())
    assert result["as-valid"] and result["ams-valid"]
    # And not over the broken chain: with i=1 back, the same seal no longer verifies.
    checker = dkim.ARC(sealed)
    _max, sets = checker.sorted_arc_headers()
    try:
        result = checker.verify_instance(sets, 2, dnsfunc=merged_resolver.dkimpy_dnsfunc())
    except dkim.DKIMException:
        return
    assert not result["as-valid"]


def test_arc_seal_refuses_results_that_do_not_fit_the_message(
        keys: Keys, merged_resolver: Resolver) -> None:
    raw = list_copy()
    results = verify(raw, keys.resolver())
    for arc in ("pass", "fail"):
        wrong = replace(results, arc=arc)
        with pytest.raises(SigningError, match="no ARC chain"):
            arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN, results=wrong)
    chained = (DKIM_DIR / "arc__cv_pass_i1_1.eml").read_bytes()
    with pytest.raises(SigningError, match="verify it before sealing"):
        arc_seal(chained, signer=keys.signer(), authserv_id=LIST_DOMAIN, results=results)
    # A set missing its seal cannot be a passing chain, whatever the caller says.
    incomplete = re.sub(rb"ARC-Seal:.*?\r\n(?=\S)", b"", chained, count=1, flags=re.S)
    assert b"ARC-Seal" not in incomplete
    assert verify(incomplete, merged_resolver).arc == "fail"
    with pytest.raises(SigningError, match="not complete"):
        arc_seal(incomplete, signer=keys.signer(), authserv_id=LIST_DOMAIN,
                 results=replace(results, arc="pass"))
    with pytest.raises(ConfigError, match="authserv-id"):
        arc_seal(raw, signer=keys.signer(), authserv_id="lists example", results=results)


@pytest.mark.parametrize(("field", "arc"), [
    # No i= at all: no set, no chain (dkimpy says none too).
    ("ARC-Seal: a=rsa-sha256; cv=pass; d=example.net; s=x; b=AAAA", "none"),
    # dkimpy reads header.i=1234@ as instance 1234 and fails the chain; it is no set.
    ("ARC-Authentication-Results: mx.example.net; dkim=pass header.i=1234@example.net",
     "fail"),
])
def test_arc_seal_unreadable_arc_fields_start_a_chain_that_says_so(
        keys: Keys, field: str, arc: str) -> None:
    raw = post("bob@example.net", f"discuss@{LIST_DOMAIN}", "Hi", extra_headers=field + "\r\n")
    resolver = keys.resolver()
    results = verify(raw, resolver)
    assert results.arc == arc
    sealed = arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN, results=results)
    assert sealed.startswith(f"ARC-Seal: i=1; cv={arc};".encode())
    assert arc_verify(sealed, resolver) == ("pass" if arc == "none" else "fail")


def test_arc_seal_refuses_a_fifty_first_set(keys: Keys) -> None:
    fifty = "".join(f"ARC-Authentication-Results: i={i}; mx.example.net; arc=pass\r\n"
                    for i in range(50, 0, -1))
    raw = post("bob@example.net", f"discuss@{LIST_DOMAIN}", "Hi", extra_headers=fifty)
    results = replace(verify(raw, keys.resolver()), arc="fail")
    with pytest.raises(SigningError, match="i=50"):
        arc_seal(raw, signer=keys.signer(), authserv_id=LIST_DOMAIN, results=results)


def test_arc_seal_timestamp_comes_from_the_clock(keys: Keys) -> None:
    raw = list_copy()
    results = verify(raw, keys.resolver())
    sealed = arc_seal(raw, signer=keys.signer(clock=ManualClock(1_900_000_000.0)),
                      authserv_id=LIST_DOMAIN, results=results)
    assert _seal_tags(sealed)[b"t"] == b"1900000000"
    name, value = dkim.DKIM(sealed).headers[1]
    assert name == b"ARC-Message-Signature"
    assert dkim.util.parse_tag_value(value)[b"t"] == b"1900000000"


# ------------------------------------------------------------- sign and seal


def test_sign_and_seal_puts_the_arc_set_over_our_dkim_signature(
        keys: Keys, merged_resolver: Resolver) -> None:
    raw = (DKIM_DIR / "arc__cv_pass_i2_1.eml").read_bytes()
    results = verify(raw, merged_resolver)
    copy = sign_and_seal(raw, signer=keys.signer(ed25519=True), arc=(LIST_DOMAIN, results))
    checker = dkim.DKIM(copy)
    names = [n.decode() for n, _v in checker.headers]
    assert names[:7] == ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results",
                         "DKIM-Signature", "DKIM-Signature", "Authentication-Results",
                         "MIME-Version"]
    ams = dkim.util.parse_tag_value(checker.headers[1][1])
    h = [n.strip() for n in ams[b"h"].decode().split(":")]
    assert h.count("dkim-signature") == 2  # RFC 8617 4.1.2: the AMS covers our signatures
    assert not {"authentication-results", "arc-seal", "arc-authentication-results"} & set(h)
    assert _dkimpy_arc(copy, merged_resolver) == b"pass"
    assert _dkimpy_verifies(copy, merged_resolver) and _dkimpy_verifies(copy, merged_resolver, 1)
    ours = verify(copy, merged_resolver)
    assert ours.dkim == ((LIST_DOMAIN, "pass"), (LIST_DOMAIN, "pass")) and ours.arc == "pass"
    # One clock reading for all of it.
    stamps = {dkim.util.parse_tag_value(v)[b"t"] for n, v in checker.headers[:4]
              if n != b"ARC-Authentication-Results"}
    assert len(stamps) == 1


def test_sign_and_seal_without_arc_is_dkim_signing(keys: Keys) -> None:
    clock = ManualClock(1_900_000_000.0)
    raw = list_copy()
    assert sign_and_seal(raw, signer=keys.signer(clock=clock), arc=None) \
        == keys.signer(clock=clock).sign(raw)


def test_sign_and_seal_a_copy_altered_on_the_way_fails_both(keys: Keys) -> None:
    resolver = keys.resolver()
    raw = list_copy(sender="bob@example.net")
    copy = sign_and_seal(raw, signer=keys.signer(), arc=(LIST_DOMAIN, verify(raw, resolver)))
    assert _dkimpy_arc(copy, resolver) == b"pass" and _dkimpy_verifies(copy, resolver)
    altered = copy.replace(b"Hello, list.", b"Hello, lost.")
    assert _dkimpy_arc(altered, resolver) == b"fail"
    assert not _dkimpy_verifies(altered, resolver)


def test_sign_and_seal_does_not_continue_a_chain_already_sealed_failed(
        keys: Keys, merged_resolver: Resolver) -> None:
    raw = (DKIM_DIR / "arc__cv_fail_i2_as2_fail.eml").read_bytes()
    results = verify(raw, merged_resolver)
    clock = ManualClock(1_900_000_000.0)
    copy = sign_and_seal(raw, signer=keys.signer(clock=clock), arc=(LIST_DOMAIN, results))
    assert copy == keys.signer(clock=clock).sign(raw)
    assert _instances(copy) == _instances(raw) == [2, 1]


@pytest.mark.parametrize("path", _odd_params())
def test_sign_and_seal_odd_message_verifies(path: Path, signer: Signer, keys: Keys) -> None:
    resolver = keys.resolver()
    raw = path.read_bytes()
    results = verify(raw, resolver)
    copy = sign_and_seal(raw, signer=signer, arc=(LIST_DOMAIN, results))
    assert _dkimpy_verifies(copy, resolver)
    if results.arc != "fail":  # a broken chain stays broken, sealed or not
        assert _dkimpy_arc(copy, resolver) == b"pass"


def test_sign_and_seal_refuses_results_that_do_not_fit(keys: Keys) -> None:
    raw = list_copy()
    wrong = replace(verify(raw, keys.resolver()), arc="pass")
    with pytest.raises(SigningError, match="no ARC chain"):
        sign_and_seal(raw, signer=keys.signer(), arc=(LIST_DOMAIN, wrong))


@pytest.fixture(scope="module")
def signer(keys: Keys) -> Signer:
    """One signer for many messages (loading a key checks it: a tenth of a second)."""
    return keys.signer()


@pytest.fixture(scope="module")
def merged_resolver(keys: Keys) -> Resolver:
    """The corpus's keys and ours."""
    if not DKIM_DIR.is_dir():
        pytest.skip(NO_CORPUS)
    records: dict[str, list[str]] = collections.defaultdict(list)
    with open(DKIM_DIR / "keys.tsv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            records[row["name"]].append(row["txt_record"])
    records[f"rsa._domainkey.{LIST_DOMAIN}"] = [zone_txt_value(keys.rsa_record)]
    records[f"ed._domainkey.{LIST_DOMAIN}"] = [zone_txt_value(keys.ed_record)]
    return Resolver(records=records)


# ------------------------------------------- the dnspython path, over a UDP stub


@dataclass
class StubDNS:
    """A real DNS server on loopback UDP: TXT answers with TTLs, NXDOMAIN with an SOA,
    SERVFAIL, or silence; it counts the queries it gets."""

    txt: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    servfail: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)
    negative_ttl: int = 30
    queries: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text().lower()
            self.queries[name] += 1
            if name in self.silent:
                continue
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if name in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif name in self.txt:
                ttl, values = self.txt[name]
                response.answer.append(dns.rrset.from_text_list(name, ttl, "IN", "TXT", values))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(dns.rrset.from_text(
                    "example.", 3600, "IN", "SOA",
                    f"ns.example. host.example. 1 3600 600 86400 {self.negative_ttl}"))
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def stub() -> Iterator[StubDNS]:
    server = StubDNS()
    yield server
    server.close()


def _stub_resolver(stub: StubDNS, clock: ManualClock, **kwargs: object) -> Resolver:
    return Resolver(nameservers=["127.0.0.1"], port=stub.port, clock=clock,
                    timeout=kwargs.pop("timeout", 2.0), **kwargs)  # type: ignore[arg-type]


def test_resolver_caches_answers_for_their_ttl(stub: StubDNS) -> None:
    stub.txt["a.example."] = (300, ['"v=DKIM1; k=rsa; " "p=AAAA"', '"second"'])
    clock = ManualClock()
    resolver = _stub_resolver(stub, clock)
    assert sorted(resolver.txt("A.example")) == ["second", "v=DKIM1; k=rsa; p=AAAA"]
    clock.advance(299)
    assert len(resolver.txt("a.example.")) == 2
    assert stub.queries["a.example."] == 1
    clock.advance(2)
    resolver.txt("a.example")
    assert stub.queries["a.example."] == 2


def test_resolver_caches_nxdomain_for_the_soa_minimum(stub: StubDNS) -> None:
    stub.negative_ttl = 30
    clock = ManualClock()
    resolver = _stub_resolver(stub, clock)
    assert resolver.txt("missing.example") == []
    clock.advance(29)
    assert resolver.txt("missing.example") == []
    assert stub.queries["missing.example."] == 1
    clock.advance(2)
    resolver.txt("missing.example")
    assert stub.queries["missing.example."] == 2


def test_resolver_ttl_zero_is_not_cached_and_the_cache_is_bounded(stub: StubDNS) -> None:
    for name, ttl in [("zero.example.", 0), ("b1.example.", 600), ("b2.example.", 600),
                      ("b3.example.", 600)]:
        stub.txt[name] = (ttl, ['"x"'])
    resolver = _stub_resolver(stub, ManualClock(), cache_size=2)
    resolver.txt("zero.example")
    resolver.txt("zero.example")
    assert stub.queries["zero.example."] == 2
    for name in ("b1.example", "b2.example", "b3.example", "b1.example"):
        resolver.txt(name)
    assert stub.queries["b1.example."] == 2  # evicted by b3, the oldest of three
    assert stub.queries["b3.example."] == 1


def test_resolver_servfail_and_timeout_are_temporary_and_not_cached(stub: StubDNS) -> None:
    stub.servfail.add("broken.example.")
    stub.silent.add("slow.example.")
    resolver = _stub_resolver(stub, ManualClock(), timeout=0.3)
    for _ in range(2):
        with pytest.raises(TemporaryDNSError):
            resolver.txt("broken.example")
    assert stub.queries["broken.example."] == 2
    with pytest.raises(TemporaryDNSError):
        resolver.txt("slow.example")


def test_verify_over_dns_pass_and_temperror(stub: StubDNS, keys: Keys) -> None:
    stub.txt[f"rsa._domainkey.{LIST_DOMAIN}."] = (
        300, [" ".join(f'"{s}"' for s in re.findall(r'"([^"]*)"', keys.rsa_record))])
    stub.txt[f"_dmarc.{LIST_DOMAIN}."] = (300, ['"v=DMARC1; p=reject"'])
    clock = ManualClock()
    resolver = _stub_resolver(stub, clock)
    signed = keys.signer().sign(list_copy())
    results = verify(signed, resolver)
    assert results.dkim == ((LIST_DOMAIN, "pass"),)
    assert (results.dmarc_policy, results.dmarc) == ("reject", "pass")
    stub.servfail.add(f"rsa._domainkey.{LIST_DOMAIN}.")
    clock.advance(301)
    failing = verify(signed, resolver)
    assert failing.dkim == ((LIST_DOMAIN, "temperror"),)
    assert failing.dmarc == "temperror" and not failing.authenticated
    stub.servfail.add(f"_dmarc.{LIST_DOMAIN}.")
    clock.advance(301)  # until then the cached policy answers
    with pytest.raises(TemporaryDNSError):
        dmarc_policy(LIST_DOMAIN, resolver)
    assert verify(signed, resolver).dmarc_policy is None


def test_signing_keys_load_a_domain_once_for_threads_asking_at_once(
        keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Delivery threads ask for a domain's signer together: one load, one warning for a
    missing key, and the same signer for all."""
    found = SigningKeys(keys.rsa_path.parent, selector="rsa", clock=ManualClock())
    missing = SigningKeys(tmp_path, selector="rsa", clock=ManualClock())
    with ThreadPoolExecutor(8) as pool:
        signers = list(pool.map(found.for_domain, [LIST_DOMAIN] * 16))
        absent = list(pool.map(missing.for_domain, [LIST_DOMAIN.upper()] * 16))
    assert signers[0] is not None and all(s is signers[0] for s in signers)
    assert absent == [None] * 16
    assert sum("goes out unsigned" in r.getMessage() for r in caplog.records) == 1
