"""The promotional rule's scorer: explainable signals plus a learned word model, no I/O.

A message is scored in log-odds from three parts::

    log-odds = bias + model weight * model evidence + sum of the signals' weights

- the **bias** is a prior (PRIOR_PROMOTIONAL): a message with nothing to go on is unlikely
  to be an advert;
- **the word model**: naive Bayes over the subject's and body's words with Robinson's
  chi-squared combining (as SpamBayes does), its say scaled down when it knows few of a
  message's words; its counts are mergeable, so a list's own moderator decisions add to
  the shipped base model;
- **signals**: what a moderator would name when calling a post an advert (calls to
  action, prices, offers, urgency, link and image density, tracking pixels, bulk-mailer
  headers, a shouting subject, opt-out footers, ...), and two that speak for discussion
  (it replies to a thread, it quotes an earlier post).

The weights and the decision thresholds travel with the model (bench/promo_train.py picks
them by cross-validation): one for mail the word model can judge (it knows FULL_COVERAGE
of the words, and MIN_KNOWN_WORDS of them), and a floor for mail it cannot (another
language, another trade, a one-line post), which is held only on more than MIN_EVIDENCE
beyond the prior: never on one signal alone.
``score()`` returns the probability and the signals that fired, each with its
contribution, so the hold notice can say why. The post is judged as its author wrote it:
footers other list servers appended are left out. Nothing here raises on malformed mail:
parsing is compat32, bounded, and every decoding step is guarded. The only I/O is
``load_model()``.
"""

from __future__ import annotations

import binascii
import codecs
import email.errors
import email.message
import html
import json
import math
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from os import PathLike
from pathlib import Path
from urllib.parse import urlsplit

from gateway import headers as h
from gateway.errors import ConfigError
from gateway.message import content_charset, decode_header, parse, split

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "data" / "promo_model.json"
MODEL_FORMAT = "listgate-promo-model"
MODEL_VERSION = 1

# Bounds that keep scoring fast on any input: a promotional pitch is in the first
# megabyte and the first few text parts of a message, never beyond.
MAX_SCAN_BYTES = 1 << 20
MAX_PARTS = 32
MAX_DEPTH = 8
MAX_PART_CHARS = 100_000
MAX_TEXT_CHARS = 200_000
MAX_TOKENS = 1500
MAX_DETAIL_ITEMS = 3

# The word model: SpamBayes' defaults (unknown_word_strength, unknown_word_prob,
# minimum_prob_strength, max_discriminators).
_PRIOR_STRENGTH = 0.45
_PRIOR_PROB = 0.5
_MIN_STRENGTH = 0.1
_MAX_CLUES = 150
# The model's probability is clipped before it enters the log-odds sum, so that one
# over-confident model cannot silence every signal.
_MODEL_CLIP = 0.001
# The model has its full say once it knows this share of a message's words (list
# discussion in the training corpus: at least 46%, nearly always above 60%).
FULL_COVERAGE = 0.5
# Nor can it judge a message from a handful of words, however many of them it knows ("hi"
# or "I am away" may be all words it saw in spam): it takes this many known words.
MIN_KNOWN_WORDS = 20
# Mail the word model cannot judge is held only on more than this much evidence beyond
# the prior, in log-odds: more than any one signal may add (bench/promo_train.py caps each
# at it), so it takes two pieces of evidence. The corpus cannot show how unfamiliar mail
# fares; this floor, not fitted, is what protects it.
MIN_EVIDENCE = 2.5

# Errors the stdlib may raise while reading malformed MIME (header parameters, charsets,
# transfer encodings, broken nesting). Scoring swallows exactly these.
_MAIL_ERRORS = (LookupError, UnicodeError, ValueError, TypeError, AttributeError,
                IndexError, AssertionError, RecursionError, email.errors.MessageError)


@dataclass(frozen=True)
class Signal:
    name: str     # stable id, e.g. "call-to-action"
    weight: float  # its contribution to the score, in log-odds (negative: speaks for discussion)
    detail: str   # what a moderator reads


@dataclass(frozen=True)
class PromoScore:
    probability: float             # 0..1, signals and model combined
    signals: tuple[Signal, ...]    # the signals that fired, most promotional first
    model_probability: float       # the learned model's part alone
    threshold: float = 0.5         # the decision threshold this score was judged by (the
                                   # model's floor if it could not judge the words)
    model_clues: tuple[str, ...] = ()  # words that most made the model lean promotional

    @property
    def promotional(self) -> bool:
        return self.probability >= self.threshold

    def top(self, n: int = 3) -> tuple[Signal, ...]:
        """The n signals that pushed most towards promotional (positive weight only)."""
        return tuple(s for s in self.signals if s.weight > 0)[:n]


@dataclass(frozen=True)
class SignalSpec:
    name: str
    direction: int        # +1 speaks for promotional, -1 for discussion
    prior_weight: float   # weight used when a model carries none
    summary: str


SIGNALS: tuple[SignalSpec, ...] = (
    SignalSpec("call-to-action", 1, 1.0, "asks the reader to click, buy, order, call or sign up"),
    SignalSpec("price", 1, 0.7, "quotes prices"),
    SignalSpec("discount", 1, 1.0, "offers discounts, free gifts, guarantees"),
    SignalSpec("urgency", 1, 1.0, "presses for a quick decision (limited time, act now)"),
    SignalSpec("money", 1, 1.0, "pitches money: income, loans, debt, prizes"),
    SignalSpec("link-density", 1, 0.7, "many links for little text"),
    SignalSpec("image-density", 1, 1.0, "mostly images, little text"),
    SignalSpec("tracking-pixel", 1, 2.0, "a hidden 1x1 image that reports when the mail is read"),
    SignalSpec("url-shortener", 1, 1.5, "links through a URL shortener"),
    SignalSpec("obscured-link", 1, 1.5, "links that hide where they go"),
    SignalSpec("hidden-text", 1, 1.5, "text styled to be invisible"),
    SignalSpec("bulk-mailer", 1, 2.0, "headers of bulk-mail software or a newsletter service"),
    SignalSpec("html-only", 1, 0.7, "HTML with no plain-text version"),
    SignalSpec("shouting-subject", 1, 1.0, "a subject in capitals or with !!! or $$$"),
    SignalSpec("unsubscribe-footer", 1, 1.0, "marketing opt-out language"),
    SignalSpec("not-spam-claim", 1, 2.0, "claims not to be spam or to comply with a law"),
    SignalSpec("undisclosed-recipients", 1, 0.7, "sent to undisclosed recipients"),
    SignalSpec("reply", -1, -1.5, "replies to an earlier message"),
    SignalSpec("quotes-earlier-post", -1, -1.0, "quotes an earlier message"),
)
SIGNAL_NAMES = tuple(s.name for s in SIGNALS)
_SPECS = {s.name: s for s in SIGNALS}


@dataclass(frozen=True)
class Weights:
    """How signals and the model combine: log-odds = bias + model * logit(p) + Σ signals."""

    bias: float
    model: float
    signals: tuple[tuple[str, float], ...]

    def of(self, name: str) -> float:
        for n, w in self.signals:
            if n == name:
                return w
        return _SPECS[name].prior_weight if name in _SPECS else 0.0

    @classmethod
    def prior(cls) -> Weights:
        """Hand-set weights: a model trained on no data uses them, and training starts
        from them (a signal the training mail never shows keeps its prior weight)."""
        return cls(bias=logit(PRIOR_PROMOTIONAL), model=1.0,
                   signals=tuple((s.name, s.prior_weight) for s in SIGNALS))


DEFAULT_THRESHOLD = 0.5
# How likely a message is promotional with nothing to go on (no signal fired, the word
# model undecided): the bias of the log-odds sum. It is a prior, not fitted, so that mail
# unlike the training corpus (another language, another trade) is not held for that alone.
PRIOR_PROMOTIONAL = 0.05


# ---------------------------------------------------------------------------------------
# Reading a message


@dataclass(frozen=True)
class _Mail:
    """What scoring needs from one message, read once."""

    subject: str
    fields: dict[str, bytes]  # lower-cased name: the first such field's raw value
    plain: str                # text/plain parts, list footers removed
    html: str                 # text/html source, list footers left in
    html_text: str            # text/html rendered to text, list footers removed
    has_plain: bool
    has_html: bool
    image_parts: int          # image/* parts (counted when there is no HTML)
    text: str                 # the readable body: the plain part, else the HTML's text
    body: str                 # what the words are read from: ``text``, plus the HTML's
                              # text when there are both (words only the HTML carries count)
    body_urls: tuple[tuple[int, int], ...]  # where _URL matches in ``body``

    def text_urls(self) -> list[str]:
        """The links written in ``text``."""
        if len(self.text) <= MAX_TEXT_CHARS:
            # ``body`` starts with all of ``text`` and a line break after it (no link
            # runs across one), so its links that start in ``text`` are ``text``'s.
            return [self.body[a:b] for a, b in self.body_urls if a < len(self.text)]
        return [m.group() for m in _URL.finditer(self.text)]

    def get(self, name: str) -> str | None:
        """The first field called ``name`` (lower case), unfolded, as
        gateway.message.Field.value gives it; decoded only when asked for."""
        value = self.fields.get(name)
        return None if value is None else _value(value)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.fields)


MAX_FIELDS = 500
# The header fields as gateway.message.split() reads them: lines split at "\n", each field
# a line and its continuation lines; the block of them, and each one (name, value).
_SPLIT_HEADER_BLOCK = re.compile(
    rb"(?:[\x21-\x39\x3b-\x7e]+[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z))*")
_SPLIT_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)")
# A line break inside a field, with the carriage returns before it (split() drops those).
_UNFOLD = re.compile(r"\r*\n[ \t]")


def _fields(raw: bytes) -> dict[str, bytes]:
    """The header fields gateway.message.split() finds (the first MAX_FIELDS), by
    lower-cased name: the first field of each name, its value neither unfolded nor
    decoded (few are ever read)."""
    if raw[:1] in (b" ", b"\t"):
        # A continuation line with no field before it: split() keeps it as a nameless
        # field and reads on; rare enough to leave to it.
        pairs = [(f.name, f.raw.partition(b":")[2]) for f in split(raw).fields[:MAX_FIELDS]]
        return {n.lower(): v for n, v in reversed(pairs)}
    block = _SPLIT_HEADER_BLOCK.match(raw)
    found = _SPLIT_FIELD.findall(raw, 0, block.end() if block is not None else 0)[:MAX_FIELDS]
    names = map(str.lower, map(bytes.decode, map(itemgetter(0), reversed(found))))
    # Built from the last field to the first, so that the first of each name stays.
    return dict(zip(names, map(itemgetter(1), reversed(found)), strict=True))


def _read(raw: bytes) -> _Mail:
    raw = raw[:MAX_SCAN_BYTES]
    if raw.startswith(b"From "):
        # An mbox "From " line (archives, procmail): not a header field.
        raw = raw.partition(b"\n")[2]
    fields = _fields(raw)
    raw_subject = fields.get("subject")
    subject = "" if raw_subject is None else _decoded(_value(raw_subject)[:2000])[:1000]
    plain: list[str] = []
    htmls: list[str] = []
    has_plain = has_html = False
    images = 0
    try:
        msg = _parse(raw)
    except _MAIL_ERRORS:
        msg = None
    if msg is not None:
        for part in _leaves(msg):
            try:
                ctype = part.get_content_type()
                if ctype.startswith("image/"):
                    images += 1
                    continue
                if ctype not in ("text/plain", "text/html") or _is_attachment(part):
                    continue
                text = _part_text(part)
            except _MAIL_ERRORS:
                continue
            if ctype == "text/plain":
                has_plain = has_plain or bool(text.strip())
                plain.append(_strip_list_footer(text))
            else:
                has_html = True
                htmls.append(text)
    source = "\n".join(htmls)[:MAX_TEXT_CHARS]
    plain_text = "\n".join(plain)[:MAX_TEXT_CHARS]
    html_text = _strip_list_footer(html_to_text(source)) if source else ""
    text = plain_text if plain_text.strip() else html_text
    body = (text + "\n" + html_text if has_plain and has_html else text)[:MAX_TEXT_CHARS]
    return _Mail(
        subject=subject,
        fields=fields,
        plain=plain_text,
        html=source,
        html_text=html_text,
        has_plain=has_plain,
        has_html=has_html,
        image_parts=images,
        text=text,
        body=body,
        body_urls=tuple(m.span() for m in _URL.finditer(body)),
    )


# The header block as the stdlib's FeedParser reads it: lines split at "\r\n", "\r" or
# "\n", each starting like a header line (feedparser.headerRE), up to the first that does
# not; then the same lines grouped into fields (a line and its continuation lines).
_FEED_HEADER_BLOCK = re.compile(
    r"(?:(?:From |[\041-\071\073-\176]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n|\Z))*")


def _ascii_nocase(word: str) -> str:
    """A pattern for ``word`` in any mix of ASCII upper and lower case (re.I would also
    take the long s and the dotless i for an s and an i)."""
    return "".join(f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


# The fields that decide how a body is read (all that is asked of the parsed message):
# each, with its continuation lines, where a header line starts (the start of the text,
# or after a line break).
_FEED_MIME_FIELD = re.compile(
    r"[cC](?<![^\r\n].)" + _ascii_nocase("ontent-")
    + "(?:" + "|".join(_ascii_nocase(n) for n in ("type", "transfer-encoding", "disposition"))
    + r"):([^\r\n]*(?:\r\n|\r|\n|\Z)(?:[\t ][^\r\n]*(?:\r\n|\r|\n|\Z))*)")
# A header line the FeedParser records a defect for: an envelope line, a nameless field.
# (Its first character first, so that the regex engine skips to those.)
_FEED_ODD_LINE = re.compile(r"(?:F(?<![^\r\n].)rom |:(?<![^\r\n].))")


def _parse(raw: bytes) -> email.message.Message:
    """gateway.message.parse(raw) (the stdlib's compat32 parse), with a shortcut.

    Most posts are one text part. For those the parse is only the header block and
    the rest as the payload, and reading it here takes a fraction of the FeedParser's
    time: its header lines are found as it finds them and stored as it stores them
    (``compat32.header_source_parse``, ``Message.set_raw``), so the message reads as the
    one it builds; only the fields that say how to read the body are kept, as nothing
    else is read from it. Anything else (MIME parts, nested messages, the header oddities
    it records defects for) goes to the FeedParser itself.
    """
    text = raw.decode("ascii", "surrogateescape")  # as email.parser.BytesParser does
    if text[:1] in ("\t", " "):
        return parse(raw)  # a continuation line with nothing to continue
    block = _FEED_HEADER_BLOCK.match(text)
    end = block.end() if block is not None else 0
    if _FEED_ODD_LINE.search(text, 0, end):
        return parse(raw)
    msg = email.message.Message()
    for m in _FEED_MIME_FIELD.finditer(text, 0, end):
        # compat32.header_source_parse() of the field's lines, on the lines joined.
        msg.set_raw(text[m.start():m.start(1) - 1], m.group(1).lstrip(" \t").rstrip("\r\n"))
    if msg.get_content_maintype() in ("multipart", "message"):
        return parse(raw)
    if text[end:end + 1] in ("\r", "\n"):
        # The empty line that ends the header block is not part of the body.
        end += 2 if text.startswith("\r\n", end) else 1
    msg.set_payload(text[end:])
    return msg


def _decoded(value: str) -> str:
    """gateway.message.decode_header(value), skipping its work when there is nothing to
    decode (ASCII without encoded words, which it returns unchanged)."""
    if value.isascii() and "=?" not in value:
        return value
    return decode_header(value)


def _value(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape")
    return _UNFOLD.sub(" ", text).strip() if "\n" in text else text.strip()


def _leaves(msg: email.message.Message) -> Iterator[email.message.Message]:
    """Non-multipart parts, depth first, bounded in depth and number (no recursion)."""
    stack: list[tuple[email.message.Message, int]] = [(msg, 0)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, depth = stack.pop()
        try:
            multipart = part.is_multipart()
            payload = part.get_payload() if multipart else None
        except _MAIL_ERRORS:
            continue
        if multipart:
            if depth < MAX_DEPTH and isinstance(payload, list):
                children = [p for p in payload if isinstance(p, email.message.Message)]
                stack.extend((c, depth + 1) for c in reversed(children))
            continue
        seen += 1
        yield part


def _is_attachment(part: email.message.Message) -> bool:
    disposition = str(part.get(h.CONTENT_DISPOSITION, "")).lower()
    return disposition.startswith("attachment")


_QP_ESCAPE = re.compile(rb"=(?:3D|20|0A|3C|3E|22|[0-9A-F]{2}\r?\n)")


def _part_text(part: email.message.Message) -> str:
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    if str(part.get(h.CONTENT_TRANSFER_ENCODING, "")).strip().lower() == "base64":
        data = _base64_then_text(str(part.get_payload()).encode("ascii", "surrogateescape"),
                                 data)
    undeclared = part.get(h.CONTENT_TRANSFER_ENCODING) is None
    if undeclared and len(_QP_ESCAPE.findall(data, 0, 4096)) >= 8:
        # Quoted-printable sent without saying so: what a mail client would still show.
        data = quopri.decodestring(data)
    return _decode(data[: MAX_PART_CHARS * 2], content_charset(part))[:MAX_PART_CHARS]


_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/]*=*")
_BASE64_RUN = re.compile(rb"(?:[A-Za-z0-9+/]+=*[ \t]*\r?\n)+")


def _base64_then_text(encoded: bytes, decoded: bytes) -> bytes:
    """The body of a base64 part as a mail client shows it when a list server appended
    a plain-text footer to it: the base64 lines decoded, then the rest as it stands.
    Python decodes the footer's letters as more base64 (or gives up on the whole)."""
    last = encoded.rstrip().rpartition(b"\n")[2]
    if _BASE64_LINE.fullmatch(last.strip()) is not None:
        return decoded  # the usual case: nothing follows the base64
    run = _BASE64_RUN.match(encoded)
    if run is None:
        return decoded
    lines = b"".join(run.group().split())
    try:
        return binascii.a2b_base64(lines[: len(lines) - len(lines) % 4]) + b"\n" \
            + encoded[run.end():]
    except binascii.Error:
        return decoded


def _decode(data: bytes, charset: str | None) -> str:
    """Bytes to text by the declared charset, else UTF-8, else Windows-1252; never fails."""
    if charset:
        try:
            codecs.lookup(charset)
            return data.decode(charset, "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


_HTML_DROP = re.compile(r"<(script|style|title)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_HTML_BLOCK = re.compile(
    r"<\s*/?\s*(?:br|p|div|tr|td|th|li|ul|ol|h[1-6]|table|tbody|center|hr|blockquote)\b[^>]*>",
    re.I)
_HTML_TAG = re.compile(r"<[^<>]{0,2000}>")


def html_to_text(source: str) -> str:
    """The text a reader sees in an HTML part (approximately; no CSS layout)."""
    text = _HTML_DROP.sub("", source)
    text = _HTML_BLOCK.sub("\n", text)
    text = _HTML_TAG.sub("", text)
    return html.unescape(text)


# The boilerplate other list servers append (Mailman, Yahoo! Groups, SourceForge, Google
# Groups). Listgate scores the post as its author wrote it, so such a footer on a
# forwarded or cross-posted message (and on every message of a list archive) is not
# counted: its "unsubscribe" and its sponsor's advert are not the poster's. A footer is
# recognised by an unmistakable list-server phrase near the end, and starts at the
# separator line shortly before it (or at the phrase's own line).
_FOOTER_SEPARATOR = re.compile(r"^[ \t]*[-_~=*]{8,}.*$", re.M)
_FOOTER_MARKER = re.compile(
    r"^.*mailing list\s*$(?:\n.*){0,3}(?:listinfo|mailman)|yahoo! groups|groups\.yahoo\.com"
    r"|you received this message because you are subscribed to the google groups"
    r"|to unsubscribe from this group|/mailman/listinfo/|/lists/listinfo/",
    re.I | re.M)
# Once a list footer is gone, a sponsor block the same server put just above it goes too.
_FOOTER_OR_SPONSOR = re.compile(_FOOTER_MARKER.pattern + r"|\bsponsor(?:ed)?\b", re.I | re.M)
_FOOTER_SPAN = 3000
_FOOTER_REACH = 600
# The phrases of those patterns other than "mailing list" (which starts its line's match).
_FOOTER_PHRASES = ("yahoo! groups", "groups.yahoo.com", "you received this message because you "
                   "are subscribed to the google groups", "to unsubscribe from this group",
                   "/mailman/listinfo/", "/lists/listinfo/")
_FOOTER_OR_SPONSOR_PHRASES = (*_FOOTER_PHRASES, "sponsor")
_FOOTER_MARKER_LOWER = re.compile(_FOOTER_MARKER.pattern, re.M)
_FOOTER_OR_SPONSOR_LOWER = re.compile(_FOOTER_OR_SPONSOR.pattern, re.M)


def _strip_list_footer(text: str) -> str:
    sponsor = False
    for _round in range(3):
        start = max(0, len(text) - _FOOTER_SPAN)
        # From the character before the span, which tells whether it starts a line.
        offset = start - 1 if start else 0
        tail = text[offset:]
        lower = tail.lower()
        found: tuple[int, int] | None = None
        if len(lower) == len(tail) and not any(c in tail for c in _FOLDS_TO_ASCII):
            # In this text, lower-case letters are exactly what re.I matches: a lower-case
            # pattern tried only where one of its words is runs many times faster.
            found = _last_footer_marker(lower, start - offset, sponsor)
            if found is not None:
                found = (found[0] + offset, found[1] + offset)
        else:
            for m in (_FOOTER_OR_SPONSOR if sponsor else _FOOTER_MARKER).finditer(text, start):
                found = m.span()
        if found is None or len(text) - found[1] > _FOOTER_REACH:
            break  # none, or not at the end: a quoted footer is part of the discussion
        cut = text.rfind("\n", 0, found[0]) + 1
        for sep in _FOOTER_SEPARATOR.finditer(text, max(0, found[0] - _FOOTER_REACH),
                                              found[0] + 1):
            cut = sep.start()
        text = text[:cut].rstrip()
        sponsor = True
    return text


# The characters re.I matches with an ASCII letter although their lower case is not that
# letter (long s, Kelvin sign, dotless i, dotted capital I).
_FOLDS_TO_ASCII = ("ſ", "\u212a", "ı", "İ")


def _last_footer_marker(lower: str, begin: int, sponsor: bool) -> tuple[int, int] | None:
    """The span of the last _FOOTER_MARKER (or _FOOTER_OR_SPONSOR) match in lower-cased
    ``lower`` from ``begin`` on, trying the pattern only where a match can start: at the
    start of a line that says "mailing list", and where its other phrases are."""
    starts = {lower.rfind("\n", 0, i) + 1 for i in _occurrences(lower, ("mailing list",))}
    starts.update(_occurrences(lower, _FOOTER_OR_SPONSOR_PHRASES if sponsor
                               else _FOOTER_PHRASES))
    pattern = _FOOTER_OR_SPONSOR_LOWER if sponsor else _FOOTER_MARKER_LOWER
    found = None
    for m in _matches_from(pattern, lower, sorted(i for i in starts if i >= begin)):
        found = m.span()
    return found


# ---------------------------------------------------------------------------------------
# Tokens for the model


# A link as written in text: r"\b(?:https?://|ftp://|www\.)[^\s<>\"'()\[\]{}]+" with re.I,
# spelt so that the regex engine only tries it where an h, f or w is (a leading \b or
# re.I makes it try every position): the boundary is checked once that letter is read,
# and re.I's extra matches for these letters are listed (the long s, "ſ", matches s).
_URL = re.compile(
    r"[hHfFwW](?<!\w.)(?:(?<=[hH])[tT][tT][pP][sSſ]?://|(?<=[fF])[tT][pP]://|(?<=[wW])[wW][wW]\.)"
    r"[^\s<>\"'()\[\]{}]+")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_EMAIL_LOCAL = re.compile(r"[\w.+-]*")
_WORD = re.compile(r"[^\W\d_][\w'’-]*", re.U)
_SUBJECT_TAG = re.compile(r"^\s*(?:(?:re|fw|fwd|aw|sv)\s*(?:\[\d+\])?\s*:\s*|\[[^\]]{1,40}\]\s*)+",
                          re.I)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def tokens(raw: bytes) -> list[str]:
    """The words the model sees: subject words (prefixed ``subject:``) and body words.

    Addresses and links become the markers ``<email>`` and ``<url>``: a site's name says
    little about whether a post is an advert on another list. Unique, in order, bounded.
    """
    return _tokens(_read(raw))


def _tokens(mail: _Mail) -> list[str]:
    out: dict[str, None] = {}
    subject = _SUBJECT_TAG.sub("", mail.subject)
    for word in _words(subject):
        out.setdefault("subject:" + word)
    body = mail.body
    if mail.body_urls:
        out.setdefault("<url>")
    if "@" in body and _first(_emails(body)) is not None:
        out.setdefault("<email>")
    body = _blank(body, mail.body_urls)
    if "@" in body:
        body = _blank(body, _emails(body))
    out.update(dict.fromkeys(_words(body)))
    return list(out)[:MAX_TOKENS]


def _first(spans: Iterator[tuple[int, int]]) -> tuple[int, int] | None:
    return next(spans, None)


def _blank(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` with each span replaced by a space (as ``re.sub(" ", ...)`` would)."""
    pieces: list[str] = []
    last = 0
    for start, end in spans:
        pieces.append(text[last:start])
        pieces.append(" ")
        last = end
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


def _emails(text: str) -> Iterator[tuple[int, int]]:
    """The spans ``_EMAIL.finditer(text)`` finds, found from each "@" instead of trying
    the pattern at every position (which costs as much as the rest of scoring)."""
    pos = 0
    backwards = ""
    n = len(text)
    while (at := text.find("@", pos)) >= 0:
        if not backwards:
            backwards = text[::-1]
        # The leftmost match can only start where the run of address characters that
        # ends at this "@" starts (or where the last match ended, inside that run).
        run = _EMAIL_LOCAL.match(backwards, n - at)
        start = max(at - (run.end() - run.start()) if run else at, pos)
        if start < at and (m := _EMAIL.match(text, start)) is not None:
            yield m.span()
            pos = m.end()
        else:
            pos = at + 1


def _words(text: str) -> list[str]:
    """The words of ``text`` the model counts, lower-cased, in order (repeats left in)."""
    lower = text.lower()
    if lower.isascii():
        # What _WORD finds, several times faster: in ASCII a word is a run of letters,
        # digits, "_", "'" and "-" from its first letter on. Then, as below.
        return [w if alpha else w.strip("'-")
                for run in dict.fromkeys(lower.translate(_NOT_IN_WORDS).split())
                if 2 < len(w := run.lstrip(_NOT_LETTERS)) < 21
                and ((alpha := w.isalpha()) or sum(map(str.isdigit, w)) < 2)]
    found = dict.fromkeys(_WORD.findall(lower))
    if max(map(len, found), default=0) <= 20:
        # The usual case, in one pass: 3 to 20 letters, fewer than two digits (not a
        # serial number or tracking code), without the quotes or hyphens around it.
        return [w if alpha else w.strip("'’-").replace("’", "'") for w in found
                if 2 < len(w) < 21
                and ((alpha := w.isalpha()) or sum(map(str.isdigit, w)) < 2)]
    out: list[str] = []
    for word in found:
        n = len(word)
        if 3 <= n <= 20:
            if word.isalpha() or sum(map(str.isdigit, word)) < 2:
                out.append(word.strip("'’-").replace("’", "'"))
        elif n > 20 and _CJK.search(word):
            # Scripts written without spaces: character pairs stand in for words.
            out.extend(word[i:i + 2] for i in range(min(n - 1, 40)))
    return out


_NOT_LETTERS = "0123456789_'-"
# Every ASCII character that cannot be part of a word, to a space.
_NOT_IN_WORDS = {i: " " for i in range(128) if not (chr(i).isalnum() or chr(i) in "_'-")}


# ---------------------------------------------------------------------------------------
# Signals


@dataclass(frozen=True)
class Hit:
    name: str
    strength: float   # 0..1: how fully the signal fired
    detail: str


class _Phrases:
    """Phrases found as whole words in lower-cased text.

    Each phrase is its own pattern. A phrase that starts with plain text is tried only
    where ``_PHRASE_START`` (all such phrases of every family in one pattern, tried once
    per message) found one of them starting a word; the few without are searched for on
    their own. A phrase right after an apostrophe or hyphen ("pre-order now") counts
    only when the text also has a word starting like the phrase's first word (which is
    how these phrases were first searched for, and is kept so that scores stay put).
    """

    def __init__(self, *patterns: str | tuple[str, str]) -> None:
        self.items: list[_Phrase] = []
        for entry in patterns:
            # An entry that cannot start with a word names a character it needs instead.
            needs, pattern = entry if isinstance(entry, tuple) else (None, entry)
            m = re.match(r"[a-z]+", pattern)
            key = None
            if m is not None:
                literal = m.group()
                following = pattern[m.end():m.end() + 1]
                if following in ("?", "*", "{"):
                    literal = literal[:-1]
                if len(literal) >= 4 or (literal and following == " "):
                    key = literal[:4]
            source = pattern + r"(?![\w'’])"
            self.items.append(_Phrase(key, needs, _literal_prefix(pattern), source,
                                      re.compile(source)))
        # The phrases _PHRASE_START does not find the places of.
        self.unanchored = [p for p in self.items if len(p.literal) < 2]

    def find(self, text: _Text) -> list[str]:
        found: list[str] = []
        lower = text.lower
        starts = text.phrase_starts
        for phrase in self.items if starts else self.unanchored:
            if phrase.needs is not None and not any(c in lower for c in phrase.needs):
                continue
            matches: Iterable[re.Match[str] | None]
            if len(phrase.literal) >= 2:
                # The places it can match were found (and checked to start a word) by
                # _PHRASE_START. A phrase never contains its own first words again, so
                # these matches do not overlap, as finditer's would not.
                match = phrase.pattern.match
                matches = [match(lower, start) for start in text.starts_of(phrase.literal)]
            else:
                matches = phrase.pattern.finditer(lower)
            for m in matches:
                if m is None:
                    continue
                start = m.start()
                before = lower[start - 1:start]
                if before.isalnum() or before in ("_", "$"):
                    continue
                if phrase.key is not None and not text.starts_word(start, phrase.key):
                    continue
                found.append(" ".join(m.group().split()))
        return found


@dataclass(frozen=True)
class _Phrase:
    key: str | None        # the first letters of its first word, if it starts with one
    needs: str | None      # characters the text must hold for it to match
    literal: str           # the plain text every match starts with ("" if none)
    source: str            # the pattern, with the check that it ends a word
    pattern: re.Pattern[str]


def _phrase_branches(*families: _Phrases) -> str:
    """Every phrase with a literal start, as one alternative per first character (one
    alternative per phrase, tried at each place, would cost several times as much)."""
    by_first: dict[str, list[str]] = {}
    for phrase in _anchored(families):
        by_first.setdefault(phrase.source[0], []).append(phrase.source[1:])
    return "|".join(f"{re.escape(c)}(?:{'|'.join(rest)})" for c, rest in sorted(by_first.items()))


def _literals_by_first(*families: _Phrases) -> dict[str, tuple[str, ...]]:
    by_first: dict[str, set[str]] = {}
    for phrase in _anchored(families):
        by_first.setdefault(phrase.literal[0], set()).add(phrase.literal)
    return {c: tuple(sorted(lits)) for c, lits in by_first.items()}


def _anchored(families: Iterable[_Phrases]) -> Iterator[_Phrase]:
    """The phrases _PHRASE_START finds the places of: those with a literal start."""
    return (p for family in families for p in family.items if len(p.literal) >= 2)


class _Text:
    """Lower-cased text the phrases are looked for in, with what is learnt about it
    along the way (where phrases start, which words it has)."""

    def __init__(self, lower: str) -> None:
        self.lower = lower
        self.phrase_starts = [m.end() for m in _PHRASE_START.finditer(lower)]
        if _PHRASE_AT_START.match(lower):
            self.phrase_starts.insert(0, 0)
        self._prefixes: frozenset[str] | None = None
        self._literals: dict[str, list[int]] | None = None

    def starts_of(self, literal: str) -> list[int]:
        """The phrase starts where ``literal`` is."""
        if self._literals is None:
            self._literals = {}
            for start in self.phrase_starts:
                for lit in _LITERALS_BY_FIRST.get(self.lower[start], ()):
                    if self.lower.startswith(lit, start):
                        self._literals.setdefault(lit, []).append(start)
        return self._literals.get(literal, [])

    def starts_word(self, start: int, key: str) -> bool:
        """Whether the text has a word (``_WORD``) whose first four letters are ``key``,
        looking first at the word at ``start`` and only if need be at all of them."""
        text = self.lower
        if start == 0 or text[start - 1] not in _WORD_INNER:
            m = _WORD.match(text, start)
            if m is not None and m.group()[:4] == key:
                return True
        if self._prefixes is None:
            self._prefixes = frozenset(w[:4] for w in _WORD.findall(text))
        return key in self._prefixes


# What a word goes on with besides letters, digits and "_": a phrase right after one of
# these is inside another word.
_WORD_INNER = frozenset("'’-")
_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")


def _literal_prefix(pattern: str) -> str:
    """Text every match of ``pattern`` starts with ("" if it starts with no plain text)."""
    depth = 0
    escaped = in_class = False
    for c in pattern:  # an alternative at the top level leaves no common start
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return ""
    end = 0
    while end < len(pattern) and pattern[end] not in _REGEX_SPECIAL:
        end += 1
    if pattern[end:end + 1] in ("?", "*", "{"):
        end -= 1  # the last character is optional
    return pattern[:max(end, 0)]


def _each(words: str, rest: str) -> tuple[str, ...]:
    """One phrase per alternative first word: "buy|order", " now" -> "buy now", "order now"."""
    return tuple(w + rest for w in words.split("|"))


_CALL_TO_ACTION = _Phrases(
    r"click (?:here|below|now|on the (?:link|button)|this link)",
    *_each("buy|order|shop|book|call|subscribe|register|join|apply|download|reply|respond",
           r" (?:now|today)"),
    r"order (?:online|yours|your copy)", r"call (?:us )?toll[- ]free",
    r"sign up (?:now|today|here|for free|free)", r"visit (?:our|my) (?:web ?site|store|shop)",
    r"get (?:started|yours|it) (?:now|today)", r"get your free", r"claim your",
    r"request (?:a|your) free", r"try it (?:free|now|today)", r"add to cart", r"start saving",
    r"see (?:full )?details", r"learn more",
    # German, Turkish
    r"jetzt (?:bestellen|kaufen|anmelden|registrieren|testen)", r"hier klicken",
    r"klicken sie (?:hier|jetzt)", r"bestellen sie (?:jetzt|noch heute)",
    r"hemen (?:tıklayın|tiklayin|arayın|arayin|üye olun|sipariş verin)",
)
_TOLL_FREE = re.compile(r"\(?8(?:00|88|77|66|55|44|33)\)?[-. ]?\d{3}[-. ]\d{4}(?!\d)")
_PRICE = re.compile(
    r"(?<![\w$])(?:[$£€¥]\s?(?:\d{1,3}(?:,\d{3})+|\d{2,}|\d)(?:\.\d{2})?(?![\d$])"
    r"|\d+(?:[.,]\d{2})?\s?(?:[€£]|(?:usd|eur|gbp|dollars|euros)\b))")
_SHELL_VAR = re.compile(r"^\$\d$")
_DISCOUNT = _Phrases(
    ("%", r"\d{1,2}\s?% off"), r"save (?:up to |over )?(?:\d{1,2}\s?%|[$£€]\s?\d)", r"discounts?",
    r"special (?:offer|promotion|deal|price)s?",
    r"free (?:trial|gift|shipping|quote|sample|consultation|bonus|report|membership|offer)s?",
    r"risk[- ]free", r"no obligation", r"money[- ]back guarantee", r"satisfaction guaranteed",
    *_each("lowest|best|wholesale", r" prices?"), r"coupons?", r"promo(?:tion(?:al)?)? code",
    ("%", r"100\s?% free"), r"absolutely free", r"at no (?:cost|charge)",
    r"no (?:cost|charge) to you",
    r"half price", r"bargains?", r"clearance",
    # German, Turkish
    r"kostenlose?[mnrs]?", r"sonderangebote?", r"rabatte?", r"zum (?:halben|vorzugs)preis",
    r"ücretsiz", r"indirim(?:li)?", r"kampanya(?:sı|si)?",
)
_URGENCY = _Phrases(
    r"limited[- ]time", r"act (?:now|today|fast)", r"today only", r"offer (?:expires|ends)",
    r"expires? (?:soon|today|tomorrow)", ("'", r"don't (?:delay|wait|miss (?:out|this))"),
    r"dont (?:delay|wait|miss (?:out|this))",
    r"do not (?:delay|wait|miss (?:out|this))", r"hurry (?:now|up)",
    r"while (?:supplies|stocks?) last", r"last chance",
    r"urgent (?:reply|response|attention|assistance|business)", r"before it'?s too late",
    r"final notice", r"time is running out", r"ends (?:today|tonight|soon|at midnight)",
    r"once in a lifetime", r"now or never", r"only \d+ (?:left|remaining|spots?|days? left)",
    r"for a limited",
    # German, Turkish
    r"nur (?:noch )?heute", r"solange (?:der )?vorrat reicht", r"nur für kurze zeit",
    r"son (?:fırsat|firsat|gün|gun)", r"kaçırmayın", r"kacirmayin",
)
_MONEY = _Phrases(
    r"make (?:big |extra |real )?money", r"earn (?:up to |over |an extra )?[$£€]\s?\d",
    r"extra (?:income|cash)", r"work (?:from|at) home", r"home[- ]based business",
    r"financial (?:freedom|independence)", r"be your own boss",
    *_each("millions?|thousands", r" of dollars"),
    ("$£€", r"[$£€]\s?\d[\d,]* (?:per|a|every) (?:day|week|month)"), r"cash (?:bonus|prize|back)",
    *_each("pay off|eliminate|consolidate|reduce", r" (?:all )?(?:your )?(?:credit card )?debts?"),
    r"mortgage (?:rates?|loans?)", r"refinanc(?:e|ing)",
    *_each("low|lower|lowest", r" interest rates?"), *_each("personal|home|business", r" loans?"),
    r"investment opportunit(?:y|ies)", *_each("business|investment", r" proposal"),
    r"next of kin", r"wire transfer", r"you won", r"you(?:'ve| have) won", r"lottery", r"casino",
    r"stock (?:pick|alert|tip)s?", *_each("life|health", r" insurance"),
    r"credit (?:rating|score|repair)", r"bad credit", r"get paid",
    # German, Turkish
    r"geld verdienen", r"nebenverdienst", r"zusatzeinkommen", r"para kazan(?:ın|in|mak)",
)
_OPT_OUT = _Phrases(
    r"to be removed", r"remove (?:me )?(?:from|in) the subject", r"reply with (?:the word )?remove",
    *_each("click|go|reply", r" (?:here )?to (?:unsubscribe|be removed|opt[- ]?out)"),
    r"to opt[- ]?out", r"you (?:can|may) opt[- ]?out",
    r"you (?:are )?receiv(?:ed|ing) this (?:e-?mail|message|newsletter)",
    r"this (?:e-?mail|message) (?:was|is being) sent to",
    r"you (?:no longer )?wish to (?:be removed|unsubscribe|no longer receive)",
    r"you (?:do not|don'?t) wish to receive", r"do not want to receive",
    ("'", r"don't want to receive"), r"dont want to receive",
    r"you (?:have )?(?:opted[- ]in|signed up|registered) (?:to|for|with|at)",
    *_each("manage|update|change", r" your (?:e-?mail |subscription )?preferences"),
    r"removed? from (?:our|this|the) (?:mailing |e-?mail )?(?:list|database)",
    r"unsubscribe (?:here|link|instructions|at any time)",
    # German, Turkish
    r"kein interesse mehr", r"(?:trage|tragen) (?:dich|sie sich) (?:bitte )?(?:hier )?aus",
    r"newsletter abbestellen", r"listeden (?:çıkmak|cikmak|çıkarılmak|cikarilmak)",
)
_NOT_SPAM = _Phrases(
    *_each("this|it", r" is not (?:a )?spam"), r"not (?:an? )?unsolicited", r"sent in compliance",
    r"in (?:full )?compliance with", ("-", r"can-spam"),
    ("-", r"one-time (?:mailing|e-?mail|message|offer)"),
    r"one time (?:mailing|e-?mail|message|offer)",
    r"you will not receive (?:any )?(?:further|more)", r"under (?:federal )?(?:bill|law) ",
    r"this is a (?:legal|legitimate) (?:offer|business)",
    # German
    r"keine werbung", r"dies ist keine spam",
)
# Where a phrase with a literal start may match as a whole word: searched for once per
# message, these find the character before such a place (a character that is not part
# of a word: the regex engine skips along to those quickly), and the start of the text.
_PHRASE_BRANCHES = _phrase_branches(_CALL_TO_ACTION, _DISCOUNT, _URGENCY, _MONEY, _OPT_OUT,
                                    _NOT_SPAM)
_PHRASE_START = re.compile(rf"[^\w$](?=(?:{_PHRASE_BRANCHES}))")
_PHRASE_AT_START = re.compile(_PHRASE_BRANCHES)
_LITERALS_BY_FIRST = _literals_by_first(_CALL_TO_ACTION, _DISCOUNT, _URGENCY, _MONEY, _OPT_OUT,
                                        _NOT_SPAM)

_HREF = re.compile(r"""<a\b[^>]*?\bhref\s*=\s*["']?([^"'\s>]+)[^>]*>(.{0,300}?)</a\s*>""",
                   re.I | re.S)
_IMG = re.compile(r"<img\b[^>]{0,2000}>", re.I)
_ATTR_WH = re.compile(r"""\b(width|height)\s*[=:]\s*["']?\s*(\d+)""", re.I)
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
_HIDDEN_TEXT = re.compile(
    r"""<(?:font|span|div|p|td)\b[^>]*?(?:"""
    r"""\bcolor\s*[=:]\s*["']?\s*(?:#?fff(?:fff)?\b|white\b)"""
    r"""|display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*[01](?:\.\d+)?\s*(?:px|pt)?\b"""
    r""")[^>]*>\s*([^<\s][^<]{2,})""",
    re.I)
_BACKGROUND = re.compile(r"\bbg-?color\b|\bbackground(?:-color)?\s*[=:]", re.I)
_IP_HOST = re.compile(r"^(?:\d{1,3}\.){3}\d{1,3}$|^\d{8,10}$|^0x[0-9a-f]+$", re.I)
# A web address shown as a link's text (what the reader believes they will visit).
_ADDRESS_IN_TEXT = re.compile(r"https?://([a-z0-9.-]+\.[a-z]{2,})|\b(www\.[a-z0-9.-]+\.[a-z]{2,})",
                              re.I)
_QUOTE_LINE = re.compile(r"^[ \t]*(?:>|\|[ \t])", re.M)
# The same after a line break: starting with a literal "\n", it is found much faster.
_QUOTE_AFTER_BREAK = re.compile(r"\n[ \t]*(?:>|\|[ \t])")
_ATTRIBUTION = re.compile(r"^.{0,120}\b(?:wrote|writes|said):[ \t]*$", re.M | re.I)
_RECIPIENTS_HIDDEN = re.compile(r"undisclosed|recipient list suppressed|^\s*:;\s*$", re.I)

URL_SHORTENERS = frozenset({
    "bit.ly", "bitly.com", "tinyurl.com", "goo.gl", "t.co", "ow.ly", "is.gd", "buff.ly",
    "rebrand.ly", "cutt.ly", "tiny.cc", "shorturl.at", "t.ly", "rb.gy", "bl.ink", "s.id",
    "v.gd", "lnkd.in", "trib.al", "soo.gd", "clck.ru", "qr.net", "x.co", "snip.ly",
})
_BULK_MAILERS = re.compile(
    r"group ?mail|mail ?king|mass ?(?:mail|send)|bulk|quick ?sender|easy ?dm|atlas ?mailer"
    r"|mach ?5|worldmerge|gammadyne|atomic ?mail|send-?safe|dynamic ?mail|express ?mail ?sender"
    r"|super ?mail ?sender|e-?mail ?blaster|getresponse|mailchimp|constant ?contact|sendinblue"
    r"|brevo|mailjet|campaign ?monitor|aweber|icontact|klaviyo|hubspot|marketo|exacttarget"
    r"|sendgrid|mailerlite|newsletter",
    re.I)
# Header fields newsletter services add to every campaign.
_ESP_FIELDS = frozenset({"x-mc-user", "x-sg-eid", "x-roving-id", "x-csa-complaints",
                         "x-mailgun-tag", "x-sib-id", "x-mailjet-campaign"})


def signals(raw: bytes, *, model: Model | None = None) -> tuple[Signal, ...]:
    """The signals that fire on a message, weighted by ``model``'s weights (or the priors)."""
    weights = model.weights if model is not None else Weights.prior()
    return _weigh(_detect(_read(raw)), weights)


def _weigh(hits: Iterable[Hit], weights: Weights) -> tuple[Signal, ...]:
    fired = [Signal(hit.name, round(weights.of(hit.name) * hit.strength, 3), hit.detail)
             for hit in hits]
    return tuple(sorted((s for s in fired if s.weight != 0.0),
                        key=lambda s: (-s.weight, s.name)))


def _quoted(items: Iterable[str]) -> str:
    seen = list(dict.fromkeys(i.lower() for i in items))
    shown = ", ".join(f'"{i}"' for i in seen[:MAX_DETAIL_ITEMS])
    return shown + (f" and {len(seen) - MAX_DETAIL_ITEMS} more" if len(seen) > MAX_DETAIL_ITEMS
                    else "")


def _phrase_hit(name: str, label: str, phrases: _Phrases, text: _Text,
                cjk: dict[str, list[str]], extra: Iterable[str] = ()) -> Hit | None:
    """The hit of a phrase family: its phrases in ``text``, ``extra`` finds, and its
    Japanese and Chinese phrases (``cjk``, by signal name)."""
    found = phrases.find(text)
    found.extend(extra)
    found.extend(cjk.get(name, ()))
    distinct = {f.lower() for f in found}
    if not distinct:
        return None
    return Hit(name, min(len(distinct), 2) / 2, f"{label}: {_quoted(found)}")


def _detect(mail: _Mail) -> list[Hit]:
    text = mail.subject + "\n" + mail.text
    if mail.has_plain and mail.has_html:
        text += "\n" + mail.html_text
    text = text[:MAX_TEXT_CHARS].lower()
    words = len(mail.text[:MAX_TEXT_CHARS].split())
    scanned = _Text(text)
    cjk = _cjk_phrases(text)
    hits: list[Hit | None] = [
        _phrase_hit("call-to-action", "calls to action", _CALL_TO_ACTION, scanned, cjk,
                    _toll_free(text)),
        _price(text),
        _phrase_hit("discount", "offers", _DISCOUNT, scanned, cjk),
        _phrase_hit("urgency", "urgency", _URGENCY, scanned, cjk),
        _phrase_hit("money", "money talk", _MONEY, scanned, cjk),
        _phrase_hit("unsubscribe-footer", "opt-out footer", _OPT_OUT, scanned, cjk),
        _phrase_hit("not-spam-claim", "claims", _NOT_SPAM, scanned, cjk),
        *_links(mail, words),
        *_images(mail, words),
        _hidden_text(mail),
        _bulk_mailer(mail),
        _html_only(mail),
        _shouting_subject(mail.subject),
        _undisclosed(mail),
        _reply(mail),
        _quotes(mail),
    ]
    return [hit for hit in hits if hit is not None]


# Japanese and Chinese phrases of the same families. These scripts put no spaces
# between words, so they are found anywhere, not as whole words: only phrases that
# mean the same wherever they stand. 未承諾広告 ("unsolicited advertisement") is the
# label Japanese law requires on the subject of unsolicited advertising mail.
_CJK_FAMILIES = {
    "call-to-action": ("今すぐ", "今直ぐ", "お申し込み", "お申込み", "立即訂購", "立即订购",
                       "立即購買", "立即购买", "點擊這裡", "点击这里"),
    "discount": ("無料", "免費", "免费", "割引", "特価", "優惠", "优惠", "折扣", "特價", "特价"),
    "urgency": ("期間限定", "限時", "限时", "先着", "今だけ"),
    "money": ("副収入", "在宅ワーク", "賺錢", "赚钱", "網路賺", "网络赚"),
    "unsubscribe-footer": ("配信停止", "配信を停止", "退訂", "取消訂閱", "取消订阅"),
    "not-spam-claim": ("未承諾広告",),
}
_CJK_PHRASE = re.compile("|".join(sorted((p for ps in _CJK_FAMILIES.values() for p in ps),
                                         key=len, reverse=True)))
_CJK_FAMILY_OF = {p: family for family, ps in _CJK_FAMILIES.items() for p in ps}


def _cjk_phrases(text: str) -> dict[str, list[str]]:
    """The Japanese and Chinese phrases in ``text``, by family (none without such text)."""
    found: dict[str, list[str]] = {}
    if _CJK.search(text) is None:
        return found
    for m in _CJK_PHRASE.finditer(text):
        found.setdefault(_CJK_FAMILY_OF[m.group()], []).append(m.group())
    return found


def _toll_free(text: str) -> list[str]:
    # A toll-free number starts "8xx" or "(8xx": found with str.find, and only there
    # is the pattern tried (trying it at every digit costs far more on numeric text).
    starts = _occurrences(text, _TOLL_FREE_CODES)
    starts = sorted({*starts, *(i - 1 for i in starts if text[i - 1:i] == "(")})
    return [f"toll-free {m.group()}" for m in _matches_from(_TOLL_FREE, text, starts)
            if not text[m.start() - 1:m.start()].isdigit()][:MAX_DETAIL_ITEMS]


_TOLL_FREE_CODES = ("800", "888", "877", "866", "855", "844", "833")
_CURRENCY_HINTS = ("$", "£", "€", "¥", "usd", "eur", "gbp", "dollars")
_CURRENCY_SIGNS = ("$", "£", "€", "¥")
_CURRENCY_AFTER = ("€", "£", "usd", "eur", "gbp", "dollars")  # "eur" finds "euros" too


def _price(text: str) -> Hit | None:
    if not any(c in text for c in _CURRENCY_HINTS):
        return None
    found = [" ".join(m.group().split())
             for m in _matches_from(_PRICE, text, _price_starts(text))]
    found = [f for f in found if not _SHELL_VAR.match(f)]
    distinct = {f.lower() for f in found}
    if not distinct:
        return None
    return Hit("price", min(len(distinct), 3) / 3, f"prices: {_quoted(found)}")


def _price_starts(text: str) -> list[int]:
    """Every place a _PRICE match can start: at a currency sign, or at the start of the
    number before a currency sign or name ("49.95 €", "20 dollars")."""
    starts = set(_occurrences(text, _CURRENCY_SIGNS))
    for end in _occurrences(text, _CURRENCY_AFTER):
        if text[end - 1:end].isspace():
            end -= 1  # the one space _PRICE allows between
        if text[end - 1:end].isdecimal():
            starts.add(_digits_from(text, end))  # "20 dollars", and "95 €" of "49.95 €"
            if end >= 4 and text[end - 3] in ".," and text[end - 2].isdecimal() \
                    and text[end - 4].isdecimal():
                starts.add(_digits_from(text, end - 3))  # "49.95 €"
    return sorted(starts)


def _digits_from(text: str, end: int) -> int:
    """Where the run of digits that ends at ``end`` starts (str.isdecimal() is \\d)."""
    start = end
    while start > 0 and text[start - 1].isdecimal():
        start -= 1
    return start


def _occurrences(text: str, needles: Iterable[str]) -> list[int]:
    """Where any of ``needles`` occurs in ``text`` (str.find: far faster than a regex)."""
    found: list[int] = []
    for needle in needles:
        i = text.find(needle)
        while i >= 0:
            found.append(i)
            i = text.find(needle, i + 1)
    return sorted(found)


def _matches_from(pattern: re.Pattern[str], text: str,
                  starts: Iterable[int]) -> Iterator[re.Match[str]]:
    """What ``pattern.finditer(text)`` finds, given (in order) every place where one of
    its matches can start: the pattern is tried there only, not at every position."""
    end = 0
    for start in starts:
        if start >= end and (m := pattern.match(text, start)) is not None:
            yield m
            end = max(m.end(), start + 1)


def _host(url: str) -> str:
    if url.lower().startswith("www."):
        url = "http://" + url
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return ""
    return netloc.rpartition("@")[2].partition(":")[0].lower().strip(".")


def _site(host: str) -> str:
    """The registrable part of a host name, approximately (the last two labels)."""
    labels = host.split(".")
    return ".".join(labels[-3:] if len(labels) > 2 and len(labels[-1]) == 2
                    and len(labels[-2]) <= 3 else labels[-2:])


def _links(mail: _Mail, words: int) -> list[Hit]:
    urls = [u.rstrip(".,;:!?") for u in mail.text_urls()]
    anchors = [(m.group(1), html_to_text(m.group(2))) for m in _HREF.finditer(mail.html)]
    urls.extend(u for u, _text in anchors if not u.lower().startswith(("mailto:", "#")))
    distinct = list(dict.fromkeys(urls))
    hits: list[Hit] = []
    n = len(distinct)
    if n >= 3 and (words < 25 * n or n >= 10):
        hits.append(Hit("link-density", 1.0 if n >= 6 else 0.5,
                         f"{n} links in {words} words of text"))
    hosts = [_host(u) for u in distinct]
    short = sorted({x for x in hosts if x in URL_SHORTENERS})
    if short:
        hits.append(Hit("url-shortener", 1.0, f"links through {_quoted(short)}"))
    obscured: list[str] = []
    for url, host in zip(distinct, hosts, strict=True):
        authority = url.split("//", 1)[-1].split("/", 1)[0]
        if _IP_HOST.match(host):
            obscured.append(f"to a bare address {host}")
        elif "@" in authority:
            obscured.append(f"to a disguised address {authority[:60]}")
        elif "%" in host:
            obscured.append(f"to an encoded host name {host[:60]}")
    for url, shown in anchors:
        target = _host(url)
        m = _ADDRESS_IN_TEXT.search(shown)
        seen = (m.group(1) or m.group(2)).lower() if m else ""
        if target and seen and _site(seen) != _site(target):
            obscured.append(f"showing {seen} but going to {target}")
    if obscured:
        shown = "; ".join(dict.fromkeys(obscured[:MAX_DETAIL_ITEMS]))
        hits.append(Hit("obscured-link", 1.0, f"links that hide where they go: {shown}"))
    return hits


def _images(mail: _Mail, words: int) -> list[Hit]:
    pixels = 0
    # With HTML, the images a reader sees are its <img> tags (inline parts are referenced
    # from them); without, any image part is what the message shows.
    images = 0 if mail.html else mail.image_parts
    for m in _IMG.finditer(mail.html):
        tag = m.group()
        sizes = {k.lower(): int(v) for k, v in _ATTR_WH.findall(tag) if len(v) < 6}
        if (sizes and all(v <= 1 for v in sizes.values())) or _HIDDEN_STYLE.search(tag):
            pixels += 1
        else:
            images += 1
    hits: list[Hit] = []
    if pixels:
        hits.append(Hit("tracking-pixel", 1.0,
                         f"{pixels} invisible image{'s' if pixels > 1 else ''} (1x1 or hidden)"))
    if images and (words < 30 or (images >= 3 and words < 60 * images)):
        hits.append(Hit("image-density", 1.0,
                         f"{images} image{'s' if images > 1 else ''} and {words} words of text"))
    return hits


def _hidden_text(mail: _Mail) -> Hit | None:
    if not mail.html:
        return None
    if mail.html.isascii():
        # Every match has one of these words (and lower-casing ASCII is what re.I does).
        lower = mail.html.lower()
        if not any(w in lower for w in ("fff", "white", "display", "visibility", "font-size")):
            return None
    m = _HIDDEN_TEXT.search(mail.html)
    if m is None:
        return None
    tag = m.group().lower()
    if "color" in tag and not _HIDDEN_STYLE.search(tag) and "font-size" not in tag \
            and _BACKGROUND.search(mail.html):
        # White text on a page that sets its own background may well be readable.
        return None
    sample = " ".join(m.group(1).split())[:40]
    return Hit("hidden-text", 1.0, f'invisible text: "{sample}"')


def _bulk_mailer(mail: _Mail) -> Hit | None:
    found: list[str] = []
    for name in ("x-mailer", "user-agent", "x-mailer-version"):
        value = mail.get(name)
        if value and _BULK_MAILERS.search(value):
            found.append(f"{name}: {value.strip()[:60]}")
    names = mail.names
    esp = sorted(n for n in names if n in _ESP_FIELDS or "campaign" in n)
    found.extend(esp)
    # A discussion list names its post address; a newsletter only its unsubscribe link.
    is_list = bool(names & {"list-post", "mailing-list", "x-mailing-list"})
    if "list-unsubscribe" in names and not is_list:
        found.append("list-unsubscribe without a discussion list")
    if not found:
        return None
    return Hit("bulk-mailer", 1.0, f"bulk-mail headers: {_quoted(found)}")


def _html_only(mail: _Mail) -> Hit | None:
    if mail.has_html and not mail.has_plain and mail.html_text.strip():
        return Hit("html-only", 1.0, "HTML with no plain-text version")
    return None


_SHOUTING = re.compile(r"!{3,}|\${2,}|!.*!.*!")


def _shouting_subject(subject: str) -> Hit | None:
    bare = _SUBJECT_TAG.sub("", subject)
    letters = [c for c in bare if c.isalpha()]
    upper = sum(1 for c in letters if c.isupper())
    reasons: list[str] = []
    if len(letters) >= 10 and upper / len(letters) >= 0.7:
        reasons.append("in capitals")
    if _SHOUTING.search(bare):
        reasons.append("with !!! or $$$")
    if not reasons:
        return None
    return Hit("shouting-subject", 1.0,
                f'subject {" and ".join(reasons)}: "{" ".join(bare.split())[:80]}"')


def _undisclosed(mail: _Mail) -> Hit | None:
    to = mail.get("to")
    if to is None or not to.strip():
        return Hit("undisclosed-recipients", 1.0, "no To: header (the list was blind-copied)")
    if _RECIPIENTS_HIDDEN.search(_decoded(to[:2000])):
        return Hit("undisclosed-recipients", 1.0, f"To: {to.strip()[:60]}")
    return None


def _reply(mail: _Mail) -> Hit | None:
    if mail.get("in-reply-to") or mail.get("references"):
        return Hit("reply", 1.0, "replies to an earlier message (In-Reply-To/References)")
    return None


def _quotes(mail: _Mail) -> Hit | None:
    quoted = len(_QUOTE_AFTER_BREAK.findall(mail.plain))
    quoted += _QUOTE_LINE.match(mail.plain) is not None  # the first line
    if quoted >= 2 or (quoted and _ATTRIBUTION.search(mail.plain)):
        return Hit("quotes-earlier-post", 1.0, f"{quoted} quoted line{'s' if quoted > 1 else ''}")
    return None


# ---------------------------------------------------------------------------------------
# The learned model


class Model:
    """Word counts from promotional and ham messages (each word once per message).

    ``learn()`` adds one moderator decision; ``merged()`` adds a list's own counts to the
    shipped base. The model also carries the weights that combine it with the signals and
    the decision thresholds, chosen by cross-validation when it was trained: ``threshold``
    for mail whose words it knows, and ``floor`` (never lower) for mail whose words it does
    not; by default the floor is MIN_EVIDENCE beyond the prior.
    """

    def __init__(self, *, promotional: int = 0, ham: int = 0,
                 counts: dict[str, tuple[int, int]] | None = None,
                 weights: Weights | None = None, threshold: float = DEFAULT_THRESHOLD,
                 floor: float | None = None) -> None:
        self.promotional = promotional
        self.ham = ham
        self._counts: dict[str, list[int]] = {t: [p, q] for t, (p, q) in (counts or {}).items()}
        self.weights = weights or Weights.prior()
        self.threshold = threshold
        self.floor = max(threshold, evidence_floor(self.weights.bias) if floor is None else floor)
        # The words strong enough to be clues, worked out on first use (see _clue_table).
        self._table: dict[str, _Clue | tuple[()]] = {}
        self._table_for: tuple[int, int] | None = None

    @classmethod
    def empty(cls) -> Model:
        return cls()

    def __len__(self) -> int:
        return len(self._counts)

    def counts(self, token: str) -> tuple[int, int]:
        """(promotional, ham) messages that contained ``token``."""
        c = self._counts.get(token)
        return (c[0], c[1]) if c else (0, 0)

    def learn(self, tokens: Iterable[str], promotional: bool) -> None:
        index = 0 if promotional else 1
        for token in set(tokens):
            self._counts.setdefault(token, [0, 0])[index] += 1
        if promotional:
            self.promotional += 1
        else:
            self.ham += 1
        self._table_for = None

    def _prob(self, token: str) -> float | None:
        c = self._counts.get(token)
        if c is None:
            return None
        p_ratio = c[0] / self.promotional if self.promotional else 0.0
        h_ratio = c[1] / self.ham if self.ham else 0.0
        if p_ratio + h_ratio == 0.0:
            return None
        p = p_ratio / (p_ratio + h_ratio)
        n = c[0] + c[1]
        return (_PRIOR_STRENGTH * _PRIOR_PROB + n * p) / (_PRIOR_STRENGTH + n)

    def _clue_table(self) -> dict[str, _Clue | tuple[()]]:
        """Every word the model knows: a clue if it is strong enough to be one, with
        what _combine_clues() needs of it, else ``()``. Worked out once per model
        instead of once per message and word."""
        if self._table_for != (self.promotional, self.ham):
            table: dict[str, _Clue | tuple[()]] = {}
            for token in self._counts:
                f = self._prob(token)
                if f is not None and abs(f - 0.5) >= _MIN_STRENGTH:
                    table[token] = (-abs(f - 0.5), token, f, math.log(max(f, 1e-300)),
                                    math.log(max(1.0 - f, 1e-300)))
                else:
                    table[token] = ()
            self._table, self._table_for = table, (self.promotional, self.ham)
        return self._table

    def _clues(self, words: set[str]) -> tuple[list[_Clue], int]:
        """The strongest clues among ``words``, strongest first (ties by word), and how
        many of the words the model knows."""
        found = list(map(self._clue_table().get, words))
        known = len(found) - found.count(None)
        clues: list[_Clue] = list(filter(None, found))  # type: ignore[arg-type]
        clues.sort()
        return clues[:_MAX_CLUES], known

    def probability(self, tokens: Iterable[str]) -> float:
        """How promotional the words are, 0..1 (0.5: the model cannot tell)."""
        return _combine_clues(self._clues(set(tokens))[0])

    def threshold_for(self, verdict: Verdict) -> float:
        """The decision threshold for a message the model gave ``verdict``."""
        return self.threshold if verdict.familiar else self.floor

    def judge(self, tokens: Iterable[str], n: int = 5) -> Verdict:
        """The probability, how much of the message the model knows, and its clues."""
        words = set(tokens)
        clues, known = self._clues(words)
        prob = _combine_clues(clues)
        coverage = known / len(words) if words else 0.0
        strong = sorted((-c[2], c[1]) for c in clues if c[2] > 0.5)
        return Verdict(prob, coverage, tuple(t for _f, t in strong[:n]), known)

    def merged(self, other: Model) -> Model:
        """This model's counts plus ``other``'s, with this model's weights and thresholds."""
        counts = {t: (c[0], c[1]) for t, c in self._counts.items()}
        for token, (p, q) in other._counts.items():
            a, b = counts.get(token, (0, 0))
            counts[token] = (a + p, b + q)
        return Model(promotional=self.promotional + other.promotional,
                     ham=self.ham + other.ham, counts=counts,
                     weights=self.weights, threshold=self.threshold, floor=self.floor)

    def pruned(self, min_messages: int) -> Model:
        """Without the words seen in fewer than ``min_messages`` messages (to ship small)."""
        counts = {t: (c[0], c[1]) for t, c in self._counts.items()
                  if c[0] + c[1] >= min_messages}
        return Model(promotional=self.promotional, ham=self.ham, counts=counts,
                     weights=self.weights, threshold=self.threshold, floor=self.floor)

    def with_weights(self, weights: Weights, threshold: float,
                     floor: float | None = None) -> Model:
        counts = {t: (c[0], c[1]) for t, c in self._counts.items()}
        return Model(promotional=self.promotional, ham=self.ham, counts=counts,
                     weights=weights, threshold=threshold, floor=floor)

    def to_json(self) -> str:
        doc = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "threshold": self.threshold,
            "floor": self.floor,
            "weights": {"bias": self.weights.bias, "model": self.weights.model,
                        "signals": dict(self.weights.signals)},
            "messages": {"promotional": self.promotional, "ham": self.ham},
            "tokens": {t: c for t, c in sorted(self._counts.items())},
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Model:
        try:
            doc = json.loads(text)
            if doc.get("format") != MODEL_FORMAT or doc.get("version") != MODEL_VERSION:
                raise ConfigError(f"not a {MODEL_FORMAT} version {MODEL_VERSION} document")
            w = doc["weights"]
            weights = Weights(
                bias=float(w["bias"]), model=float(w["model"]),
                signals=tuple((str(n), float(v)) for n, v in w["signals"].items()
                              if n in _SPECS))
            counts: dict[str, tuple[int, int]] = {}
            for token, (p, q) in doc["tokens"].items():
                if not (isinstance(p, int) and isinstance(q, int) and p >= 0 and q >= 0):
                    raise ConfigError(f"bad counts for {token!r}")
                counts[str(token)] = (p, q)
            messages = doc["messages"]
            promotional, ham = int(messages["promotional"]), int(messages["ham"])
            threshold = float(doc["threshold"])
            # Absent from models written before there were two: MIN_EVIDENCE beyond the prior.
            floor = None if doc.get("floor") is None else float(doc["floor"])
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"invalid promotional model: {exc}") from exc
        if not 0.0 < threshold < 1.0 or promotional < 0 or ham < 0 \
                or (floor is not None and not 0.0 < floor < 1.0):
            raise ConfigError("invalid promotional model: threshold, floor or message counts")
        return cls(promotional=promotional, ham=ham, counts=counts, weights=weights,
                   threshold=threshold, floor=floor)


@dataclass(frozen=True)
class Verdict:
    """What the word model says about one message."""

    probability: float        # 0..1 (0.5: cannot tell)
    coverage: float           # the share of the message's words the model has seen
    clues: tuple[str, ...]    # the words that most made it lean promotional
    known: int = 0            # how many of the words the model has seen

    @property
    def evidence(self) -> float:
        """Its say in the combined score, in log-odds: the probability's log-odds, scaled
        down when the model knows less than FULL_COVERAGE of the words. A few known words
        are weak evidence however one-sided their counts (a post in a language the base
        model saw only in spam must not be held for its "und" and "das")."""
        return logit(self.probability) * min(1.0, self.coverage / FULL_COVERAGE)

    @property
    def familiar(self) -> bool:
        """Whether the model knows enough of the words to judge them: FULL_COVERAGE of
        them (its full say), and no fewer than MIN_KNOWN_WORDS."""
        return self.coverage >= FULL_COVERAGE and self.known >= MIN_KNOWN_WORDS


def evidence_floor(bias: float, min_evidence: float = MIN_EVIDENCE) -> float:
    """The lowest threshold at which a message is held only on more than ``min_evidence``
    log-odds beyond the prior ``bias``."""
    return round(min(sigmoid(bias + min_evidence) + 1e-4, 0.9999), 4)


# A clue: (sort key, word, probability, log(probability), log(1 - probability)). Sorting
# clues sorts them strongest first, ties by word.
_Clue = tuple[float, str, float, float, float]


def _combine_clues(clues: list[_Clue]) -> float:
    """Robinson's chi-squared combining of the clues' probabilities (as SpamBayes does),
    from their logs worked out beforehand (see Model._clue_table)."""
    if not clues:
        return 0.5
    ham_log = sum(map(itemgetter(3), clues))
    promo_log = sum(map(itemgetter(4), clues))
    return _combine_logs(len(clues), ham_log, promo_log)


def _combine_logs(n: int, ham_log: float, promo_log: float) -> float:
    promo = 1.0 - _chi2q(-2.0 * promo_log, 2 * n)
    ham = 1.0 - _chi2q(-2.0 * ham_log, 2 * n)
    return (promo - ham + 1.0) / 2.0


def _chi2q(x2: float, v: int) -> float:
    """P(chi-squared with v degrees of freedom >= x2), v even."""
    m = x2 / 2.0
    term = total = math.exp(-m)
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def logit(p: float) -> float:
    """Log-odds of a probability, clipped so that no single part can be infinitely sure."""
    p = min(max(p, _MODEL_CLIP), 1.0 - _MODEL_CLIP)
    return math.log(p / (1.0 - p))


def sigmoid(z: float) -> float:
    """The probability of log-odds ``z``."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


# ---------------------------------------------------------------------------------------
# Scoring


@dataclass(frozen=True)
class Features:
    """A message reduced to what scoring uses: its words and the signals that fired.

    Training and evaluation read each message once and score it many times from these.
    """

    tokens: tuple[str, ...]
    hits: tuple[Hit, ...]

    def strengths(self) -> dict[str, float]:
        return {hit.name: hit.strength for hit in self.hits}


def features(raw: bytes) -> Features:
    mail = _read(raw)
    return Features(tuple(_tokens(mail)), tuple(_detect(mail)))


def score(raw: bytes, model: Model, *, threshold_hint: float | None = None) -> PromoScore:
    """How likely ``raw`` is promotional, and why.

    ``threshold_hint`` replaces the model's decision thresholds (a list's policy may be
    stricter or more lenient); it only sets ``PromoScore.threshold``.
    """
    return score_features(features(raw), model, threshold_hint=threshold_hint)


def score_features(feats: Features, model: Model, *,
                   threshold_hint: float | None = None) -> PromoScore:
    verdict = model.judge(feats.tokens)
    fired = _weigh(feats.hits, model.weights)
    z = model.weights.bias + model.weights.model * verdict.evidence
    z += sum(s.weight for s in fired)
    threshold = model.threshold_for(verdict) if threshold_hint is None else threshold_hint
    return PromoScore(probability=sigmoid(z), signals=fired,
                      model_probability=verdict.probability, threshold=threshold,
                      model_clues=verdict.clues)


def load_model(path: str | PathLike[str] = DEFAULT_MODEL_PATH) -> Model:
    """Read a model file written by ``Model.to_json()`` (bench/promo_train.py makes one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read the promotional model {path}: {exc}") from exc
    return Model.from_json(text)
