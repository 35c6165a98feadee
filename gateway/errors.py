"""The one exception tree of Listgate.

    ListgateError
     +-- ConfigError          the configuration or a policy file is invalid
     +-- StoreError           the store could not do what was asked
     |    +-- StoreUnavailable    a transient failure (disk full, lock, lost connection)
     |    +-- SchemaOutdated      the database needs `listgate db upgrade`
     |    +-- LeaseLost           our claim on a queue row expired and another took it
     +-- NotFound             a list, member or queue row does not exist
     +-- Conflict             it already exists, or is in a state that forbids the change
     +-- AddressError         not a usable email address or list name
     +-- TemporaryDNSError    a DNS lookup failed in a way that may succeed later
     +-- SigningError         a message could not be DKIM-signed or ARC-sealed
     +-- DeliveryError        the smarthost did not take a message
          +-- TransientDeliveryError   4xx or a connection problem: try again later
          +-- PermanentDeliveryError   5xx: do not try again
"""

from __future__ import annotations


class ListgateError(Exception):
    """Base of every error Listgate raises on purpose."""


class ConfigError(ListgateError):
    """The configuration or a policy file is invalid; the message says where."""


class StoreError(ListgateError):
    """The store could not do what was asked."""


class StoreUnavailable(StoreError):
    """A transient store failure: disk full, database locked, connection lost."""


class SchemaOutdated(StoreError):
    """The database schema is older than this code; run `listgate db upgrade`."""


class LeaseLost(StoreError):
    """Our lease on a queue row expired and another worker claimed it; our work is undone."""


class NotFound(ListgateError):
    """A list, member or queue row does not exist."""


class Conflict(ListgateError):
    """The thing already exists, or its state forbids the change."""


class AddressError(ListgateError):
    """Not a usable email address or list name."""


class TemporaryDNSError(ListgateError):
    """A DNS lookup failed in a way that may succeed later (SERVFAIL, timeout)."""


class SigningError(ListgateError):
    """A message could not be signed or sealed; the message says why."""


class DeliveryError(ListgateError):
    """The smarthost did not take a message."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class TransientDeliveryError(DeliveryError):
    """A 4xx reply or a connection problem: the message is retried later."""


class PermanentDeliveryError(DeliveryError):
    """A 5xx reply: retrying will not help."""
