"""Names of the header fields the gateway reads or writes."""

from __future__ import annotations

FROM = "From"
SENDER = "Sender"
TO = "To"
CC = "Cc"
REPLY_TO = "Reply-To"
SUBJECT = "Subject"
DATE = "Date"
MESSAGE_ID = "Message-ID"
IN_REPLY_TO = "In-Reply-To"
REFERENCES = "References"
RECEIVED = "Received"
RETURN_PATH = "Return-Path"
DELIVERED_TO = "Delivered-To"
MIME_VERSION = "MIME-Version"
CONTENT_TYPE = "Content-Type"
CONTENT_TRANSFER_ENCODING = "Content-Transfer-Encoding"
CONTENT_DISPOSITION = "Content-Disposition"
PRECEDENCE = "Precedence"
AUTO_SUBMITTED = "Auto-Submitted"
X_LOOP = "X-Loop"

# RFC 2919 and RFC 2369, RFC 8058
LIST_ID = "List-Id"
LIST_POST = "List-Post"
LIST_HELP = "List-Help"
LIST_SUBSCRIBE = "List-Subscribe"
LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
LIST_ARCHIVE = "List-Archive"
LIST_OWNER = "List-Owner"

# Fields a list gateway owns: a poster's copies are removed before ours are added.
LIST_FIELDS = (
    LIST_ID,
    LIST_POST,
    LIST_HELP,
    LIST_SUBSCRIBE,
    LIST_UNSUBSCRIBE,
    LIST_UNSUBSCRIBE_POST,
    LIST_ARCHIVE,
    LIST_OWNER,
    PRECEDENCE,
    RETURN_PATH,
    DELIVERED_TO,
)
