"""Signed links: one-click unsubscribe and preference links that name one member of one list.

A member token is ``<member id>-<MAC>``: an HMAC-SHA256 over the list, the member's
id and address, under the installation's secret key. It needs no storage, cannot
be forged without the key, and names exactly one member: a link is worthless for
another member or another list, and dies when the member leaves (a new
subscription gets a new id). Tokens are compared in constant time.

The same key tags VERP return paths (gateway.dsn.signed_verp): a tag is an HMAC-SHA256
over the list's address and the member's, so that only a bounce to the return path
we really used can count against a member; see :meth:`LinkSigner.verp_tag`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

from gateway.errors import ConfigError

_TOKEN = re.compile(r"(\d{1,18})-([a-z2-7]{32})")  # 18 digits: always within a BIGINT
KEY_BYTES = 32
# 12 base32 characters: 60 bits. A forger must guess them blind (each guess is a mail
# to us), and the local part must stay within 64 octets, so longer buys little.
VERP_TAG_LENGTH = 12
_VERP_TAG = re.compile(rf"[a-z2-7]{{{VERP_TAG_LENGTH}}}", re.IGNORECASE | re.ASCII)

# Content is made once for all members with this in every personal link; delivery
# makes each member's copy with personalise(). URL-safe, and never wrapped or escaped
# by the encodings used (8bit text, header fields under 998 octets).
PLACEHOLDER = "LGMEMBERTOKEN02PLTIfubwCV0qlU77uZ9YEjKjTqrLei5unf5mnb"
_PLACEHOLDER = PLACEHOLDER.encode("ascii")
_SAFE_TOKEN = re.compile(rb"[A-Za-z0-9_-]{16,128}")
DEFANGED = b"(member-token-removed)"


def personalise(data: bytes, token: str) -> bytes:
    """One member's copy: every placeholder replaced by the member's token."""
    raw = token.encode("ascii")
    if not _SAFE_TOKEN.fullmatch(raw):
        raise ValueError("a member token is 16 to 128 characters of A-Z, a-z, 0-9, '-', '_'")
    return data.replace(_PLACEHOLDER, raw)


def defang(data: bytes) -> bytes:
    """A sender's own copy of the placeholder, made harmless before content is built:
    otherwise personalise() would put each member's token where the sender chose
    (a link or a remote image that reports it back)."""
    return data.replace(_PLACEHOLDER, DEFANGED)


class LinkSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ConfigError("the link signing key is too short (at least 16 bytes)")
        self._key = key

    def __repr__(self) -> str:
        return "LinkSigner(<key hidden>)"

    def _mac(self, list_id: int, member_id: int, address: str) -> str:
        message = f"member\0{list_id}\0{member_id}\0{address.lower()}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii").lower()[:32]

    def member_token(self, list_id: int, member_id: int, address: str) -> str:
        return f"{member_id}-{self._mac(list_id, member_id, address)}"

    @staticmethod
    def member_id(token: str) -> int | None:
        """The member id a token claims (unverified), or None if it is not a token."""
        m = _TOKEN.fullmatch(token)
        return int(m.group(1)) if m else None

    def verify(self, token: str, *, list_id: int, member_id: int, address: str) -> bool:
        m = _TOKEN.fullmatch(token)
        if m is None or int(m.group(1)) != member_id:
            return False
        return hmac.compare_digest(m.group(2), self._mac(list_id, member_id, address))

    def verp_tag(self, list_address: str, member: str) -> str:
        """The tag of ``member``'s VERP return path on the list at ``list_address``.

        Lower-case base32, so that it survives an MTA that changes the case of a
        local part; its own "verp" prefix keeps it apart from the link tokens.
        """
        message = f"verp\0{list_address.lower()}\0{member.lower()}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.b32encode(digest).decode("ascii").lower()[:VERP_TAG_LENGTH]

    def verify_verp_tag(self, tag: str, *, list_address: str, member: str) -> bool:
        if _VERP_TAG.fullmatch(tag) is None:
            return False
        return hmac.compare_digest(tag.lower(), self.verp_tag(list_address, member))

    @classmethod
    def from_file(cls, path: Path, *, create: bool = False) -> LinkSigner:
        """Read the key (refusing one that others can read); with ``create``, make one."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise ConfigError(f"{path}: the link signing key is missing; `listgate init` "
                              "creates it") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path}: the link signing key is readable by others; "
                              f"run: chmod 600 {path}")
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"{path}: the link signing key is not hex") from None
        return cls(key)
