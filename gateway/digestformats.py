"""Rendering one digest issue as a complete message: MIME, plain (RFC 1153) or HTML.

Pure: the posts, the list and the time come in, bytes go out; no store, no clock.
An issue is rendered once per format with PLACEHOLDER standing for the member's
token in every link, and the caller makes each member's copy with bytes.replace
(see personalise()). Posts are read tolerantly: a post the stdlib cannot parse
still gets its place, its headers and whatever text can be recovered.
"""

from __future__ import annotations

import email.errors
import email.message
import email.utils
import hashlib
import html
import logging
import re
import textwrap
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser

from gateway import headers as h
from gateway.decorate import list_fields, message_id_for
from gateway.errors import ConfigError
from gateway.identity import ListIdentity
from gateway.message import (
    CRLF,
    Parts,
    content_charset,
    decode_header,
    make_field,
    parse,
    split,
)
from gateway.signing import DEFANGED, PLACEHOLDER
from gateway.templates import Templates

log = logging.getLogger(__name__)

FORMATS = ("mime", "plain", "html")

# Letters and digits only: nothing in a URL, a header or an HTML attribute escapes
# them, and no line folding or transfer encoding we use touches them.
# What a post's own copy of PLACEHOLDER becomes, so that the per-member substitution
# can never put a member's token where the poster chose (e.g. in a remote image URL).
_DEFANGED = DEFANGED.decode("ascii")

_SEPARATOR = "-" * 30  # RFC 1153: between enclosed messages (the templates draw them)
_MAX_LINE = 998  # RFC 5322 2.1.1, in octets, without CRLF
_SAFE_LINE = 900  # what we aim for when we break lines ourselves
_HTML_RUN = 700  # escaped octets of post text per HTML source line

# The stdlib parser (compat32) is forgiving, but hostile input has made it raise
# each of these at some point; a post that does gets its raw text instead.
_PARSE_ERRORS = (ValueError, LookupError, TypeError, AttributeError, IndexError, KeyError,
                 AssertionError, RecursionError, email.errors.MessageError)


@dataclass(frozen=True)
class DigestPost:
    raw: bytes  # the post exactly as received (may be malformed)
    received_at: float


@dataclass(frozen=True)
class DigestIssue:
    mailing_list: ListIdentity
    volume: int
    number: int
    posts: tuple[DigestPost, ...]
    date: float  # when the issue is made


@dataclass(frozen=True)
class Links:
    """The member's own links, as templates see them (with PLACEHOLDER in them); or, in
    a digest that is the same for every member, mailto: links to the list's commands."""

    unsubscribe_url: str  # one-click unsubscribe page for this member, or mailto: leave
    regular_url: str  # "switch to per-post delivery" for this member, or mailto: a command
    personal: bool = True

    @classmethod
    def of(cls, lst: ListIdentity, link_base: str | None) -> Links:
        if link_base is None:
            return cls(unsubscribe_url=f"mailto:{lst.address('leave')}",
                       regular_url=f"mailto:{lst.address('request')}?subject=set%20regular",
                       personal=False)
        base = _check_link_base(link_base)
        return cls(unsubscribe_url=f"{base}/u/{PLACEHOLDER}",
                   regular_url=f"{base}/r/{PLACEHOLDER}")


# -- the view of the issue that templates get -------------------------------------


@dataclass(frozen=True)
class Segment:
    """A run of post text in the HTML page.

    ``url`` set: a link (http, https or mailto only) showing ``text``. ``wrap`` set: a
    place where the HTML source may break its line without changing what is shown.
    """

    text: str = ""
    url: str | None = None
    wrap: bool = False


@dataclass(frozen=True)
class Block:
    """Consecutive lines of a post: either its own words or quoted ('>') lines."""

    quoted: bool
    line_count: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class PostView:
    number: int  # 1-based place in the issue
    subject: str  # decoded, one line
    topic: str  # the subject without the list's prefix (tables of contents)
    author: str  # display name, else the address
    address: str  # the author's address when it is usable in a mailto: link, else ""
    date: str  # the Date field as sent ("" when absent)
    date_display: str  # the date normalised, for the HTML page
    message_id: str
    plain_headers: tuple[tuple[str, str], ...]  # RFC 1153 fields, already folded
    text: str  # the body as text: text/plain part, or HTML converted ("" in "mime")
    attachments: tuple[str, ...]  # "name (type, size)" of what is not included
    depth: int  # reply depth within its thread in this issue
    reply_list_url: str  # mailto: the list, threaded under this post
    reply_author_url: str  # mailto: the author ("" when the address is unusable)

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The text for the HTML page (worked out only when a template asks)."""
        return tuple(_blocks(self.text))


@dataclass(frozen=True)
class Thread:
    number: int
    title: str
    posts: tuple[PostView, ...]

    @property
    def count(self) -> int:
        return len(self.posts)


# -- public entry points ------------------------------------------------------------


def render(issue: DigestIssue, fmt: str, templates: Templates, *,
           link_base: str | None) -> bytes:
    """The digest message for ``issue`` in ``fmt`` ("mime", "plain" or "html").

    Links are ``{link_base}/u/PLACEHOLDER`` (unsubscribe) and ``{link_base}/r/PLACEHOLDER``
    (switch to per-post delivery); without ``link_base``, the digest is the same for every
    member and its links are mailto: ones (the list's leave address and a "set regular"
    command). The result has CRLF line endings throughout.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown digest format {fmt!r}; expected one of {FORMATS}")
    if not issue.posts:
        raise ValueError("a digest issue needs at least one post")
    lst = issue.mailing_list
    links = Links.of(lst, link_base)
    ordered = sorted(issue.posts, key=lambda p: p.received_at)
    # The MIME digest encloses the posts themselves: its contents need only their headers.
    readings = [_read(post, i, lst, bodies=fmt != "mime") for i, post in enumerate(ordered, 1)]
    posts, threads = _thread(readings, lst)
    subject = f"{lst.display_name} Digest, Vol {issue.volume}, Issue {issue.number}"
    context: dict[str, object] = {
        "mailing_list": lst,
        "volume": issue.volume,
        "number": issue.number,
        "subject": subject,
        "date": email.utils.format_datetime(_utc(issue.date)),
        "posts": posts,
        "threads": threads,
        "count": len(posts),
        "links": links,
    }

    def text(name: str, **extra: object) -> str:
        rendered = templates.render(f"digest/{name}", list_address=lst.post_address,
                                    **context, **extra)
        return _tidy(rendered)

    masthead = text("masthead.txt.j2")
    toc = text("toc.txt.j2")
    footer = text("footer.txt.j2")
    head = _head_fields(issue, fmt, subject, links)
    if fmt == "plain":
        body = text("plain.txt.j2", masthead=masthead, toc=toc,
                    footer=_escape_separators(footer))
        message = _single(head, "plain", body)
    elif fmt == "mime":
        message = _mime(head, issue, ordered, masthead=masthead, toc=toc, footer=footer,
                        subject=subject, count=len(posts))
    else:
        alternative = text("page.txt.j2", masthead=masthead, footer=footer)
        page = text("page.html.j2", masthead=masthead)
        message = _alternative(head, alternative, page)
    log.debug("rendered %s digest vol %d issue %d of %s: %d posts, %d bytes", fmt,
              issue.volume, issue.number, lst.post_address, len(posts), len(message))
    return message


# -- reading posts ------------------------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    """What one post says, before it is placed in the issue."""

    number: int
    subject: str
    from_: str
    date: str
    when: datetime
    message_id: str
    parents: tuple[str, ...]  # In-Reply-To, then References, newest first
    fields: tuple[tuple[str, str], ...]  # Date, From, To, Cc, Subject, Message-ID, Keywords
    text: str
    attachments: tuple[str, ...]


def _read(post: DigestPost, number: int, lst: ListIdentity, *, bodies: bool) -> _Reading:
    raw = post.raw
    # An mbox "From " line is not part of the message (and ends the header for split()).
    head_source = raw.split(b"\n", 1)[1] if raw.startswith(b"From ") and b"\n" in raw else raw
    parts = split(head_source)
    subject = _one_line(_clean(decode_header(parts.get(h.SUBJECT)))) or "(no subject)"
    from_ = _one_line(_clean(decode_header(parts.get(h.FROM))))
    date = _one_line(_clean(parts.get(h.DATE) or ""))
    message_id = _msgid(parts.get(h.MESSAGE_ID)) or message_id_for(raw, lst.domain)
    parents = tuple(dict.fromkeys(
        _msgids(parts.get(h.IN_REPLY_TO)) + list(reversed(_msgids(parts.get(h.REFERENCES))))))
    fields: list[tuple[str, str]] = []
    for name in (h.DATE, h.FROM, h.TO, h.CC, h.SUBJECT, h.MESSAGE_ID, "Keywords"):
        for value in parts.get_all(name):
            fields.append((name, _one_line(_clean(decode_header(value)))))
    text, attachments = _body(head_source, parts) if bodies else ("", [])
    return _Reading(number=number, subject=subject, from_=from_, date=date,
                    when=_when(date, post.received_at), message_id=message_id, parents=parents,
                    fields=tuple(fields), text=text, attachments=tuple(attachments))


def _body(raw: bytes, parts: Parts) -> tuple[str, list[str]]:
    """The readable text of a post and a description of each part left out."""
    texts: list[str] = []
    attachments: list[str] = []
    try:
        _walk(parse(raw), texts, attachments, depth=0)
    except _PARSE_ERRORS as exc:
        log.warning("digest: post not parseable as MIME (%s); its raw body is shown", exc)
        texts = [_decode(parts.body, None)]
        attachments = []
    text = "\n\n".join(t.strip("\n") for t in texts if t.strip())
    # RFC 1153: no leading or trailing blank lines in an enclosed body.
    text = re.sub(r"^(?:[ \t]*\n)+|(?:\n[ \t]*)+$", "", _clean(text))
    return text, attachments


def _walk(part: email.message.Message, texts: list[str], attachments: list[str], *,
          depth: int) -> None:
    ctype = part.get_content_type()
    if depth > 20 or ctype == "message/rfc822":
        attachments.append(_describe(part, ctype))
        return
    if part.is_multipart():
        payload = part.get_payload()
        subparts = [p for p in payload if isinstance(p, email.message.Message)] \
            if isinstance(payload, list) else []
        if ctype == "multipart/alternative" and subparts:
            chosen = _preferred(subparts)
            _walk(chosen, texts, attachments, depth=depth + 1)
            return
        for sub in subparts:
            _walk(sub, texts, attachments, depth=depth + 1)
        return
    disposition = (part.get_content_disposition() or "inline").lower()
    # A multipart whose boundary never shows up arrives as one undivided body: show
    # it as text rather than lose the words in it.
    broken = part.get_content_maintype() == "multipart"
    if (ctype in ("text/plain", "text/html") or broken) and disposition != "attachment":
        data = part.get_payload(decode=True)
        content = _decode(data if isinstance(data, bytes) else b"", content_charset(part))
        texts.append(html_to_text(content) if ctype == "text/html" else content)
        return
    attachments.append(_describe(part, ctype))


def _preferred(alternatives: list[email.message.Message]) -> email.message.Message:
    """In multipart/alternative: plain text, else HTML, else the last (RFC 2046 5.1.4)."""
    for wanted in ("text/plain", "text/html"):
        for alt in alternatives:
            if alt.get_content_type() == wanted:
                return alt
    for alt in alternatives:
        if alt.is_multipart():
            return alt
    return alternatives[-1]


def _describe(part: email.message.Message, ctype: str) -> str:
    name = part.get_filename()
    if not name and ctype == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message):
            name = f"message: {decode_header(inner[0].get(h.SUBJECT)) or '(no subject)'}"
    label = _one_line(_clean(decode_header(name) if name else "")) or "unnamed"
    data = part.get_payload(decode=True)
    size = _size(len(data)) if isinstance(data, bytes) else "size unknown"
    return f"{_shorten(label, 120)} ({ctype}, {size})"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _decode(data: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            return data.decode(candidate)
        except (LookupError, ValueError):
            continue
    return data.decode("cp1252", "replace")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    """Text from a post, safe to show: LF line ends, no control characters, no PLACEHOLDER."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    while PLACEHOLDER in text:
        text = text.replace(PLACEHOLDER, _DEFANGED)
    return text


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


_MSGID = re.compile(r"<[^<>\s]{1,250}>")


def _msgid(value: str | None) -> str:
    found = _msgids(value)
    if found:
        return found[0]
    # Some mailers leave out the angle brackets; the post still goes out with this id.
    bare = (value or "").strip()
    return f"<{bare}>" if re.fullmatch(r"[^<>\s]{1,250}@[^<>\s]{1,250}", bare) else ""


def _msgids(value: str | None) -> list[str]:
    return _MSGID.findall(value or "")


def _when(date: str, received_at: float) -> datetime:
    if date:
        try:
            parsed = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError, OverflowError):
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return _utc(received_at)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


# -- threads ------------------------------------------------------------------------

_REPLY_MARKERS = re.compile(r"^\s*((re|aw|sv|antw|fwd?|wg)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


def _topic(subject: str, lst: ListIdentity) -> str:
    """The subject without the list's prefix (kept: any "Re:")."""
    prefix = lst.subject_prefix.strip()
    if prefix:
        at = subject.lower().find(prefix.lower())
        if at != -1 and _REPLY_MARKERS.sub("", subject[:at]) == "":
            subject = subject[:at] + subject[at + len(prefix):]
    return _one_line(subject) or "(no subject)"


def _base_subject(subject: str, lst: ListIdentity) -> str:
    """What a thread is called: the topic without reply and forward markers."""
    topic = _topic(subject, lst)
    return _one_line(_REPLY_MARKERS.sub("", topic)) or topic


def _thread(readings: list[_Reading], lst: ListIdentity) -> tuple[list[PostView],
                                                                 list[Thread]]:
    """Posts as templates see them, and the same posts grouped into threads.

    Posts are joined when one refers to another or both refer to the same message
    (In-Reply-To, References); a post that refers to nothing joins the posts whose
    subject, without list prefix and "Re:", is the same.
    """
    union = _Union()
    by_id = {r.message_id: r for r in readings}
    for r in readings:
        union.add(r.message_id)
        for ref in r.parents:
            union.join(r.message_id, ref)
        if not r.parents:
            key = _base_subject(r.subject, lst).lower()
            if key and key != "(no subject)":
                union.join(r.message_id, "subject:" + key)
    depth: dict[str, int] = {}
    for r in readings:
        parent = next((p for p in r.parents if p in by_id and by_id[p].number < r.number), None)
        depth[r.message_id] = min(depth.get(parent, -1) + 1, 8) if parent else 0

    views = [_view(r, lst, depth.get(r.message_id, 0)) for r in readings]
    groups: dict[str, list[PostView]] = {}
    for r, view in zip(readings, views, strict=True):
        groups.setdefault(union.find(r.message_id), []).append(view)
    threads = [Thread(number=i, title=_shorten(_base_subject(members[0].subject, lst), 150),
                      posts=tuple(members))
               for i, members in enumerate(groups.values(), 1)]
    return views, threads


class _Union:
    """Union-find over message ids (and subject keys)."""

    def __init__(self) -> None:
        self._up: dict[str, str] = {}

    def add(self, key: str) -> None:
        self._up.setdefault(key, key)

    def find(self, key: str) -> str:
        self.add(key)
        root = key
        while self._up[root] != root:
            root = self._up[root]
        while self._up[key] != root:
            self._up[key], key = root, self._up[key]
        return root

    def join(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._up[rb] = ra


_ADDRESS = re.compile(r"[^\s@<>()\[\],;:\"\\]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")


def _view(r: _Reading, lst: ListIdentity, depth: int) -> PostView:
    name, address = email.utils.parseaddr(r.from_)
    address = address if _ADDRESS.fullmatch(address or "") else ""
    author = _shorten(_one_line(name) or address or r.from_ or "(unknown sender)", 100)
    topic = _topic(r.subject, lst)
    reply_subject = "Re: " + _base_subject(r.subject, lst)
    reply_list = _mailto(lst.post_address, reply_subject, r.message_id)
    reply_author = _mailto(address, reply_subject, r.message_id) if address else ""
    return PostView(
        number=r.number, subject=_shorten(r.subject, 150), topic=_shorten(topic, 150),
        author=author, address=address, date=r.date,
        date_display=r.when.strftime("%a, %d %b %Y %H:%M %z"), message_id=r.message_id,
        plain_headers=tuple((n, _fold(n, v)) for n, v in r.fields),
        text=_escape_separators(_limit_lines(r.text)), attachments=r.attachments,
        depth=depth, reply_list_url=reply_list, reply_author_url=reply_author)


def _mailto(address: str, subject: str, in_reply_to: str) -> str:
    """An RFC 6068 mailto: URL, kept short enough for one line of HTML source."""
    to = urllib.parse.quote(address, safe="@.+-_")
    thread = urllib.parse.quote(in_reply_to, safe="")
    if len(thread) > 300:
        thread = ""
    budget = 800 - len(to) - len(thread)
    subject = subject[:budget // 3]  # at least 3 octets each once quoted, mostly
    quoted = urllib.parse.quote(subject, safe="")
    while len(quoted) > budget and subject:
        subject = subject[:-8]
        quoted = urllib.parse.quote(subject, safe="")
    url = f"mailto:{to}?subject={quoted}"
    return url + f"&In-Reply-To={thread}" if thread else url


# -- text shaping -------------------------------------------------------------------


def _tidy(text: str) -> str:
    """Template output with LF line ends and exactly one final newline.

    Trailing spaces stay: a post's "-- " signature separator is one."""
    return text.replace("\r\n", "\n").strip("\n") + "\n"


def _limit_lines(text: str, limit: int = _SAFE_LINE) -> str:
    """Lines no longer than ``limit`` octets, broken at a space where there is one."""
    out: list[str] = []
    for line in text.split("\n"):
        while len(line.encode("utf-8")) > limit:
            cut = _cut(line, limit)
            out.append(line[:cut].rstrip())
            line = line[cut:].lstrip(" ")
        out.append(line)
    return "\n".join(out)


def _cut(line: str, limit: int) -> int:
    """Where to break ``line`` so that the first piece fits in ``limit`` octets."""
    size = 0
    end = 0
    for i, ch in enumerate(line):
        size += len(ch.encode("utf-8"))
        if size > limit:
            end = i
            break
    space = line.rfind(" ", 0, end)
    return space if space > end // 2 else max(end, 1)


def _escape_separators(text: str) -> str:
    """RFC 1153: a body line of exactly 30 hyphens gets a blank for its first character."""
    return re.sub(f"(?m)^{_SEPARATOR}$", " " + _SEPARATOR[1:], text)


def _fold(name: str, value: str) -> str:
    """A field value folded (tab continuation) so that each line stays short."""
    lines = textwrap.wrap(value, width=76, initial_indent=" " * (len(name) + 2),
                          break_long_words=True, break_on_hyphens=False) or [""]
    lines[0] = lines[0].lstrip()
    return "\n\t".join(line.strip() for line in lines)


_URL = re.compile(r"(?:https?://|mailto:)[^\s<>\"'`]+", re.IGNORECASE)


def _blocks(text: str) -> list[Block]:
    """The text split into own and quoted blocks, links found, source lines kept short."""
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    groups: list[tuple[bool, list[str]]] = []
    for i, line in enumerate(lines):
        quoted = line.lstrip().startswith(">")
        if not line.strip() and groups and groups[-1][0]:
            # A blank line between two quoted lines belongs to the quote.
            following = next((x for x in lines[i + 1:] if x.strip()), "")
            quoted = following.lstrip().startswith(">")
        if groups and groups[-1][0] == quoted:
            groups[-1][1].append(line)
        else:
            groups.append((quoted, [line]))
    blocks = []
    for quoted, group in groups:
        # Blocks are set apart on the page; blank lines at their edges would only add space.
        while group and not group[-1].strip():
            group.pop()
        while group and not group[0].strip():
            group.pop(0)
        if group:
            blocks.append(Block(quoted=quoted, line_count=len(group),
                                segments=tuple(_segments("\n".join(group)))))
    return blocks


def _segments(text: str) -> list[Segment]:
    out = _SegmentWriter()
    pos = 0
    for m in _URL.finditer(text):
        url = _trim_url(m.group(0))
        if not _linkable(url):
            continue
        out.text(text[pos:m.start()])
        out.link(url)
        pos = m.start() + len(url)
    out.text(text[pos:])
    return out.segments


def _trim_url(url: str) -> str:
    while url and url[-1] in ".,;:!?*'":
        url = url[:-1]
    while url.endswith(")") and url.count(")") > url.count("("):
        url = url[:-1]
    return url


def _linkable(url: str) -> bool:
    if _escaped_size(url) > _HTML_RUN:
        return False
    try:
        split_url = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    if split_url.scheme.lower() == "mailto":
        return bool(split_url.path)
    return split_url.scheme.lower() in ("http", "https") and bool(split_url.netloc)


class _SegmentWriter:
    """Segments whose HTML source lines stay within _HTML_RUN escaped octets."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self._run = 0

    def _wrap(self) -> None:
        self.segments.append(Segment(wrap=True))
        self._run = 0

    def text(self, text: str) -> None:
        if not text:
            return
        piece: list[str] = []
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if i:
                piece.append("\n")
                self._run = 0
            size = _escaped_size(line)
            if self._run + size <= _HTML_RUN:
                piece.append(line)
                self._run += size
                continue
            for ch in line:  # rare: a line too long for one source line
                width = _escaped_size(ch)
                if self._run + width > _HTML_RUN:
                    self.segments.append(Segment(text="".join(piece)))
                    piece = []
                    self._wrap()
                piece.append(ch)
                self._run += width
        self.segments.append(Segment(text="".join(piece)))

    def link(self, url: str) -> None:
        # The template breaks the source line inside the <a> tag, after the href.
        self._wrap()
        self.segments.append(Segment(text=url, url=url))
        self._run = _escaped_size(url) + 8


def _escaped_size(text: str) -> int:
    """Octets of ``text`` once HTML-escaped (at most; Jinja's entities are no longer)."""
    return len(html.escape(text).encode("utf-8"))


# -- HTML posts to text -------------------------------------------------------------

_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "center", "dd", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
    "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody",
    "thead", "tfoot", "tr", "ul",
})
_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
                             "blockquote", "pre", "dl", "figure"})
# Not "head": a missing </head> would then hide the whole post.
_SKIP_TAGS = frozenset({"script", "style", "title", "template", "svg", "math", "object",
                        "iframe"})


class _TextFromHTML(HTMLParser):
    """Readable text from an HTML post: no scripts or styles, links as visible URLs,
    images as their alt text, blockquotes as '>' lines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self._line: list[str] = []
        self._skip: list[str] = []
        self._pre = 0
        self._quote = 0
        self._href: str | None = None
        self._anchor: list[str] = []
        self._lists: list[int] = []  # per open list: next number, or -1 when unordered

    def _end_line(self) -> None:
        text = "".join(self._line)
        if not self._pre:
            text = text.strip()
        self._line = []
        self.lines.append(("> " * self._quote) + text if self._quote else text)

    def _break(self, *, blank: bool = False) -> None:
        if "".join(self._line).strip():
            self._end_line()
        if blank and self.lines:
            marker = ("> " * self._quote).rstrip()
            if self.lines[-1].strip(" >"):
                self.lines.append(marker)
            else:  # already a blank line: at the depth we are now at
                self.lines[-1] = marker

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip.append(tag)
            return
        if self._skip:
            return
        if tag in _BLOCK_TAGS:
            self._break(blank=tag in _PARAGRAPH_TAGS)
        if tag == "br":
            self._end_line()
        elif tag == "pre":
            self._pre += 1
        elif tag == "blockquote":
            self._quote += 1
        elif tag in ("ul", "ol"):
            self._lists.append(1 if tag == "ol" else -1)
        elif tag == "li":
            marker = "*"
            if self._lists and self._lists[-1] > 0:
                marker = f"{self._lists[-1]}."
                self._lists[-1] += 1
            self._line.append(marker + " ")
        elif tag == "hr":
            self._line.append("-" * 20)
            self._end_line()
        elif tag in ("td", "th"):
            self._line.append(" ")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt is None:
                self._line.append("[image]")
            elif alt.strip():  # alt="" marks an image as decoration (or a tracking pixel)
                self._line.append(f"[image: {_one_line(alt)}]")
        elif tag == "a":
            self._href = _safe_href(dict(attrs).get("href"))
            self._anchor = []

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            if tag == self._skip[-1]:
                self._skip.pop()
            return
        if tag == "a":
            shown = _one_line("".join(self._anchor))
            href = self._href
            if href and shown != href and shown != href.removeprefix("mailto:"):
                self._line.append(f" <{href}>")
            self._href = None
        if tag == "blockquote" and self._quote:
            self._break()  # the quote's last line, still quoted
            self._quote -= 1
        if tag in _BLOCK_TAGS:
            self._break(blank=tag in _PARAGRAPH_TAGS)
        if tag == "pre" and self._pre:
            self._pre -= 1
        elif tag in ("ul", "ol") and self._lists:
            self._lists.pop()

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._pre:
            first, *rest = data.replace("\r\n", "\n").split("\n")
            self._line.append(first)
            for piece in rest:
                self._end_line()
                self._line.append(piece)
        else:
            text = re.sub(r"\s+", " ", data)
            if not "".join(self._line).strip():
                text = text.lstrip()
            self._line.append(text)
        if self._href is not None:
            self._anchor.append(data)

    def text(self) -> str:
        self.close()
        self._break()
        text = "\n".join(line.rstrip() for line in self.lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _safe_href(href: str | None) -> str | None:
    if not href:
        return None
    href = href.strip()
    scheme = href.split(":", 1)[0].lower() if ":" in href else ""
    return href if scheme in ("http", "https", "mailto") else None


def html_to_text(markup: str) -> str:
    """Readable plain text from an HTML post; nothing of its markup survives."""
    parser = _TextFromHTML()
    try:
        parser.feed(markup)
        return parser.text()
    except (AssertionError, ValueError, IndexError) as exc:
        # Older html.parser versions raised on some malformed declarations.
        log.warning("digest: HTML post not convertible (%s); shown with tags removed", exc)
        return re.sub(r"<[^>]*>", " ", markup)


# -- assembling the message ---------------------------------------------------------


def _check_link_base(link_base: str) -> str:
    base = link_base.rstrip("/")
    split_url = urllib.parse.urlsplit(base)
    if split_url.scheme not in ("https", "http") or not split_url.netloc or not base.isascii() \
            or re.search(r"[\s<>,\"]", base):
        raise ConfigError(f"digest link base {link_base!r} is not an http(s) URL "
                          "(RFC 8058 one-click unsubscribe wants https)")
    return base


def _head_fields(issue: DigestIssue, fmt: str, subject: str, links: Links) -> list[bytes]:
    lst = issue.mailing_list
    seed = f"{lst.list_id}\0{issue.volume}\0{issue.number}\0{fmt}".encode()
    message_id = (f"<listgate.digest.{issue.volume}.{issue.number}.{fmt}."
                  f"{hashlib.sha256(seed).hexdigest()[:20]}@{lst.domain}>")
    fields: list[tuple[str, str]] = [
        (h.FROM, email.utils.formataddr((lst.display_name, lst.address("request")), "utf-8")),
        (h.TO, lst.post_address),
        # As Mailman does: a reply to the whole digest is a post, not a command.
        (h.REPLY_TO, lst.post_address),
        (h.SUBJECT, subject),
        (h.DATE, email.utils.format_datetime(_utc(issue.date))),
        (h.MESSAGE_ID, message_id),
        (h.MIME_VERSION, "1.0"),
    ]
    if not links.personal:
        fields += [*list_fields(lst), (h.PRECEDENCE, "list"), (h.X_LOOP, lst.post_address)]
        return [make_field(n, v).raw for n, v in fields]
    fields += [(n, v) for n, v in list_fields(lst) if n != h.LIST_UNSUBSCRIBE]
    raw = [make_field(n, v).raw for n, v in fields]
    # Folded between the two URIs by hand: the HTTPS one (RFC 8058) must stay in one
    # piece for the caller's bytes.replace, and both are ASCII.
    raw.append(f"{h.LIST_UNSUBSCRIBE}: <{links.unsubscribe_url}>,\r\n"
               f" <mailto:{lst.address('leave')}>".encode("ascii"))
    raw += [make_field(n, v).raw for n, v in (
        (h.LIST_UNSUBSCRIBE_POST, "List-Unsubscribe=One-Click"),
        (h.PRECEDENCE, "list"),
        (h.X_LOOP, lst.post_address),
    )]
    return raw


def _text_part_fields(subtype: str, text: str) -> tuple[list[bytes], bytes]:
    """Fields and body of a UTF-8 text part; identity transfer encoding, so PLACEHOLDER
    stays one literal run of characters that bytes.replace finds."""
    body = _crlf(_limit_lines(text, _MAX_LINE - 2).encode("utf-8"))
    cte = "7bit" if body.isascii() else "8bit"
    return ([f'Content-Type: text/{subtype}; charset="utf-8"'.encode(),
             f"Content-Transfer-Encoding: {cte}".encode()], body)


def _single(head: list[bytes], subtype: str, text: str) -> bytes:
    fields, body = _text_part_fields(subtype, text)
    return _part(head + fields, body)


def _alternative(head: list[bytes], text: str, page: str) -> bytes:
    plain = _text_part_fields("plain", text)
    rich = _text_part_fields("html", page)
    parts = [_part(*plain), _part(*rich)]
    boundary = _boundary(parts, "alt")
    body = _multipart(boundary, parts)
    return _part([*head, f'Content-Type: multipart/alternative; boundary="{boundary}"'.encode(),
                  *_composite_encoding(body)], body)


def _mime(head: list[bytes], issue: DigestIssue, ordered: Sequence[DigestPost], *,
          masthead: str, toc: str, footer: str, subject: str, count: int) -> bytes:
    contents_fields, contents_body = _text_part_fields("plain", masthead + "\n" + toc)
    contents_fields.append(make_field("Content-Description",
                                      f"Today's Topics ({count} messages)").raw)
    footer_fields, footer_body = _text_part_fields("plain", footer)
    footer_fields.append(b"Content-Description: Digest Footer")
    enclosed = [_enclosed(post.raw, i) for i, post in enumerate(ordered, 1)]
    digest_boundary = _boundary(enclosed, "digest")
    digest_body = _multipart(digest_boundary, enclosed, preamble=False)
    digest = _part([f'Content-Type: multipart/digest; boundary="{digest_boundary}"'.encode(),
                    *_composite_encoding(digest_body)], digest_body)
    parts = [_part(contents_fields, contents_body), digest, _part(footer_fields, footer_body)]
    boundary = _boundary(parts, "mixed")
    # What Mailman puts after the last part, for readers that show the raw message.
    epilogue = f"End of {subject}\r\n".encode("ascii", "replace")
    body = _multipart(boundary, parts, epilogue=epilogue)
    return _part([*head, f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode(),
                  *_composite_encoding(body)], body)


def _enclosed(raw: bytes, number: int) -> bytes:
    """A post as a message/rfc822 part with its bytes as received (line ends as CRLF)."""
    data = _crlf(raw)
    if PLACEHOLDER.encode("ascii") in data:
        log.warning("digest: post %d carries the member-token placeholder; defanged", number)
        while PLACEHOLDER.encode("ascii") in data:
            data = data.replace(PLACEHOLDER.encode("ascii"), _DEFANGED.encode("ascii"))
    if data and not data.endswith(CRLF):
        data += CRLF
    longest = max((len(line) for line in data.split(CRLF)), default=0)
    # RFC 2046 5.2.1: message/rfc822 only in 7bit, 8bit or binary; say which it is.
    if longest > _MAX_LINE or b"\0" in data:
        cte = "binary"
    elif data.isascii():
        cte = "7bit"
    else:
        cte = "8bit"
    return _part([b"Content-Type: message/rfc822",
                  f"Content-Transfer-Encoding: {cte}".encode()], data)


def _composite_encoding(body: bytes) -> list[bytes]:
    """RFC 2045 6.4: a multipart says 8bit or binary when a part in it needs that."""
    if b"\0" in body or any(len(line) > _MAX_LINE for line in body.split(CRLF)):
        return [b"Content-Transfer-Encoding: binary"]
    return [] if body.isascii() else [b"Content-Transfer-Encoding: 8bit"]


def _part(fields: list[bytes], body: bytes) -> bytes:
    return CRLF.join(fields) + CRLF + CRLF + body


def _multipart(boundary: str, parts: Iterable[bytes], *, preamble: bool = True,
               epilogue: bytes = b"") -> bytes:
    delimiter = b"--" + boundary.encode("ascii")
    out = [b"This is a multi-part message in MIME format.\r\n\r\n"] if preamble else []
    for part in parts:
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046 5.1.1): adding
        # one keeps each part's own last line end, so an enclosed post stays byte-exact.
        out.append(delimiter + CRLF + part + CRLF)
    out.append(delimiter + b"--" + CRLF)
    if epilogue:
        out.append(CRLF + epilogue)
    return b"".join(out)


def _boundary(parts: Sequence[bytes], kind: str) -> str:
    """A boundary that occurs in none of the parts, the same for the same parts."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    salt = 0
    while True:
        boundary = f"=_lg_{kind}_{digest.hexdigest()[:24]}_{salt}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary
        salt += 1


def _crlf(data: bytes) -> bytes:
    """Every line end (CRLF, bare LF or bare CR) as CRLF, as SMTP requires."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data)
