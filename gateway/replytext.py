"""Reading a command out of a reply: the subject, or the first line the person wrote.

Replies come from real mail clients: the command may sit above quoted text,
an attribution line ("On ... wrote:"), an Outlook header block or a signature,
and the reply may be HTML only. Only what the person typed counts; quoted
text never does, and there is no default command.
"""

from __future__ import annotations

import html
import html.parser
import re
from dataclasses import dataclass
from email.message import Message

from gateway.message import content_charset, decode_header, parse

_REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|fw|fwd|wg|antw)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_LIST_PREFIX = re.compile(r"^\s*\[[^\]]{1,64}\]\s*")
_STOP = re.compile(
    r"^\s*("
    r"-- ?$"                                            # signature delimiter
    r"|on .{0,200} wrote:?\s*$"                         # "On <date>, <name> wrote:"
    r"|am .{0,200} schrieb .{0,100}:?\s*$"
    r"|le .{0,200} a écrit\s*:?\s*$"
    r"|el .{0,200} escribió:?\s*$"
    r"|-{2,}\s*original message\s*-{2,}"                # Outlook
    r"|_{10,}\s*$"                                      # Outlook's rule before the header block
    r"|from:\s.*$"                                      # a forwarded/quoted header block
    r"|sent from my .*$"
    r")", re.IGNORECASE)


@dataclass(frozen=True)
class Command:
    verb: str
    argument: str


def own_text(raw: bytes) -> tuple[str, list[str]]:
    """(subject without Re:/list prefixes, the lines the sender wrote above any quote)."""
    msg = parse(raw)
    subject = decode_header(msg.get("Subject"))
    for _ in range(3):
        subject = _LIST_PREFIX.sub("", _REPLY_PREFIX.sub("", subject))
    text = _body_text(msg)
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith(">") or _STOP.match(line):
            break
        lines.append(line.rstrip())
    return subject.strip(), lines


def find_command(raw: bytes, verbs: frozenset[str]) -> Command | None:
    """The command on the first line the sender wrote, else in the subject, else None."""
    subject, lines = own_text(raw)
    written = [line for line in lines if line.strip()]
    if written:
        found = _command(written[0], verbs)
        if found is not None:
            rest = []
            for line in lines[lines.index(written[0]) + 1:]:
                if not line.strip():
                    break
                rest.append(line.strip())
            argument = " ".join([found.argument, *rest]).strip()
            return Command(found.verb, argument)
    return _command(subject, verbs)


def _command(line: str, verbs: frozenset[str]) -> Command | None:
    words = line.strip().split(None, 1)
    if not words:
        return None
    verb = words[0].lower().strip(".,;:!?*\"'")
    if verb not in verbs:
        return None
    return Command(verb, words[1].strip() if len(words) > 1 else "")


def _body_text(msg: Message) -> str:
    """The first text/plain part that is not an attachment, else HTML made into text."""
    html_part = None
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        # str(): 8-bit bytes in the field come back from the parser as a Header object.
        if str(part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        subtype = part.get_content_subtype()
        if subtype == "plain":
            return _decoded(part)
        if subtype == "html" and html_part is None:
            html_part = part
    return html_to_text(_decoded(html_part)) if html_part is not None else ""


def _decoded(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = content_charset(part) or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except (LookupError, ValueError):  # an unknown charset, or one with a NUL in it
        return payload.decode("utf-8", "replace")


class _Text(html.parser.HTMLParser):
    """HTML to text, dropping quoted material the way mail clients mark it."""

    _BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                         "pre"})
    _VOID = frozenset({"br", "img", "hr", "meta", "link", "input", "area", "base", "col",
                       "embed", "source", "track", "wbr"})
    _QUOTE_CLASSES = ("gmail_quote", "moz-cite-prefix", "yahoo_quoted", "protonmail_quote")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip: list[str] = []
        self._stopped = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._stopped:
            return
        values = " ".join(v or "" for _k, v in attrs).lower()
        if self._skip:
            if tag not in self._VOID:  # void elements have no end tag to pop them
                self._skip.append(tag)
            return
        if tag in ("blockquote", "script", "style", "head", "title") or any(
                c in values for c in self._QUOTE_CLASSES) or "divrplyfwdmsg" in values:
            self._skip.append(tag)
            return
        if tag == "hr":
            self._stopped = True  # Outlook puts the quoted original after a rule
            return
        if tag in self._BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            if tag not in self._VOID:
                self._skip.pop()
            return
        if tag in self._BLOCKS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip and not self._stopped:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    parser = _Text()
    try:
        parser.feed(markup)
        parser.close()
    except (AssertionError, ValueError, IndexError):
        # html.parser raises on some malformed declarations ("<![e09..."), as the
        # digests' converter (digestformats.html_to_text) also finds. The reply is what
        # came before it: not the markup with its tags removed, which would bring in
        # the quoted notice (and the commands it names) that the parser leaves out.
        pass
    text = html.unescape("".join(parser.out)).replace("\xa0", " ")
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()
