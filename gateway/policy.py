"""Moderation policy files: the rule chain as data, and the decision it reaches.

``policies/default.toml`` declares the chain; a list overrides it with
``policies/lists/<list address>.toml``. Each entry names a rule, the action
taken when it hits, and the rule's parameters. A ``[release]`` table says how
held posts are released: what authenticates a moderator's reply, and when a
hold expires.

Evaluation: rules run in order. A hit whose action is ``accept``, ``reject``
or ``discard`` decides at once. A ``hold`` hit is collected and the chain goes
on, so the moderator sees every reason; at the end any hold means hold.
No hit means accept.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import parse_duration
from gateway.errors import ConfigError
from gateway.rules import RULES, Post, RuleHit


class Action(enum.Enum):
    ACCEPT = "accept"
    HOLD = "hold"
    REJECT = "reject"
    DISCARD = "discard"


@dataclass(frozen=True)
class Step:
    rule: str
    action: Action
    params: Any


@dataclass(frozen=True)
class ReleaseSettings:
    """How held posts are released and what happens when nobody decides."""

    authentication: str = "dkim"     # "dkim" | "trusted-ar" | "either"
    hold_expiry: float = 7 * 86400.0
    reminder_before: float = 86400.0
    expiry_action: str = "reject"    # "reject" (the poster is told) | "discard" | "approve"
    notify_poster: bool = True       # tell a poster (when safe) that the post waits


@dataclass(frozen=True)
class Chain:
    source: str
    steps: tuple[Step, ...]
    release: ReleaseSettings = ReleaseSettings()

    @property
    def needs(self) -> frozenset[str]:
        """The facts the chain's rules need gathered (e.g. "auth", "promo")."""
        return frozenset().union(*(RULES[s.rule].needs for s in self.steps))


@dataclass(frozen=True)
class Decision:
    action: Action
    hits: tuple[tuple[RuleHit, Action], ...]

    @property
    def reasons(self) -> list[str]:
        return [hit.reason for hit, _action in self.hits]


def decide(chain: Chain, post: Post) -> Decision:
    held: list[tuple[RuleHit, Action]] = []
    for step in chain.steps:
        hit = RULES[step.rule].check(post, step.params)
        if hit is None:
            continue
        if step.action is Action.HOLD:
            held.append((hit, step.action))
            continue
        return Decision(step.action, (*tuple(held), (hit, step.action)))
    if held:
        return Decision(Action.HOLD, tuple(held))
    return Decision(Action.ACCEPT, ())


def parse(text: str, source: str) -> Chain:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"chain", "release"})
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; "
                          "a policy has [[chain]] entries and a [release] table")
    entries = data.get("chain")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: a policy needs at least one [[chain]] entry")
    steps = []
    for i, entry in enumerate(entries, 1):
        where = f"{source}: [[chain]] entry {i}"
        rule = entry.get("rule")
        if rule not in RULES:
            raise ConfigError(f"{where}: unknown rule {rule!r}; known rules: "
                              f"{', '.join(sorted(RULES))}")
        try:
            action = Action(entry.get("action"))
        except ValueError:
            raise ConfigError(f"{where} ({rule}): action must be one of "
                              f"{', '.join(a.value for a in Action)}, "
                              f"not {entry.get('action')!r}") from None
        extra = sorted(set(entry) - {"rule", "action", "params"})
        if extra:
            raise ConfigError(f"{where} ({rule}): unknown key {extra[0]!r}; "
                              "parameters go under params = { ... }")
        params = _params(RULES[rule].params, entry.get("params", {}), f"{where} ({rule})")
        steps.append(Step(rule, action, params))
    return Chain(source, tuple(steps), _release(data.get("release", {}), source))


def _release(raw: object, source: str) -> ReleaseSettings:
    where = f"{source}: [release]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name for f in dataclasses.fields(ReleaseSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                          f"{', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    choices = {"authentication": ("dkim", "trusted-ar", "either"),
               "expiry_action": ("reject", "discard", "approve")}
    for key, value in raw.items():
        if key in choices:
            if value not in choices[key]:
                raise ConfigError(f"{where}: {key} must be one of "
                                  f"{', '.join(choices[key])}, not {value!r}")
            values[key] = value
        elif key == "notify_poster":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: notify_poster must be true or false")
            values[key] = value
        else:
            try:
                values[key] = float(parse_duration(value))
            except ValueError as exc:
                raise ConfigError(f"{where}: {key}: expected {exc}, got {value!r}") from None
    settings = ReleaseSettings(**values)
    if settings.reminder_before >= settings.hold_expiry:
        raise ConfigError(f"{where}: reminder_before must be shorter than hold_expiry")
    return settings


def _params(cls: type[Any], raw: object, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: params must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{where}: unknown parameter {unknown[0]!r}; known parameters: {known}")
    values = {}
    for name, value in raw.items():
        expected = hints[name]
        if not _is_instance(value, expected):
            raise ConfigError(f"{where}: parameter {name!r} must be {_describe(expected)}, "
                              f"not {value!r}")
        values[name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _is_instance(value: object, expected: Any) -> bool:
    if isinstance(expected, types.UnionType):
        return any(_is_instance(value, arg) for arg in typing.get_args(expected))
    if typing.get_origin(expected) is tuple:
        (item,) = {a for a in typing.get_args(expected) if a is not Ellipsis}
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(expected) if a is not type(None))
    if typing.get_origin(expected) is tuple:
        return "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        expected, str(expected))


class Policies:
    """The default chain and per-list overrides, read once and checked up front."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.default, self._lists = self._read()

    def _read(self) -> tuple[Chain, dict[str, Chain]]:
        default = load_file(self.root / "default.toml")
        per_list: dict[str, Chain] = {}
        lists_dir = self.root / "lists"
        if lists_dir.is_dir():
            for path in sorted(lists_dir.glob("*.toml")):
                per_list[path.stem.lower()] = load_file(path)
        return default, per_list

    def reload(self) -> None:
        """Read the files again; on any error keep the policies in force and raise."""
        self.default, self._lists = self._read()

    def for_list(self, list_address: str) -> Chain:
        return self._lists.get(list_address.lower(), self.default)

    @property
    def files(self) -> list[str]:
        return [self.default.source] + [c.source for c in self._lists.values()]


def load_file(path: Path) -> Chain:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: policy file not found; set [paths] policies in the "
                          "configuration to the folder holding default.toml") from None
    return parse(text, str(path))
