"""Mail authentication: DKIM and ARC verification and signing, DMARC policy, and their DNS.

Verification answers one question for the rest of the gateway: is the From domain of
this message authenticated? Either we verify DKIM signatures ourselves (dkimpy), or we
believe the Authentication-Results of a configured trusted front MTA, or either.

SPF is not evaluated here: the gateway sits behind the front MTA and does not see the
connecting client, so SPF (and DMARC by way of SPF) is only available through a trusted
front MTA's Authentication-Results.

Organisational domains are approximated without the public suffix list:

- DMARC policy discovery walks up the DNS tree from the From domain (the "DNS tree walk"
  of DMARCbis, the revision of RFC 7489 that drops its public-suffix step): the nearest
  `_dmarc` record on the way up applies, its sp= if it was found above the From domain.
  It needs no list that goes stale and finds the same record as RFC 7489 whenever the
  organisational domain publishes one.
- Relaxed alignment is approximated by ancestry: a DKIM d= is aligned with the From
  domain when one is the other or a parent of the other. This never aligns two sibling
  registrations under a public suffix (attacker.co.uk does not align with victim.co.uk);
  it is stricter than RFC 7489 for siblings inside one organisation (d=a.example.com
  does not align From b.example.com), and looser only when d= is itself a multi-label
  public suffix, whose DNS an attacker would have to control.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import dkim
import dkim.util
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import nacl.encoding
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519 as crypto_ed25519
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from dkim.canonicalization import Relaxed as RelaxedCanonicalization

from gateway import headers as h
from gateway.addresses import normalise_domain
from gateway.clock import Clock, SystemClock
from gateway.errors import AddressError, ConfigError, SigningError, TemporaryDNSError
from gateway.message import CRLF, Parts, normalise_eol, split

log = logging.getLogger(__name__)

AUTHENTICATION_RESULTS = "Authentication-Results"
DKIM_SIGNATURE = "DKIM-Signature"
ARC_SEAL = "ARC-Seal"
ARC_MESSAGE_SIGNATURE = "ARC-Message-Signature"
ARC_AUTHENTICATION_RESULTS = "ARC-Authentication-Results"
ARC_FIELDS = (ARC_SEAL, ARC_MESSAGE_SIGNATURE, ARC_AUTHENTICATION_RESULTS)
# RFC 8617 4.2.1: i= runs from 1 to 50.
MAX_ARC_INSTANCE = 50

# RFC 8301 3.2: keys under 1024 bits are not acceptable.
MIN_KEY_BITS = 1024
# Each signature costs a DNS lookup and a public-key operation; a message carrying
# hundreds of them must not be able to buy that much of our time.
MAX_SIGNATURES = 8
# RFC 2308: without an SOA in the negative answer, cache the absence briefly.
DEFAULT_NEGATIVE_TTL = 60.0
MAX_NEGATIVE_TTL = 3600.0
MAX_TTL = 86400.0
# A TXT character-string holds at most 255 octets (RFC 1035 3.3.14).
TXT_STRING_MAX = 255

USES = ("dkim", "trusted-ar", "either")

_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


# --------------------------------------------------------------------------- DNS


@dataclass
class _Entry:
    expires: float
    records: list[str]


class Resolver:
    """DNS TXT lookups through dnspython, cached with the records' TTL (bounded size).

    Tests and the corpus inject records: ``Resolver(records={"name.": ["txt", ...]})``
    answers only from that dict (no network, no cache) and gives NXDOMAIN for anything
    else. Otherwise the system's resolvers are asked, or `nameservers` on `port`.
    Negative answers are cached too, for the SOA minimum (RFC 2308).
    """

    def __init__(self, *, records: Mapping[str, Sequence[str]] | None = None,
                 nameservers: Sequence[str] | None = None, timeout: float = 5.0,
                 clock: Clock | None = None, port: int = 53,
                 cache_size: int = 4096) -> None:
        self.timeout = timeout
        self._records = (None if records is None else
                         {_absolute(name): list(values) for name, values in records.items()})
        self._nameservers = list(nameservers) if nameservers else None
        self._port = port
        self._clock = clock or SystemClock()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._dns: dns.resolver.Resolver | None = None

    def txt(self, name: str) -> list[str]:
        """The TXT records at a name, each one's strings joined; [] when there are none.

        Raises TemporaryDNSError on SERVFAIL, timeouts and other failures worth retrying.
        """
        key = _absolute(name)
        if self._records is not None:
            return list(self._records.get(key, []))
        now = self._clock.now()
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                if entry.expires > now:
                    self._cache.move_to_end(key)
                    return list(entry.records)
                del self._cache[key]
        records, ttl = self._query(key)
        if ttl > 0:
            with self._lock:
                self._cache[key] = _Entry(now + ttl, records)
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return list(records)

    def _resolver(self) -> dns.resolver.Resolver:
        # Built on first use, so that a machine without /etc/resolv.conf can still run
        # with injected records or explicit nameservers.
        if self._dns is None:
            try:
                resolver = dns.resolver.Resolver(configure=self._nameservers is None)
            except dns.exception.DNSException as exc:
                raise TemporaryDNSError(f"no DNS resolver configuration: {exc}") from exc
            if self._nameservers is not None:
                resolver.nameservers = self._nameservers
            resolver.port = self._port
            resolver.lifetime = self.timeout
            resolver.timeout = self.timeout
            self._dns = resolver
        return self._dns

    def _query(self, name: str) -> tuple[list[str], float]:
        """(records, seconds they may be cached) from the network."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return [], DEFAULT_NEGATIVE_TTL  # not a name that can exist (too long, empty label)
        resolver = self._resolver()
        try:
            answer = resolver.resolve(qname, dns.rdatatype.TXT, raise_on_no_answer=False,
                                      search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[Any, dns.message.Message] = exc.kwargs.get("responses", {})
            return [], _negative_ttl(next(iter(responses.values()), None))
        except dns.resolver.YXDOMAIN:
            return [], DEFAULT_NEGATIVE_TTL
        except dns.exception.DNSException as exc:
            # NoNameservers (every server said SERVFAIL or REFUSED), timeouts, truncation
            # over a failing TCP: all may clear up, so none may be read as "no record".
            raise TemporaryDNSError(f"TXT {name}: {exc}") from exc
        if answer.rrset is None:
            return [], _negative_ttl(answer.response)
        records = [b"".join(rdata.strings).decode("utf-8", "surrogateescape")
                   for rdata in answer.rrset]
        return records, float(min(answer.rrset.ttl, MAX_TTL))

    def dkimpy_dnsfunc(self) -> DkimpyDNS:
        """What ``dkim.verify(dnsfunc=...)`` wants; one per verification, as it keeps state."""
        return DkimpyDNS(self)


def _absolute(name: str) -> str:
    return name.strip().lower().rstrip(".") + "."


def _negative_ttl(response: dns.message.Message | None) -> float:
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return float(min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL))
    return DEFAULT_NEGATIVE_TTL


class DkimpyDNS:
    """dkimpy's dnsfunc over a Resolver, remembering what the last lookup found.

    dkimpy turns a DNS timeout and a missing key alike into "does not verify"; what is
    remembered here lets us tell temperror and permerror from fail.
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self.temporary: str | None = None
        self.record: bytes | None = None

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        self.temporary = None
        self.record = None
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return None
        try:
            records = self._resolver.txt(text)
        except TemporaryDNSError as exc:
            self.temporary = str(exc)
            raise dkim.DnsTimeoutError(str(exc)) from exc
        if not records:
            return None
        # RFC 6376 3.6.2.2 leaves several records undefined; prefer one that says it is a key.
        chosen = next((r for r in records if r.lstrip().startswith("v=DKIM1")), records[0])
        self.record = chosen.encode("utf-8", "surrogateescape")
        return self.record


# ------------------------------------------------------------------ verification


@dataclass(frozen=True)
class AuthResults:
    """What verification concluded about one message."""

    from_domain: str | None
    # (signing domain d=, "pass" | "fail" | "temperror" | "permerror" | "neutral")
    dkim: tuple[tuple[str, str], ...]
    dkim_aligned_pass: bool              # a passing signature aligned (relaxed) with From
    dmarc_policy: str | None             # "reject" | "quarantine" | "none" | None (no record)
    dmarc: str                           # "pass" | "fail" | "none" | "temperror"
    arc: str                             # "pass" | "fail" | "none"
    trusted: str | None                  # the trusted front MTA's verdict we read, if any
    trusted_aligned_pass: bool = False   # that verdict authenticates the From domain

    @property
    def authenticated(self) -> bool:
        """The From domain is authenticated: aligned DKIM pass, or the trusted front
        MTA's dmarc=pass (or aligned dkim=pass)."""
        return self.from_domain is not None and (self.dkim_aligned_pass
                                                 or self.trusted_aligned_pass)


def verify(raw: bytes, resolver: Resolver, *, trusted_authserv_ids: Sequence[str] = (),
           use: str = "dkim") -> AuthResults:
    """Authenticate a message as received. Never raises on malformed input.

    use="dkim": verify signatures ourselves. use="trusted-ar": believe only the topmost
    Authentication-Results field whose authserv-id is in trusted_authserv_ids (any other is
    forgeable by the sender); dmarc and arc then also come from that field. use="either":
    our own verdicts, and authenticated if either way authenticates.
    The DMARC policy is looked up in every mode: From rewriting needs it.
    """
    if use not in USES:
        raise ConfigError(f"authentication use={use!r}: expected one of {', '.join(USES)}")
    parts = split(raw)
    from_domain = _from_domain(parts)

    policy: str | None = None
    policy_temperror = False
    if from_domain is not None:
        try:
            policy = dmarc_policy(from_domain, resolver)
        except TemporaryDNSError as exc:
            log.info("DMARC policy of %s: temporary DNS failure: %s", from_domain, exc)
            policy_temperror = True

    trusted: str | None = None
    trusted_pass = False
    trusted_results: list[ResInfo] = []
    if use in ("trusted-ar", "either"):
        found = _trusted_results(parts, trusted_authserv_ids)
        if found is not None:
            trusted_results = found
            trusted, trusted_pass = _trusted_verdict(found, from_domain)

    if use == "trusted-ar":
        return AuthResults(
            from_domain=from_domain, dkim=(), dkim_aligned_pass=False,
            dmarc_policy=policy, dmarc=_first_result(trusted_results, "dmarc", _DMARC_RESULTS),
            arc=_first_result(trusted_results, "arc", ("pass", "fail", "none")),
            trusted=trusted, trusted_aligned_pass=trusted_pass)

    signatures = _verify_dkim(raw, parts, resolver)
    aligned_pass = from_domain is not None and any(
        result == "pass" and aligned(domain, from_domain) for domain, result in signatures)
    if policy_temperror:
        dmarc_result = "temperror"
    elif from_domain is None or policy is None:
        dmarc_result = "none"
    elif aligned_pass:
        dmarc_result = "pass"
    elif any(result == "temperror" and aligned(domain, from_domain)
             for domain, result in signatures):
        dmarc_result = "temperror"
    else:
        dmarc_result = "fail"
    return AuthResults(
        from_domain=from_domain, dkim=signatures, dkim_aligned_pass=aligned_pass,
        dmarc_policy=policy, dmarc=dmarc_result, arc=arc_verify(raw, resolver),
        trusted=trusted, trusted_aligned_pass=trusted_pass)


def aligned(signing_domain: str, from_domain: str) -> bool:
    """Relaxed alignment, approximated by ancestry (see the module docstring)."""
    d = signing_domain.strip().lower().rstrip(".")
    f = from_domain.lower().rstrip(".")
    if "." not in d or not f:
        return False
    return d == f or f.endswith("." + d) or d.endswith("." + f)


def _from_domain(parts: Parts) -> str | None:
    """The one author domain, or None when there is not exactly one (RFC 7489 6.6.1)."""
    values = parts.get_all(h.FROM)
    if len(values) != 1:
        return None
    domains: set[str] = set()
    for _name, address in getaddresses(values):
        _local, at, domain = address.rpartition("@")
        if not at:
            return None
        try:
            domains.add(normalise_domain(domain))
        except AddressError:
            return None
    return domains.pop() if len(domains) == 1 else None


class _DemotedLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """dkimpy logs a forged or broken signature as an error; for a gateway that is input."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        self.logger.log(logging.DEBUG, msg, *args, **kwargs)


def _dkimpy_logger() -> logging.LoggerAdapter:  # type: ignore[type-arg]
    return _DemotedLogger(logging.getLogger(f"{__name__}.dkimpy"), {})


def _verify_dkim(raw: bytes, parts: Parts, resolver: Resolver) -> tuple[tuple[str, str], ...]:
    """(d=, result) for each DKIM-Signature, topmost first."""
    if not any(f.name.lower() == "dkim-signature" for f in parts.fields):
        return ()
    try:
        checker = dkim.DKIM(raw, logger=_dkimpy_logger(), minkey=MIN_KEY_BITS,
                            timeout=resolver.timeout)
    except (dkim.DKIMException, IndexError):
        # dkimpy cannot split this header (IndexError: it starts with a continuation
        # line): no signature in it can be checked.
        return tuple((_tag(f.value.encode("utf-8", "surrogateescape"), "d"), "permerror")
                     for f in parts.fields if f.name.lower() == "dkim-signature")
    values = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    if len(values) > MAX_SIGNATURES:
        log.info("%d DKIM signatures; checking the first %d", len(values), MAX_SIGNATURES)
    return tuple(_verify_signature(checker, idx, value, resolver)
                 for idx, value in enumerate(values[:MAX_SIGNATURES]))


def _verify_signature(checker: Any, idx: int, value: bytes,
                      resolver: Resolver) -> tuple[str, str]:
    try:
        tags = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        return _tag(value, "d"), "neutral"  # RFC 8601 2.7.1: syntax errors
    domain = tags.get(b"d", b"").decode("ascii", "replace").strip().lower()
    if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
        return domain, "permerror"  # RFC 8301 3.1: never valid
    dnsfunc = resolver.dkimpy_dnsfunc()
    try:
        ok = checker.verify(idx, dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:
        # dkimpy raises this both for a changed body and for unacceptable tags.
        return domain, "fail" if "body hash mismatch" in str(exc) else "permerror"
    except dkim.DKIMException:
        return domain, "permerror"  # key too small, malformed fields, unknown key type
    except Exception:  # dkimpy on hostile input: a crash there must not reject the post
        log.warning("dkimpy failed on a DKIM-Signature of d=%s; counted as permerror",
                    domain, exc_info=True)
        return domain, "permerror"
    if ok:
        return domain, "pass"
    if dnsfunc.temporary is not None:
        return domain, "temperror"
    if dnsfunc.record is None:
        return domain, "permerror"  # no key published
    try:
        dkim.evaluate_pk(b"", dnsfunc.record)
    except (dkim.DKIMException, binascii.Error, ValueError, KeyError, TypeError):
        return domain, "permerror"  # the key record cannot be used
    return domain, "fail"


def _tag(value: bytes, tag: str) -> str:
    m = re.search(rb"(?:^|;)\s*" + tag.encode() + rb"\s*=\s*([^;]*)", value)
    return m.group(1).decode("ascii", "replace").strip().lower() if m else ""


# ----------------------------------------------------------------------- DMARC

_DMARC_POLICIES = ("none", "quarantine", "reject")
_DMARC_RESULTS = ("pass", "fail", "none", "temperror")


def dmarc_policy(domain: str, resolver: Resolver) -> str | None:
    """The DMARC policy that applies to mail From this domain, or None without a record.

    Walks up from _dmarc.<domain> (DMARCbis tree walk; see the module docstring): a name
    of eight or more labels is followed by its last seven, then one label is dropped at a
    time down to two (the top-level domain's own record is RFC 9091's experiment, not
    followed): at most seven lookups. A record found above the domain gives its sp=
    (falling back to p=). Raises TemporaryDNSError if a lookup fails temporarily, since
    "no record" would then be a guess.
    """
    labels = domain.lower().rstrip(".").split(".")
    names = [labels]
    rest = labels[-7:] if len(labels) >= 8 else labels[1:]
    while len(rest) >= 2:
        names.append(rest)
        rest = rest[1:]
    for i, name in enumerate(names):
        record = _dmarc_record(resolver.txt("_dmarc." + ".".join(name)))
        if record is None:
            continue
        tags, usable = record
        if not usable:
            return None
        return tags["p"] if i == 0 else tags.get("sp", tags["p"])
    return None


def _dmarc_record(txts: list[str]) -> tuple[dict[str, str], bool] | None:
    """(tags, usable) of the one DMARC record among TXT records; None when there is none.

    More than one record means no DMARC processing (RFC 7489 6.6.3 step 4), as does an
    invalid p= without a report address; an invalid p= with rua= reads as p=none.
    """
    records = [t for t in txts if re.match(r"^\s*v\s*=\s*DMARC1\s*(;|$)", t, re.IGNORECASE)]
    if not records:
        return None
    if len(records) > 1:
        return {}, False
    tags: dict[str, str] = {}
    for spec in records[0].split(";"):
        key, eq, value = spec.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip().lower())
    if tags.get("p") not in _DMARC_POLICIES:
        if not tags.get("rua"):
            return {}, False
        tags["p"] = "none"
    if "sp" in tags and tags["sp"] not in _DMARC_POLICIES:
        del tags["sp"]
    return tags, True


# ------------------------------------------------------ Authentication-Results


@dataclass(frozen=True)
class ResInfo:
    """One resinfo of an Authentication-Results field (RFC 8601 2.2)."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...]

    def prop(self, name: str) -> str | None:
        return next((v for k, v in self.properties if k == name), None)


def parse_authentication_results(value: str) -> tuple[str, list[ResInfo]] | None:
    """(authserv-id, results) of an Authentication-Results value; None if unreadable.

    Comments are dropped and quoted strings respected, so that text a sender controls
    (a quoted From domain, a comment) cannot end one resinfo and start another.
    """
    segments = _split_outside_quotes(_strip_comments(value))
    if segments is None or not segments or not segments[0].strip():
        return None
    authserv_id = _unquote(segments[0].split()[0]).lower()
    results: list[ResInfo] = []
    for segment in segments[1:]:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:/\s*\d+\s*)?=\s*([A-Za-z0-9_-]+)", segment)
        if m is None:
            continue  # "none", or garbage: nothing was said
        properties = tuple(
            (p.group(1).lower(), _unquote(p.group(2)))
            for p in re.finditer(r'([A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+)\s*=\s*'
                                 r'("(?:[^"\\]|\\.)*"|[^\s"]+)', segment[m.end():]))
        results.append(ResInfo(m.group(1).lower(), m.group(2).lower(), properties))
    return authserv_id, results


def _strip_comments(value: str) -> str | None:
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\" and (quoted or depth):
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if quoted:
            out.append(ch)
            if ch == '"':
                quoted = False
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
            if ch == '"':
                quoted = True
    if depth or quoted:
        return None  # unbalanced: we cannot know where its parts end
    return "".join(out)


def _split_outside_quotes(value: str | None) -> list[str] | None:
    if value is None:
        return None
    segments = [""]
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            segments.append("")
            continue
        segments[-1] += ch
    return segments


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _trusted_results(parts: Parts, trusted_ids: Sequence[str]) -> list[ResInfo] | None:
    """The results of the topmost Authentication-Results field from a trusted authserv-id.

    Only the topmost: the front MTA adds its field above everything the sender wrote,
    and a sender can write a field naming any authserv-id.
    """
    wanted = {t.strip().lower() for t in trusted_ids if t.strip()}
    for f in parts.fields:  # topmost first
        if f.name.lower() != AUTHENTICATION_RESULTS.lower():
            continue
        if _authserv_id(f.value) in wanted:
            parsed = parse_authentication_results(f.value)
            # Unreadable (say, a sender's "(" copied into it): it still is the topmost,
            # so it says nothing, rather than letting a forged field below it speak.
            return parsed[1] if parsed is not None else []
    return None


def _authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value, read even when the rest is not."""
    m = re.match(r'\s*(?:\([^()]*\)\s*)*"?([^\s;"()]*)', value)
    return m.group(1).lower() if m else ""


def _trusted_verdict(results: list[ResInfo], from_domain: str | None) -> tuple[str, bool]:
    """(the clause we read, whether it authenticates the From domain)."""
    dmarc_results = [r for r in results if r.method == "dmarc"]
    dkim_results = [r for r in results if r.method == "dkim"]
    if from_domain is not None:
        for r in dmarc_results:
            header_from = (r.prop("header.from") or from_domain).lower().rstrip(".")
            if r.result == "pass" and header_from == from_domain:
                return _clause(r, "header.from"), True
        for r in dkim_results:
            if r.result == "pass" and aligned(_ar_signing_domain(r), from_domain):
                return _clause(r, "header.d"), True
    if dmarc_results:
        return _clause(dmarc_results[0], "header.from"), False
    if dkim_results:
        return _clause(dkim_results[0], "header.d"), False
    return "none", False


def _ar_signing_domain(r: ResInfo) -> str:
    d = r.prop("header.d")
    if d:
        return d
    return (r.prop("header.i") or "").rpartition("@")[2]


def _clause(r: ResInfo, prop: str) -> str:
    value = r.prop(prop) if prop != "header.d" else _ar_signing_domain(r)
    return f"{r.method}={r.result}" + (f" {prop}={value.lower()}" if value else "")


def _first_result(results: list[ResInfo], method: str, allowed: Sequence[str]) -> str:
    """The first result of a method, "none" if absent or not one we have a name for."""
    r = next((r for r in results if r.method == method), None)
    return r.result if r is not None and r.result in allowed else "none"


# ------------------------------------------------------------------------- ARC


def arc_verify(raw: bytes, resolver: Resolver) -> str:
    """The ARC chain validation status (RFC 8617 5.2): "pass", "fail" or "none"."""
    arc_names = {n.lower() for n in ARC_FIELDS}
    if not any(f.name.lower() in arc_names for f in split(raw).fields):
        return "none"
    try:
        checker = dkim.ARC(raw, logger=_dkimpy_logger(), minkey=MIN_KEY_BITS,
                           timeout=resolver.timeout)
        cv, _results, reason = checker.verify(dnsfunc=resolver.dkimpy_dnsfunc())
    except Exception:  # dkimpy on hostile input (e.g. IndexError on a broken ARC set)
        log.debug("dkimpy ARC verification failed", exc_info=True)
        return "fail"
    if cv == dkim.CV_Pass:
        return "pass"
    if cv == dkim.CV_None:
        return "none"
    # dkimpy's None: a seal said cv=fail, so the chain has already failed (RFC 8617 5.2).
    log.debug("ARC chain fails: %s", reason)
    return "fail"


# --------------------------------------------------------------------- signing

# RFC 6376 5.4.1 recommendations, plus RFC 2369/2919 fields and RFC 8058's
# List-Unsubscribe-Post, which a one-click unsubscribe needs to be covered by the signature.
SIGNED_FIELDS = (
    h.FROM, h.SENDER, h.REPLY_TO, h.SUBJECT, h.DATE, h.MESSAGE_ID, h.TO, h.CC,
    h.MIME_VERSION, h.CONTENT_TYPE, h.CONTENT_TRANSFER_ENCODING, "Content-ID",
    "Content-Description", h.IN_REPLY_TO, h.REFERENCES,
    h.LIST_ID, h.LIST_HELP, h.LIST_UNSUBSCRIBE, h.LIST_SUBSCRIBE, h.LIST_POST, h.LIST_OWNER,
    h.LIST_ARCHIVE, h.LIST_UNSUBSCRIBE_POST,
)
# Signed once more than they occur (RFC 6376 5.4.2), so that a copy added on the way
# cannot ride on our signature: readers and their software take the field they see first.
OVERSIGNED_FIELDS = (
    h.FROM, h.REPLY_TO, h.SUBJECT, h.DATE, h.TO, h.CC, h.CONTENT_TYPE, h.LIST_ID, h.LIST_POST,
    h.LIST_UNSUBSCRIBE, h.LIST_UNSUBSCRIBE_POST,
)


def _include_headers(names: Sequence[str]) -> list[bytes]:
    """The h= list for a header with these field names (in any case)."""
    present = [n.lower() for n in names]
    include: list[bytes] = []
    for name in SIGNED_FIELDS:
        lname = name.lower()
        count = present.count(lname) + (1 if name in OVERSIGNED_FIELDS else 0)
        include += [lname.encode("ascii")] * count
    return include


class Signer:
    """DKIM-signs outgoing mail for a domain: rsa-sha256 (2048-bit default) and optionally
    a second ed25519-sha256 signature. Relaxed/relaxed canonicalisation; the fields signed
    are SIGNED_FIELDS, with OVERSIGNED_FIELDS (From among them) signed once more.

    The DKIM-Signature field is assembled here (RFC 6376 3.5, 3.7) over dkimpy's parsing
    and canonicalisation, and signed with `cryptography` (RSA) and PyNaCl (ed25519):
    dkimpy's own RSA is pure Python, about ten times slower per signature, and every copy
    that carries a member's own unsubscribe link needs a signature of its own. ARC sets
    (arc_seal, sign_and_seal) are made the same way.

    Loading the key checks it (about 0.1 s): make one Signer per key and reuse it.
    """

    def __init__(self, domain: str, selector: str, private_key: bytes, *,
                 ed25519: tuple[str, bytes] | None = None, clock: Clock | None = None) -> None:
        self.domain = _check_domain(domain)
        self.selector = _check_selector(selector)
        self._clock = clock or SystemClock()
        self._rsa = _rsa_key(private_key, f"{self.selector}._domainkey.{self.domain}")
        self.ed25519_selector: str | None = None
        self._ed25519: nacl.signing.SigningKey | None = None
        if ed25519 is not None:
            self.ed25519_selector = _check_selector(ed25519[0])
            seed = _ed25519_seed(ed25519[1], f"{self.ed25519_selector}._domainkey.{self.domain}")
            self._ed25519 = nacl.signing.SigningKey(seed, encoder=nacl.encoding.Base64Encoder)

    def __repr__(self) -> str:  # never the keys
        return (f"Signer(domain={self.domain!r}, selector={self.selector!r}, "
                f"ed25519_selector={self.ed25519_selector!r})")

    def sign(self, data: bytes) -> bytes:
        """The message (line endings made CRLF) with our DKIM-Signature field(s) prepended:
        rsa-sha256 on top, for verifiers that only check the first signature."""
        data = normalise_eol(data)
        fields, body = _parse(data, f"DKIM-sign for {self.domain}")
        return b"".join(self._dkim_fields(fields, _body_hash(body), int(self._clock.now()))) + data

    def _dkim_fields(self, fields: list[tuple[bytes, bytes]], body_hash: bytes,
                     timestamp: int) -> list[bytes]:
        include = _include_headers([name.decode("ascii", "replace") for name, _ in fields])
        signed = _canonical_fields(fields, include)
        domain = self.domain.encode("ascii")
        keys: list[tuple[bytes, str, Callable[[bytes], bytes]]] = [
            (b"rsa-sha256", self.selector, self._sign_rsa)]
        if self._ed25519 is not None and self.ed25519_selector is not None:
            keys.append((b"ed25519-sha256", self.ed25519_selector, self._sign_ed25519))
        return [_signed_field(DKIM_SIGNATURE, [
            b"v=1", b"a=" + algorithm, b"c=relaxed/relaxed", b"d=" + domain, b"i=@" + domain,
            b"q=dns/txt", b"s=" + selector.encode("ascii"), b"t=%d" % timestamp,
            b"h=" + b":".join(include), b"bh=" + body_hash], signed, sign)
            for algorithm, selector, sign in keys]

    def _arc_set(self, fields: list[tuple[bytes, bytes]], body_hash: bytes, timestamp: int, *,
                 instance: int, cv: str, results: bytes, sealed_before: bytes) -> bytes:
        """Our ARC set (RFC 8617 4.1), ARC-Seal on top, for a message whose header is
        `fields`; `sealed_before` is what the seal covers of the sets before ours.

        Always rsa-sha256, even with an ed25519 key: RFC 8617 has one set per instance
        (a second algorithm per instance was left to a draft never published, and
        validators, dkimpy among them, fail an instance with two), and RSA is what every
        ARC validator checks.
        """
        domain = self.domain.encode("ascii")
        selector = self.selector.encode("ascii")
        aar = (ARC_AUTHENTICATION_RESULTS.encode("ascii") + b": i=%d; " % instance
               + results + CRLF)
        # RFC 8617 4.1.2: the AMS covers the DKIM-Signature fields present (ours among
        # them) and never Authentication-Results or ARC fields.
        names = [name.decode("ascii", "replace") for name, _ in fields]
        include = _include_headers(names) + [DKIM_SIGNATURE.lower().encode("ascii")] * sum(
            1 for n in names if n.lower() == DKIM_SIGNATURE.lower())
        ams = _signed_field(ARC_MESSAGE_SIGNATURE, [
            b"i=%d" % instance, b"a=rsa-sha256", b"c=relaxed/relaxed", b"d=" + domain,
            b"s=" + selector, b"t=%d" % timestamp, b"h=" + b":".join(include),
            b"bh=" + body_hash], _canonical_fields(fields, include), self._sign_rsa)
        seal = _signed_field(ARC_SEAL, [
            b"i=%d" % instance, b"cv=" + cv.encode("ascii"), b"a=rsa-sha256", b"d=" + domain,
            b"s=" + selector, b"t=%d" % timestamp],
            sealed_before + _canonical_raw(aar) + _canonical_raw(ams), self._sign_rsa)
        return seal + ams + aar

    def _sign_rsa(self, data: bytes) -> bytes:
        return self._rsa.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def _sign_ed25519(self, data: bytes) -> bytes:
        # RFC 8463 3: ed25519-sha256 signs the SHA-256 digest of the hash input.
        assert self._ed25519 is not None
        return bytes(self._ed25519.sign(hashlib.sha256(data).digest()).signature)

    @classmethod
    def from_files(cls, domain: str, selector: str, key_path: Path | str, *,
                   ed25519_selector: str | None = None,
                   ed25519_key_path: Path | str | None = None,
                   clock: Clock | None = None) -> Signer:
        """A signer from key files, refusing any that group or others can read."""
        key = _read_key(Path(key_path))
        ed: tuple[str, bytes] | None = None
        if (ed25519_selector is None) != (ed25519_key_path is None):
            raise ConfigError("an ed25519 DKIM key needs both its selector and its key file")
        if ed25519_selector is not None and ed25519_key_path is not None:
            ed = (ed25519_selector, _read_key(Path(ed25519_key_path)))
        return cls(domain, selector, key, ed25519=ed, clock=clock)


def _parse(data: bytes, what: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """dkimpy's split of a CRLF message into (name, value) fields and body."""
    try:
        fields, body = dkim.rfc822_parse(data)
    except (dkim.DKIMException, IndexError) as exc:
        raise SigningError(f"cannot {what}: the header does not parse ({exc})") from exc
    return [(bytes(name), bytes(value)) for name, value in fields], bytes(body)


def _body_hash(body: bytes) -> bytes:
    """bh= of relaxed body canonicalisation and SHA-256, the same for DKIM and the AMS."""
    return base64.b64encode(hashlib.sha256(
        RelaxedCanonicalization.canonicalize_body(body)).digest())


def _signed_field(name: str, tags: list[bytes], signed: bytes,
                  sign: Callable[[bytes], bytes]) -> bytes:
    """A DKIM-Signature, ARC-Message-Signature or ARC-Seal field: the tags, then b= on
    lines of its own, signing `signed` followed by the field itself with b= empty."""
    value = _fold_tags(tags, len(name) + 2) + b";" + CRLF + b"\tb="
    # RFC 6376 3.7: the signature's own field, b= empty, canonicalised, no final CRLF.
    own = _canonical_raw(name.encode("ascii") + b": " + value + CRLF).rstrip(b"\r\n")
    signature = base64.b64encode(sign(signed + own))
    folded = (CRLF + b"\t").join(signature[i:i + 72] for i in range(0, len(signature), 72))
    return name.encode("ascii") + b": " + value + folded + CRLF


def _canonical_raw(field: bytes) -> bytes:
    """One whole field ("Name: value" CRLF), relaxed-canonicalised."""
    name, _colon, value = field.partition(b":")
    [(cname, cvalue)] = RelaxedCanonicalization.canonicalize_headers([(name, value)])
    return bytes(cname) + b":" + bytes(cvalue)


def _canonical_fields(fields: list[tuple[bytes, bytes]], include: list[bytes]) -> bytes:
    """The relaxed hash input of the fields h= names (RFC 6376 5.4.2: a name listed n
    times takes its last n instances, bottom up; names with no instance left add nothing)."""
    chosen: list[tuple[bytes, bytes]] = []
    below: dict[bytes, int] = {}
    for name in include:
        i = below.get(name, len(fields))
        while i > 0:
            i -= 1
            if fields[i][0].lower() == name:
                chosen.append(fields[i])
                break
        below[name] = i
    return b"".join(n + b":" + v
                    for n, v in RelaxedCanonicalization.canonicalize_headers(chosen))


def _fold_tags(tags: list[bytes], first_line_used: int, width: int = 76) -> bytes:
    """Tags joined by "; ", folded between tags and, in a long h=, after its colons
    (RFC 6376 3.5 allows FWS there)."""
    words: list[tuple[bytes, bytes]] = []  # (separator before it on the same line, word)
    for i, tag in enumerate(tags):
        end = b";" if i < len(tags) - 1 else b""
        if tag.startswith(b"h="):
            names = tag.split(b":")
            words.append((b" ", names[0] + (b":" if len(names) > 1 else end)))
            words += [(b"", n + b":") for n in names[1:-1]]
            if len(names) > 1:
                words.append((b"", names[-1] + end))
        else:
            words.append((b" ", tag + end))
    lines: list[bytes] = [b""]
    used = first_line_used
    for separator, word in words:
        if lines[-1] and used + len(separator) + len(word) > width:
            lines.append(b"")
            used = 1
        elif lines[-1]:
            lines[-1] += separator
            used += len(separator)
        lines[-1] += word
        used += len(word)
    return (CRLF + b"\t").join(lines)


def _rsa_key(pem: bytes, where: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"the DKIM key for {where} is not an unencrypted PEM private key") \
            from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"the DKIM key for {where} is not an RSA key")
    if key.key_size < MIN_KEY_BITS:
        raise ConfigError(f"the DKIM key for {where} has {key.key_size} bits; receivers "
                          f"ignore keys under {MIN_KEY_BITS} (RFC 8301): use 2048")
    return key


def _read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the DKIM private key: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: the DKIM private key is readable by others (mode "
            f"{stat.S_IMODE(mode):04o}); run: chmod 600 {shlex.quote(str(path))}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the DKIM private key: {exc.strerror}") from exc


def _ed25519_seed(key: bytes, where: str) -> bytes:
    """The base64 32-byte seed dkimpy signs with, from that form or a PKCS#8 PEM file."""
    if b"-----BEGIN" in key:
        try:
            loaded = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the ed25519 DKIM key for {where} cannot be read") from exc
        if not isinstance(loaded, crypto_ed25519.Ed25519PrivateKey):
            raise ConfigError(f"the ed25519 DKIM key for {where} is not an ed25519 key")
        raw = loaded.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())
        return base64.b64encode(raw)
    seed = b"".join(key.split())
    try:
        nacl.signing.SigningKey(seed, encoder=nacl.encoding.Base64Encoder)
    except (nacl.exceptions.ValueError, nacl.exceptions.TypeError, binascii.Error) as exc:
        raise ConfigError(f"the ed25519 DKIM key for {where} is not a base64 seed "
                          "or PEM key") from exc
    return seed


def _check_domain(domain: str) -> str:
    try:
        return normalise_domain(domain)
    except AddressError as exc:
        raise ConfigError(f"DKIM signing domain: {exc}") from exc


def _check_selector(selector: str) -> str:
    if not _SELECTOR.match(selector):
        raise ConfigError(f"{selector!r} is not a DKIM selector (letters, digits, '-' and '.')")
    return selector.lower()


def keygen(domain: str, selector: str, directory: Path, *, bits: int = 2048,
           ed25519: bool = False) -> tuple[Path, str]:
    """Write a new private key (mode 0600, never over an existing file) and return
    (its path, the DNS TXT record to publish, in zone-file syntax)."""
    domain = _check_domain(domain)
    selector = _check_selector(selector)
    if not ed25519 and not 2048 <= bits <= 4096:
        # RFC 8301: under 2048 is weak; receivers need not check keys over 4096 bits.
        raise ConfigError(f"{bits}-bit RSA DKIM keys: use 2048 to 4096 bits")
    if ed25519:
        signing = nacl.signing.SigningKey.generate()
        private = base64.b64encode(bytes(signing)) + b"\n"
        value = ("v=DKIM1; k=ed25519; p="
                 + base64.b64encode(bytes(signing.verify_key)).decode("ascii"))
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        value = "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode("ascii")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{selector}._domainkey.{domain}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists; a key in use is never overwritten") from exc
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        out.write(private)
    chunks = [value[i:i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    record = f"{selector}._domainkey.{domain}. IN TXT " + " ".join(f'"{c}"' for c in chunks)
    log.info("wrote a new DKIM key for %s._domainkey.%s to %s", selector, domain, path)
    return path, record


def zone_txt_value(record: str) -> str:
    """The TXT value of a keygen() record line: its quoted strings joined, as DNS serves it."""
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', record))


# ------------------------------------------------------------------- ARC seal


def authentication_results_value(authserv_id: str, results: AuthResults) -> str:
    """Our Authentication-Results value (RFC 8601) for what verification concluded."""
    clauses: list[str] = []
    for domain, result in results.dkim:
        clauses.append(f"dkim={result} header.d={domain}" if _is_token(domain)
                       else f"dkim={result}")
    if not results.dkim and results.trusted is None:
        clauses.append("dkim=none")
    if results.from_domain is not None:
        clauses.append(f"dmarc={results.dmarc} header.from={results.from_domain}")
    else:
        clauses.append(f"dmarc={results.dmarc}")
    clauses.append(f"arc={results.arc}")
    return ";\r\n\t".join([authserv_id, *clauses])


def _is_token(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9._-]+", value))


def arc_seal(data: bytes, *, signer: Signer, authserv_id: str, results: AuthResults) -> bytes:
    """RFC 8617 seal of a message we forward: our Authentication-Results, then an ARC set
    (rsa-sha256 with the signer's RSA key) on top, cv= from results.arc.

    Authentication-Results fields already claiming our authserv-id are removed first
    (RFC 8601 5): a sender's forged claims in our name must not be sealed as ours.
    Raises SigningError when results.arc does not fit the chain the message carries, and
    for a chain an earlier hop already sealed as failed (RFC 8617 5.1.3: it cannot be
    continued; sign_and_seal() then sends the copy DKIM-signed only).
    """
    data, sets, timestamp = _prepare_seal(data, signer, authserv_id, results)
    fields, body = _parse(data, f"ARC-seal for {signer.domain}")
    return _seal(signer, data, fields, _body_hash(body), timestamp, authserv_id, results, sets)


def sign_and_seal(data: bytes, *, signer: Signer,
                  arc: tuple[str, AuthResults] | None) -> bytes:
    """A list's outgoing copy, DKIM-signed and, with arc=(authserv-id, results), ARC-sealed.

    The DKIM signature comes first and the ARC set on top of it: RFC 8617 5.1 wants every
    change, "including adding a DKIM-Signature header field", made before sealing, and
    4.1.2 has the AMS cover the DKIM-Signature fields present, so our seal vouches for
    our signature too. A chain an earlier hop already sealed as failed gets no set of ours
    (RFC 8617 5.1.3); the copy is then DKIM-signed only.
    """
    if arc is None:
        return signer.sign(data)
    authserv_id, results = arc
    try:
        prepared, sets, timestamp = _prepare_seal(data, signer, authserv_id, results)
    except _ChainTerminated as exc:
        log.info("not ARC-sealing: %s", exc)
        return signer.sign(data)
    fields, body = _parse(prepared, f"DKIM-sign for {signer.domain}")
    body_hash = _body_hash(body)
    signature = b"".join(signer._dkim_fields(fields, body_hash, timestamp))
    signed = signature + prepared
    signature_fields, _ = _parse(signature + CRLF, f"ARC-seal for {signer.domain}")
    return _seal(signer, signed, signature_fields + fields, body_hash, timestamp,
                 authserv_id, results, sets)


class _ChainTerminated(SigningError):
    """An earlier hop sealed the ARC chain with cv=fail: nobody may extend it."""


def _prepare_seal(data: bytes, signer: Signer, authserv_id: str, results: AuthResults
                  ) -> tuple[bytes, dict[int, list[tuple[str, bytes]]], int]:
    """The message ready for sealing (forged Authentication-Results in our name removed,
    ours on top), the ARC sets it carries, and the time to sign with. Checks that
    results fit the message."""
    if not _is_token(authserv_id):
        raise ConfigError(f"authserv-id {authserv_id!r}: use a host name")
    ours = authserv_id.lower()
    parts = split(normalise_eol(data))
    # Fields we cannot read go too: another reader might read them as ours.
    parts.fields = [f for f in parts.fields
                    if not (f.name.lower() == AUTHENTICATION_RESULTS.lower()
                            and (_authserv_id(f.value) == ours
                                 or parse_authentication_results(f.value) is None))]
    if results.arc not in ("none", "pass", "fail"):
        raise SigningError(f"results.arc is {results.arc!r}: expected none, pass or fail")
    arc_names = {n.lower() for n in ARC_FIELDS}
    if results.arc != "none" and not any(f.name.lower() in arc_names for f in parts.fields):
        raise SigningError(f"results.arc is {results.arc!r} but the message has no ARC chain")
    sets = _arc_sets([(f.name, f.raw) for f in parts.fields])
    if sets and results.arc == "none":
        raise SigningError("the message has an ARC chain but results.arc is 'none': "
                           "verify it before sealing")
    if any(_tag(raw.partition(b":")[2], "cv") == "fail" for fields in sets.values()
           for name, raw in fields if name == ARC_SEAL.lower()):
        raise _ChainTerminated("an earlier hop sealed this ARC chain with cv=fail, and a "
                               "broken chain cannot be continued (RFC 8617 5.1.3)")
    if max(sets, default=0) >= MAX_ARC_INSTANCE:
        raise SigningError(f"the ARC chain already has i={max(sets)}: no room for "
                           f"another set (at most {MAX_ARC_INSTANCE})")
    if results.arc == "pass" and not _complete(sets):
        raise SigningError("results.arc is 'pass' but the ARC chain is not complete "
                           "(one set of three fields for each i= from 1)")
    ar_field = (f"{AUTHENTICATION_RESULTS}: "
                f"{authentication_results_value(ours, results)}").encode("ascii")
    return ar_field + CRLF + parts.to_bytes(), sets, int(signer._clock.now())


def _seal(signer: Signer, data: bytes, fields: list[tuple[bytes, bytes]], body_hash: bytes,
          timestamp: int, authserv_id: str, results: AuthResults,
          sets: Mapping[int, list[tuple[str, bytes]]]) -> bytes:
    """data, whose header is `fields` and whose ARC chain is `sets`, with our ARC set
    on top."""
    # RFC 8617 5.1.1: the seal covers every set before ours, by increasing instance, each
    # in the order AAR, AMS, AS; after a failure only our own set (5.1.2), as no two
    # validators could agree on what a broken chain's sets are.
    before = b""
    if results.arc == "pass":
        order = {n.lower(): k for k, n in enumerate(reversed(ARC_FIELDS))}
        before = b"".join(_canonical_raw(raw + CRLF) for i in sorted(sets)
                          for _name, raw in sorted(sets[i], key=lambda f: order[f[0]]))
    arc_set = signer._arc_set(
        fields, body_hash, timestamp, instance=max(sets, default=0) + 1, cv=results.arc,
        results=authentication_results_value(authserv_id.lower(), results).encode("ascii"),
        sealed_before=before)
    return arc_set + data


_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d{1,9})\s*(?:;|$)")


def _arc_sets(fields: Sequence[tuple[str, bytes]]) -> dict[int, list[tuple[str, bytes]]]:
    """The ARC fields of a header by instance: {i: [(lowercase name, raw field)]}.

    A field without a readable i= belongs to no set: where only such fields are
    present, a failed chain is sealed as i=1, cv=fail, which every validator fails.
    """
    names = {n.lower() for n in ARC_FIELDS}
    sets: dict[int, list[tuple[str, bytes]]] = {}
    for name, raw in fields:
        lname = name.lower()
        if lname not in names:
            continue
        value = re.sub(rb"\r\n[ \t]", b" ", raw.partition(b":")[2])
        m = _INSTANCE.search(value)
        if m is not None:
            sets.setdefault(int(m.group(1)), []).append((lname, raw))
    return sets


def _complete(sets: Mapping[int, list[tuple[str, bytes]]]) -> bool:
    """Instances 1..N, each with exactly one field of each ARC name (RFC 8617 5.2)."""
    wanted = sorted(n.lower() for n in ARC_FIELDS)
    return (sorted(sets) == list(range(1, len(sets) + 1))
            and all(sorted(name for name, _ in fields) == wanted for fields in sets.values()))


# ------------------------------------------------------------------- keys per domain


class SigningKeys:
    """The DKIM signer of each list domain, from ``<selector>._domainkey.<domain>.key``
    files (as keygen() writes them), each loaded once. A domain without a key file
    gets None: its mail goes out unsigned, and that is logged once."""

    def __init__(self, directory: Path, *, selector: str, ed25519_selector: str = "",
                 clock: Clock | None = None) -> None:
        self.directory = directory
        self.selector = selector
        self.ed25519_selector = ed25519_selector
        self.clock = clock
        self._signers: dict[str, Signer | None] = {}
        self._lock = threading.Lock()

    def path(self, selector: str, domain: str) -> Path:
        return self.directory / f"{selector}._domainkey.{domain}.key"

    def for_domain(self, domain: str) -> Signer | None:
        domain = domain.lower()
        # Loaded under the lock: delivery threads asking at once load a key (and say
        # that it is missing) once.
        with self._lock:
            if domain not in self._signers:
                self._signers[domain] = self._load(domain)
            return self._signers[domain]

    def _load(self, domain: str) -> Signer | None:
        key = self.path(self.selector, domain)
        if not key.exists():
            log.warning("DKIM: no key %s: mail of %s goes out unsigned "
                        "(make one with `listgate dkim keygen %s`)", key, domain, domain)
            return None
        ed = self.path(self.ed25519_selector, domain) if self.ed25519_selector else None
        has_ed = ed is not None and ed.exists()
        signer = Signer.from_files(
            domain, self.selector, key,
            ed25519_selector=self.ed25519_selector if has_ed else None,
            ed25519_key_path=ed if has_ed else None, clock=self.clock)
        log.info("DKIM: signing mail of %s with selector %s%s", domain, self.selector,
                 f" and ed25519 selector {self.ed25519_selector}" if has_ed else "")
        return signer


def results_to_json(results: AuthResults) -> str:
    """AuthResults as stored with a post's content (for the ARC sets of its copies)."""
    return json.dumps(dataclasses.asdict(results))


def results_from_json(text: str) -> AuthResults:
    data = json.loads(text)
    data["dkim"] = tuple(tuple(pair) for pair in data["dkim"])
    return AuthResults(**data)
