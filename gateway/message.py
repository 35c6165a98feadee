"""Reading messages as they really arrive: tolerant header access over raw bytes.

Nothing here raises on malformed input. Header fields are kept as raw byte
lines so that what we do not touch goes out exactly as it came in.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.policy
import re
from dataclasses import dataclass, field

_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
CRLF = b"\r\n"


@dataclass
class Field:
    """One header field: its name and its raw bytes, continuation lines included."""

    name: str
    raw: bytes  # "Name: value" with folding, without the final line ending

    @property
    def value(self) -> str:
        """The unfolded value as text (undecoded; undecodable bytes kept as escapes)."""
        _name, _colon, value = self.raw.partition(b":")
        text = value.decode("utf-8", "surrogateescape")
        return re.sub(r"\r?\n[ \t]", " ", text).strip()


@dataclass
class Parts:
    """A message split into header fields and body bytes."""

    fields: list[Field] = field(default_factory=list)
    body: bytes = b""

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [f.value for f in self.fields if f.name.lower() == lname]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def remove(self, *names: str) -> list[Field]:
        lnames = {n.lower() for n in names}
        removed = [f for f in self.fields if f.name.lower() in lnames]
        self.fields = [f for f in self.fields if f.name.lower() not in lnames]
        return removed

    def replace(self, name: str, value: str) -> None:
        """Set a field in the place of its first occurrence (or at the end)."""
        new = make_field(name, value)
        lname = name.lower()
        for i, f in enumerate(self.fields):
            if f.name.lower() == lname:
                self.fields[i] = new
                self.fields = [g for j, g in enumerate(self.fields)
                               if j == i or g.name.lower() != lname]
                return
        self.fields.append(new)

    def add(self, name: str, value: str) -> None:
        self.fields.append(make_field(name, value))

    def prepend(self, name: str, value: str) -> None:
        self.fields.insert(0, make_field(name, value))

    def to_bytes(self) -> bytes:
        head = CRLF.join(f.raw for f in self.fields)
        return normalise_eol(head + CRLF + CRLF + self.body)


def normalise_eol(data: bytes) -> bytes:
    """Every line ending as CRLF, as SMTP requires (bare CR and bare LF included)."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data)


_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")


def make_field(name: str, value: str) -> Field:
    """A header field from text, RFC 2047-encoding it if it is not ASCII.

    Line breaks in the value are flattened and the name must be a field name:
    nothing can add a field or end the header.
    """
    if not _NAME.match(name):
        raise ValueError(f"not a header field name: {name!r}")
    value = re.sub(r"[\r\n]+", " ", value)
    if not value.isascii():
        encoded = email.header.Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
        return Field(name, f"{name}: {encoded}".encode("ascii"))
    return Field(name, _fold(f"{name}: {value}").encode("ascii"))


def _fold(line: str, width: int = 78) -> str:
    """Fold at blanks so lines stay under ``width`` where they can (RFC 5322 2.2.3);
    a word longer than that stays whole."""
    if len(line) <= width:
        return line
    out: list[str] = []
    current = ""
    words = re.split(r"(?<=\S)(?= )", line)
    words[:2] = ["".join(words[:2])]  # never leave the field name alone on its line
    for word in words:
        if current and len(current) + len(word) > width:
            out.append(current)
            current = word
        else:
            current += word
    out.append(current)
    return "\r\n".join(out)


def split(raw: bytes) -> Parts:
    """Split raw bytes into header fields and body, as forgivingly as Python's parser.

    The header block ends at the first empty line, or at the first line that is
    neither a field nor a continuation (that line then starts the body). An
    obsolete field with blanks before its colon ("Date  :", RFC 5322 4.5) is
    written in the modern form, since other parsers take it for the body's start.
    """
    parts = Parts()
    lines: list[bytes] = []  # the current field's lines, joined once it is complete
    name = ""

    def flush() -> None:
        if lines:
            parts.fields.append(Field(name, CRLF.join(lines)))

    pos = 0
    n = len(raw)
    while pos < n:
        end = raw.find(b"\n", pos)
        line_end = n if end == -1 else end + 1
        line = raw[pos:line_end].rstrip(b"\r\n")
        if not line:
            pos = line_end
            break
        if line[:1] in (b" ", b"\t"):
            if not lines:
                name = ""  # a continuation with nothing to continue: an unnamed field
            lines.append(line)
        else:
            m = _FIELD_NAME.match(line)
            if m is None:
                break
            flush()
            name = m.group(1).decode("ascii")
            lines = [m.group(1) + b":" + line[m.end():]]
        pos = line_end
    flush()
    parts.body = raw[pos:]
    return parts


def decode_header(value: str | None) -> str:
    """An RFC 2047-decoded header value as clean text.

    Raw 8-bit bytes (which RFC 5322 forbids, but mail has) are read as UTF-8 when
    they are valid UTF-8, else as Windows-1252, the usual culprit.
    """
    if not value:
        return ""
    value = _unescape(value)  # raw 8-bit first: the stdlib mangles it beside encoded words
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (UnicodeError, LookupError, email.errors.MessageError, ValueError):
        # Mixed raw text and encoded words: decode the words one by one.
        return _ENCODED_WORD.sub(_decode_word, value)


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


def _decode_word(m: re.Match[str]) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(m.group(0))))
    except (UnicodeError, LookupError, email.errors.MessageError, ValueError):
        return m.group(0)


def _unescape(text: str) -> str:
    """Turn surrogate escapes (undecodable bytes kept by surrogateescape) into characters."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


def parse(raw: bytes) -> email.message.Message:
    """The stdlib's most forgiving parse (compat32); for MIME walking, never for headers
    that are then trusted blindly."""
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def content_charset(part: email.message.Message) -> str | None:
    """The charset ``part`` declares, lower-cased, or None: also when the parameter
    cannot be read, which the stdlib's ``get_content_charset`` raises ValueError on (an
    RFC 2231 ``charset*=`` whose own charset has a NUL in its name)."""
    try:
        return part.get_content_charset()
    except ValueError:
        return None


def leaf_payload(part: email.message.Message) -> str:
    """A leaf's payload as text, as ``get_payload()`` gives it: bytes the parser could
    not decode are read through the part's charset. The stdlib raises there when the
    charset is an RFC 2231 parameter (``charset*=``, which it keeps as a tuple:
    TypeError) or has a NUL in its name (ValueError); then the charset is read as
    ``content_charset`` reads it, and one Python cannot use as ASCII with replacement
    characters, as the stdlib does for one it does not know."""
    try:
        payload = part.get_payload()
    except (TypeError, ValueError):
        raw = getattr(part, "_payload", "")  # what get_payload() itself reads
        if not isinstance(raw, str):
            return ""
        data = raw.encode("ascii", "surrogateescape")
        try:
            return data.decode(content_charset(part) or "ascii", "replace")
        except (LookupError, ValueError):
            return data.decode("ascii", "replace")
    return payload if isinstance(payload, str) else ""


@dataclass(frozen=True)
class ContentType:
    maintype: str
    subtype: str
    params: dict[str, str]

    @property
    def type(self) -> str:
        return f"{self.maintype}/{self.subtype}"


def content_type(value: str | None) -> ContentType:
    """A Content-Type value, defaulting like RFC 2045 to text/plain."""
    m = email.message.Message()
    if value:
        # Undecodable bytes next to non-ASCII text would make the stdlib raise.
        m["Content-Type"] = _unescape(value)
    ctype = m.get_content_type()
    params = {k.lower(): v for k, v in (m.get_params() or [])[1:] if isinstance(v, str)}
    maintype, _, subtype = ctype.partition("/")
    return ContentType(maintype, subtype, params)
