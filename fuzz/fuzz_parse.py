"""Fuzz target: the parsers that read what strangers send, fed arbitrary bytes by atheris.

    python fuzz/fuzz_parse.py [libFuzzer options] [corpus folders...]

for example, seeded from the shared mail corpus (new inputs go to the first folder):

    python fuzz/fuzz_parse.py -max_total_time=60 /tmp/found ../shared/corpus/odd \
        ../shared/corpus/bounces

Each input goes through every parser: splitting and parsing a message, its header
facts, bounce (DSN) reading, the -request command parser and the reply-command reader,
and, as text, the address checks and the route table. A finding is any exception a
function does not promise: all of them read any bytes without raising, except the
address checks, which raise AddressError and only that. parse_bounce() catches
everything itself and logs it, so an error it logs counts as a finding too.
"""

from __future__ import annotations

import logging
import sys

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

with atheris.instrument_imports(include=["gateway"]):
    from gateway import addresses, dsn, facts, holds, message, replytext, selfservice
    from gateway.errors import AddressError
    from gateway.routing import Hit, ListRef, Miss, Router

_LISTS = {(ref.name, ref.domain): ref for ref in (
    ListRef(1, "discuss", "example.org"),
    ListRef(2, "python-dev", "example.org"),
    ListRef(3, "python", "example.org"),
    ListRef(4, "discuss", "xn--bcher-kva.example"),
)}
_ROUTER = Router(lambda name, domain: _LISTS.get((name, domain)),
                 serves_domain=lambda domain: domain in {d for _n, d in _LISTS})
_VERBS = frozenset(holds.MODERATOR_VERBS | {holds.Verb.WITHDRAW.value})


class _Findings(logging.Handler):
    """Turns an error a parser logged (having caught it) into a crash the fuzzer sees."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_FINDINGS = _Findings()
logging.getLogger("gateway").addHandler(_FINDINGS)
logging.getLogger("gateway").propagate = False  # libFuzzer's output stays readable
logging.getLogger("flufl").addHandler(logging.NullHandler())  # it logs what it catches
logging.getLogger("flufl").propagate = False


# Findings already reported whose fix waits in a module this harness does not own:
# (exception type, the function it escapes from). Each is pinned by an xfail(strict)
# test in tests/test_fuzz.py, which starts to fail once the fix lands: then delete its
# entry here, so that the fuzzer guards it again.
KNOWN_FINDINGS: tuple[tuple[type[BaseException], str], ...] = (
    # None open: what it found is fixed and kept as regression tests in tests/test_fuzz.py.
)


def known_finding(exc: BaseException) -> bool:
    names = set()
    tb = exc.__traceback__
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return any(isinstance(exc, kind) and where in names for kind, where in KNOWN_FINDINGS)


def test_one_input(data: bytes) -> None:
    _FINDINGS.records.clear()

    parts = message.split(data)
    parts.to_bytes()
    for f in parts.fields[:50]:
        message.decode_header(f.value)
    try:
        message_facts = facts.message_facts(data, parts)
    except (UnicodeEncodeError, ValueError) as exc:
        if not known_finding(exc):
            raise
    else:
        envelope = facts.Envelope("a@example.net", "discuss@example.org")
        facts.why_not_notify(message_facts, envelope)

    report = dsn.parse_bounce(data)
    assert isinstance(report, dsn.BounceReport)

    # The command readers parse with the stdlib, which raises on a few malformed
    # messages (the corpus README says so); a RecursionError is the one it may raise
    # on deep MIME nesting, which the stage's retry-and-park handles.
    try:
        selfservice.commands_in(data)
        replytext.find_command(data, _VERBS)
    except RecursionError:
        pass
    except (UnicodeEncodeError, ValueError, AttributeError) as exc:
        if not known_finding(exc):
            raise

    text = data.decode("utf-8", "surrogateescape")
    for line in [text, *text.splitlines()[:20]]:
        found = _ROUTER.resolve(line)
        assert isinstance(found, Hit | Miss)
        if isinstance(found, Hit):
            # A hit is one of our lists, through a route in the table.
            assert (found.mailing_list.name, found.mailing_list.domain) in _LISTS
        try:
            addresses.normalise(line)
        except AddressError:
            pass
        dsn.verp_parse(line)
    addresses.header_addresses(text.splitlines()[:20])
    addresses.first_address(text)

    if _FINDINGS.records:
        record = _FINDINGS.records[0]
        raise AssertionError(f"{record.name} logged an error: "
                             f"{logging.Formatter().format(record)}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
