"""Email addresses as the gateway accepts them: parsing, checking, normalising."""

from __future__ import annotations

import re
from email.utils import getaddresses, parseaddr

from gateway.errors import AddressError

# A dot-atom local part (RFC 5322 3.4.1) without the characters that old
# relays treat as routing: '%' (percent hack) and '!' (bang path).
_LOCAL = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# All three are used with fullmatch: "^...$" would let a final newline through.
_LIST_NAME = re.compile(r"(?!.*\.\.)[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")


def split(address: str) -> tuple[str, str]:
    """Split ``local@domain`` into its parts, refusing what a list gateway should not take.

    Refused: quoted or empty local parts, source routes, ``%`` and ``!`` routing,
    address literals and domains that are not plain (IDNA-encoded) host names.
    """
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if address.startswith("@") or ":" in address:
        raise AddressError(f"{address!r}: source routes are not accepted")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AddressError(f"{address!r}: not of the form local@domain")
    if local.startswith('"'):
        raise AddressError(f"{address!r}: quoted local parts are not accepted")
    if not _LOCAL.fullmatch(local):
        raise AddressError(f"{address!r}: the local part has characters that are not accepted")
    return local, normalise_domain(domain)


def normalise_domain(domain: str) -> str:
    """Lower-case a domain and check it is a host name (IDN as its ASCII form)."""
    domain = domain.rstrip(".").lower()
    try:
        # An ASCII name is its own IDNA form (the codec only checks label lengths, as
        # the label pattern below does), without the codec's cost.
        ascii_domain = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise AddressError(f"{domain!r}: not a valid domain name") from exc
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError(f"{domain!r}: not a valid domain name")
    return ascii_domain


def normalise(address: str) -> str:
    """The form addresses are stored and compared in: lower case, checked."""
    local, domain = split(address)
    return f"{local.lower()}@{domain}"


def check_list_name(name: str) -> str:
    """A list's local part: lower-case letters, digits, dot, dash and underscore."""
    name = name.lower()
    if not _LIST_NAME.fullmatch(name):
        raise AddressError(
            f"{name!r}: a list name is 1-64 lower-case letters, digits, '.', '-' or '_', "
            "starting and ending with a letter or digit, with no '..'"
        )
    return name


# The stdlib's address parser recurses once per group or route it meets: a hostile
# header can exhaust the stack. Values are cut to a length no real header needs.
MAX_ADDRESS_HEADER = 16384
_PARSER_FAILURES = (RecursionError, ValueError, IndexError)


def header_addresses(values: list[str]) -> list[str]:
    """The normalised addresses in header values like From or Cc, skipping junk."""
    found = []
    for value in values:
        try:
            pairs = getaddresses([value[:MAX_ADDRESS_HEADER]])
        except _PARSER_FAILURES:
            continue
        for _name, address in pairs:
            try:
                found.append(normalise(address))
            except AddressError:
                continue
    return found


def first_address(value: str | None) -> str | None:
    """The normalised first address of a header value, or None."""
    if not value:
        return None
    try:
        _name, address = parseaddr(value[:MAX_ADDRESS_HEADER])
        return normalise(address)
    except (AddressError, *_PARSER_FAILURES):
        return None
