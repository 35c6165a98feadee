"""Confirmation tokens: capabilities sent by mail as LIST-confirm+TOKEN@DOMAIN.

A token is 160 random bits, written in lower-case base32 (MTAs may fold the case
of a local part). Only its SHA-256 digest is stored, so a copy of the database
grants nothing. A token is bound to one list (and, for a hold, one held post),
expires, and is consumed by one atomic UPDATE: of two replies racing, exactly one wins.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.schema import tokens

TOKEN_BYTES = 20  # 160 bits


class Kind(enum.Enum):
    """What a token lets its holder do."""

    HOLD = "hold"          # moderators: decide about a held post
    WITHDRAW = "withdraw"  # the poster: withdraw their own held post
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PROBE = "probe"        # a member whose delivery bounces: "I am still here"


@dataclass(frozen=True)
class Token:
    id: int
    kind: Kind
    list_id: int
    held_id: int | None
    address: str
    created_at: float
    expires_at: float
    used_at: float | None
    used_by: str | None


def _digest(token: str) -> str:
    return hashlib.sha256(token.strip().lower().encode("ascii", "replace")).hexdigest()


def issue(conn: Connection, kind: Kind, *, list_id: int, address: str, now: float,
          ttl: float, held_id: int | None = None) -> str:
    """Make a token and store its digest; the token itself exists only in the mail sent."""
    token = base64.b32encode(secrets.token_bytes(TOKEN_BYTES)).decode("ascii").lower()
    conn.execute(tokens.insert().values(
        digest=_digest(token), kind=kind.value, list_id=list_id, held_id=held_id,
        address=address, created_at=now, expires_at=now + ttl, used_at=None, used_by=None))
    return token


def find(conn: Connection, token: str) -> Token | None:
    """The token's record, if the token exists (whatever its state)."""
    digest = _digest(token)
    row = conn.execute(sa.select(tokens).where(tokens.c.digest == digest)).first()
    # The lookup is by digest; comparing digests in constant time as well keeps the
    # check independent of how much of a guess was right.
    if row is None or not hmac.compare_digest(row.digest, digest):
        return None
    return Token(row.id, Kind(row.kind), row.list_id, row.held_id, row.address, row.created_at,
                 row.expires_at, row.used_at, row.used_by)


def consume(conn: Connection, token: Token, *, by: str, now: float) -> bool:
    """Mark the token used; False if it was already used or has expired (someone won)."""
    result = conn.execute(
        sa.update(tokens)
        .where(tokens.c.id == token.id, tokens.c.used_at.is_(None), tokens.c.expires_at > now)
        .values(used_at=now, used_by=by)
    )
    return result.rowcount == 1
