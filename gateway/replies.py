"""SMTP replies of the intake, with RFC 3463 enhanced status codes."""

from __future__ import annotations

OK = "250 2.0.0 OK"
OK_RECIPIENT = "250 2.1.5 OK"
OK_SENDER = "250 2.1.0 OK"

UNKNOWN_ADDRESS = "550 5.1.1 <{address}>: no such list address here; this gateway does not relay"
BAD_ADDRESS = "553 5.1.3 <{address}>: not an address this gateway accepts ({why})"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients in one message; send the rest in another"
MESSAGE_TOO_BIG = "552 5.3.4 Message too big: this gateway takes at most {limit} bytes"
EMPTY_MESSAGE = "554 5.6.0 Empty message: nothing was sent after DATA"
STORE_FAILED = "451 4.3.0 Temporary failure storing the message; please try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down; please try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your address; try again later"

# aiosmtpd's own replies that carry no enhanced status code, and what we say instead.
REWRITES = {
    "552 Error: Too much mail data": MESSAGE_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": MESSAGE_TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": (
        "500 5.5.2 Line too long: lines may be at most {line_limit} bytes"
    ),
    "421 Too many connections": TOO_MANY_CONNECTIONS,
}
