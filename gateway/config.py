"""The configuration file (``listgate.toml``): its sections, defaults and validation.

Every section is a frozen dataclass; unknown sections or keys, wrong types and
bad values are errors that name the file, the key and what is expected.
Any key can be overridden from the environment as ``LISTGATE_<SECTION>_<KEY>``
(for secrets and URLs), e.g. ``LISTGATE_STORE_URL`` or ``LISTGATE_DELIVERY_PASSWORD``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway import resources
from gateway.errors import ConfigError

MIB = 1024 * 1024


class Seconds(float):
    """A duration: a number of seconds, or a string like "90s", "5m", "2h", "5d"."""


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> Seconds:
    if isinstance(value, bool):
        raise ValueError("a duration, like 30, \"30s\", \"5m\", \"2h\" or \"5d\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if m is None:
            raise ValueError("a duration, like 30, \"30s\", \"5m\", \"2h\" or \"5d\"")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError("a duration, like 30, \"30s\", \"5m\", \"2h\" or \"5d\"")
    if seconds < 0:
        raise ValueError("a duration that is not negative")
    return Seconds(seconds)


@dataclass(frozen=True)
class DaemonConfig:
    """How `listgate serve` runs: one process, or a supervisor and several workers."""

    # 1: intake and every stage in one process (one core). More: a supervisor starts
    # this many workers sharing the listening sockets and the store.
    processes: int = 1
    # Bind each process that runs the gateway to one CPU of those it may use (worker k
    # to the k-th, round robin; as nginx's worker_cpu_affinity auto). The threads of
    # one process share one interpreter lock: spread over cores, they hand it across
    # them, which cost a third of the stage worker's CPU here (bench/README.md).
    pin_cpus: bool = True
    # With processes >= 2, the workers that run the stages are this much nicer (0-19)
    # than intake: when the CPUs are short, the sessions handing posts in (and the MTA
    # on either side) go first, and fan-out catches up after. 0: all alike.
    stage_nice: int = 10


@dataclass(frozen=True)
class StoreConfig:
    """Where the store lives: a SQLAlchemy URL (SQLite or PostgreSQL)."""

    url: str = "sqlite:///listgate.db"
    pool_size: int = 8


@dataclass(frozen=True)
class IntakeConfig:
    """The SMTP/LMTP listeners that take posts in."""

    listen: tuple[str, ...] = ("smtp://127.0.0.1:2525",)
    hostname: str = ""
    max_message_size: int = 10 * MIB
    max_recipients: int = 100
    max_line_length: int = 65536
    timeout: Seconds = Seconds(300)
    max_connections: int = 500
    max_connections_per_ip: int = 50
    commit_batch: int = 128


@dataclass(frozen=True)
class QueueConfig:
    """How stages claim work: leases, retries of failed work, polling."""

    lease: Seconds = Seconds(60)
    max_attempts: int = 3
    poll_interval: Seconds = Seconds(1)
    retry_delay: Seconds = Seconds(30)


@dataclass(frozen=True)
class FanoutConfig:
    """Turning an accepted post into deliveries."""

    chunk: int = 2000


@dataclass(frozen=True)
class DeliveryConfig:
    """Handing mail to the smarthost, or to a local outbox folder when none is set."""

    smarthost: str = ""
    outbox: Path = Path("outbox")
    max_recipients: int = 100
    connections: int = 4
    helo_name: str = ""
    starttls: str = "opportunistic"
    username: str = ""
    password: str = ""
    timeout: Seconds = Seconds(120)
    retry_initial: Seconds = Seconds(60)
    retry_max: Seconds = Seconds(3600)
    lifetime: Seconds = Seconds(5 * 86400)
    batch: int = 64


@dataclass(frozen=True)
class DigestConfig:
    """How often digest schedules are looked at (each list's schedule is its own)."""

    tick: Seconds = Seconds(30)
    chunk: int = 2000  # digest members read and queued per transaction


@dataclass(frozen=True)
class ModerationConfig:
    """Moderation that is the operator's to set (the rest is in the policy files)."""

    # authserv-ids of front MTAs whose Authentication-Results headers are believed
    # (only the topmost such header; anyone can write one further down).
    trusted_authserv_ids: tuple[str, ...] = ()
    sweep_interval: Seconds = Seconds(60)  # how often expiries and reminders are checked


@dataclass(frozen=True)
class DKIMConfig:
    """Signing what the gateway sends: one key per list domain, made by `listgate dkim keygen`.

    A domain with no key file is sent unsigned (and the log says so at start).
    """

    directory: Path = Path("dkim")     # <selector>._domainkey.<domain>.key files, mode 0600
    selector: str = "listgate"
    ed25519_selector: str = ""         # a second, ed25519 signature when set
    arc: bool = True                   # seal posts with an ARC set (RFC 8617)
    authserv_id: str = ""              # in our ARC-Authentication-Results; default: hostname


@dataclass(frozen=True)
class BouncesConfig:
    """Bounce scoring, as GNU Mailman does it."""

    threshold: float = 5.0           # score at which delivery to a member is disabled
    stale_after: Seconds = Seconds(7 * 86400)  # a score not raised for this long starts over
    remove_after: Seconds = Seconds(21 * 86400)  # disabled and silent this long: removed
    probe_interval: Seconds = Seconds(7 * 86400)  # between "are you still there?" probes
    # How often the smarthost's refusals are scored and probes and removals are due.
    sweep_interval: Seconds = Seconds(60)


@dataclass(frozen=True)
class DNSConfig:
    """The resolver used for DKIM keys and DMARC records."""

    nameservers: tuple[str, ...] = ()  # empty: the system's (/etc/resolv.conf)
    timeout: Seconds = Seconds(5)


@dataclass(frozen=True)
class WebConfig:
    """The small HTTP endpoint: one-click unsubscribe (RFC 8058), preferences, metrics."""

    listen: str = "http://127.0.0.1:8080"   # empty: no web endpoint, links are mailto only
    # The public URL members' links use; put the endpoint behind a TLS reverse proxy
    # (RFC 8058 wants https). Empty: derived from listen (fine for trying it out).
    base_url: str = ""
    secret_file: Path = Path("secret.key")  # signs members' links; made by `listgate init`

    @property
    def public_url(self) -> str:
        return (self.base_url or self.listen).rstrip("/")


@dataclass(frozen=True)
class PathsConfig:
    """Where templates and moderation policies are read from."""

    templates: Path = field(default_factory=resources.templates_dir)
    policies: Path = field(default_factory=resources.policies_dir)


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    fanout: FanoutConfig = field(default_factory=FanoutConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    digest: DigestConfig = field(default_factory=DigestConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    web: WebConfig = field(default_factory=WebConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: Path | None = None

    @property
    def hostname(self) -> str:
        return self.intake.hostname or socket.getfqdn()


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "source"
}


def load(path: Path | None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration; a missing path means all defaults."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    where = "defaults"
    root = Path.cwd()
    if path is not None:
        where = str(path)
        root = path.resolve().parent
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such configuration file; create one with "
                              f"`listgate --config {path} init`") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}]; "
                          f"known sections: {', '.join(sorted(_SECTIONS))}")
    sections = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        sections[name] = _section(cls, name, table, environ, where, root)
    config = Config(**sections, source=path)
    _check(config, where)
    return config


def _section(cls: type[Any], name: str, table: dict[str, Any], environ: Mapping[str, str],
             where: str, root: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} in [{name}]; "
                          f"known keys: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        env_name = f"LISTGATE_{name}_{f.name}".upper()
        if env_name in environ:
            origin = f"environment variable {env_name}"
            value = _from_env(hints[f.name], environ[env_name])
        elif f.name in table:
            origin, value = f"{where}: [{name}] {f.name}", table[f.name]
        else:
            continue
        try:
            values[f.name] = _convert(hints[f.name], value, root)
        except ValueError as exc:
            raise ConfigError(f"{origin}: expected {exc}, got {value!r}") from None
    for f in dataclasses.fields(cls):
        # A relative default path is relative to the config file, as a written one is.
        if hints[f.name] is Path and f.name not in values and isinstance(f.default, Path) \
                and not f.default.is_absolute():
            values[f.name] = root / f.default
    return cls(**values)


def _from_env(kind: Any, text: str) -> Any:
    if typing.get_origin(kind) is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind is int:
        return int(text) if re.fullmatch(r"-?\d+", text.strip()) else text
    if kind is float:
        return float(text) if re.fullmatch(r"-?\d+(\.\d+)?", text.strip()) else text
    if kind is bool:
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            text.strip().lower(), text)
    return text


def _convert(kind: Any, value: Any, root: Path) -> Any:
    if kind is Seconds:
        return parse_duration(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError("a string")
        return value
    if kind is Path:
        if not isinstance(value, str):
            raise ValueError("a path (a string)")
        p = Path(value).expanduser()
        return p if p.is_absolute() else root / p
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError("a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise ValueError("a list of strings")
        return tuple(value)
    if isinstance(kind, types.UnionType):  # pragma: no cover - no such field yet
        raise ValueError(str(kind))
    raise ValueError(f"a value of type {kind}")  # pragma: no cover


def _check(config: Config, where: str) -> None:
    """Cross-field checks that a type cannot express."""
    for url in config.intake.listen:
        parse_listener(url, where)
    if config.delivery.smarthost:
        parse_smarthost(config.delivery.smarthost, where)
    for url in filter(None, (config.web.listen, config.web.base_url)):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}: [web] {url!r} must be an http:// or https:// URL")
    if config.web.listen and urlsplit(config.web.listen).port is None:
        raise ConfigError(f"{where}: [web] listen {config.web.listen!r} needs a port")
    if config.delivery.starttls not in ("opportunistic", "required", "never"):
        raise ConfigError(f"{where}: [delivery] starttls must be \"opportunistic\", "
                          f"\"required\" or \"never\", not {config.delivery.starttls!r}")
    positive = {
        "[intake] max_message_size": config.intake.max_message_size,
        "[intake] max_recipients": config.intake.max_recipients,
        "[intake] max_connections": config.intake.max_connections,
        "[intake] max_connections_per_ip": config.intake.max_connections_per_ip,
        "[intake] commit_batch": config.intake.commit_batch,
        "[queue] max_attempts": config.queue.max_attempts,
        "[fanout] chunk": config.fanout.chunk,
        "[delivery] max_recipients": config.delivery.max_recipients,
        "[delivery] connections": config.delivery.connections,
        "[delivery] batch": config.delivery.batch,
        "[store] pool_size": config.store.pool_size,
        "[daemon] processes": config.daemon.processes,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where}: {key} must be at least 1, not {value}")
    if not 0 <= config.daemon.stage_nice <= 19:
        raise ConfigError(f"{where}: [daemon] stage_nice must be from 0 to 19, "
                          f"not {config.daemon.stage_nice}")
    if config.intake.max_line_length < 1000:
        raise ConfigError(f"{where}: [intake] max_line_length must be at least 1000 (RFC 5321)")
    if config.queue.lease < 1:
        raise ConfigError(f"{where}: [queue] lease must be at least 1 second")
    if config.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: [log] level must be DEBUG, INFO, WARNING or ERROR")
    if not config.store.url.startswith(("sqlite:", "postgresql")):
        raise ConfigError(f"{where}: [store] url must be a sqlite:/// or postgresql+psycopg:// URL")


@dataclass(frozen=True)
class Listener:
    protocol: str  # "smtp" or "lmtp"
    host: str
    port: int


def parse_listener(url: str, where: str = "configuration") -> Listener:
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "lmtp") or not parts.hostname or parts.port is None:
        raise ConfigError(f"{where}: [intake] listen entry {url!r} must look like "
                          "\"smtp://127.0.0.1:2525\" or \"lmtp://127.0.0.1:2424\"")
    return Listener(parts.scheme, parts.hostname, parts.port)


@dataclass(frozen=True)
class Smarthost:
    host: str
    port: int
    implicit_tls: bool


def parse_smarthost(url: str, where: str = "configuration") -> Smarthost:
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError(f"{where}: [delivery] smarthost {url!r} must look like "
                          "\"smtp://host:port\" or \"smtps://host:465\"")
    default_port = 465 if parts.scheme == "smtps" else 25
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError(f"{where}: [delivery] smarthost {url!r} has a bad port") from None
    return Smarthost(parts.hostname, port, parts.scheme == "smtps")


def store_url(config: Config) -> str:
    """The store URL, with a relative SQLite path made relative to the config file."""
    url = config.store.url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        root = config.source.resolve().parent if config.source else Path.cwd()
        return prefix + str(root / url[len(prefix):])
    return url
