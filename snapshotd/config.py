"""The YAML configuration: text in, frozen and validated values out.

This module owns the config contract (SPEC §4): which keys exist, their types, their
defaults, and the error a user sees when a key is wrong. It is pure apart from reading
the file in :func:`load`; it is the only module that imports ``yaml``, and it only ever
uses ``yaml.safe_load`` (plus ``yaml.compose``, which builds no objects, to find
duplicate keys), so a tag such as ``!!python/object/apply`` is an error, never a call.

Rules worth knowing:

* Every user error is a :class:`~snapshotd.errors.ConfigError` whose ``key_path`` is
  dotted (``schedule.every``, ``experiments.mnist-*.keep.last``), or "" for the whole
  document. Unknown keys, duplicate keys and keys given with no value are errors.
* Relative ``store`` and ``runtime_dir`` paths resolve against the **directory of the
  config file** (not the working directory), so a unit started in ``/`` reads the same
  config as a shell does; ``~`` is expanded.
* Durations: ``500ms``, ``30s``, ``10m``, ``2h``, ``1d``, ``1w`` and combinations from
  largest to smallest unit (``2h30m``), or a plain number of seconds. Positive, at
  most millisecond resolution.
* Cron: five fields, validated here. The stored string is normalised for APScheduler 3,
  whose ``CronTrigger.from_crontab`` counts weekdays from Monday=0 where cron counts
  from Sunday=0: the day-of-week field is rewritten as day names (``1-5`` becomes
  ``mon,tue,wed,thu,fri``) and month names become numbers. Restricting both day of month
  and day of week is refused: cron ORs them, APScheduler ANDs them.
* An override under ``experiments`` replaces the *whole* schedule or keep policy it
  gives (``keep: {last: 10}`` means exactly ``last 10``, nothing inherited); what it
  leaves out comes from the top level. The first matching pattern wins.
"""

from __future__ import annotations

import datetime
import math
import re
import reprlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from snapshotd.errors import ConfigError
from snapshotd.retention import Policy

__all__ = [
    "Config",
    "Override",
    "Schedule",
    "default_path",
    "format_duration",
    "load",
    "normalize_cron",
    "parse",
    "parse_duration",
]

SYSTEM_CONFIG = Path("/etc/snapshotd/snapshotd.yaml")
_UNITS = (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))
_DURATION_RE = re.compile(
    r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", re.A
)
_DURATION_FORM = "a duration such as 500ms, 30s, 10m, 2h, 1d, 1w or 2h30m, or a number of seconds"
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CronField = tuple[str, int, int, int, tuple[str, ...]]  # name, low, high, high for "*", names
_CRON_FIELDS: tuple[_CronField, ...] = (
    ("minute", 0, 59, 59, ()),
    ("hour", 0, 23, 23, ()),
    ("day of month", 1, 31, 31, ()),
    ("month", 1, 12, 12, ("", *_MONTHS)),  # a name's index is its value
    ("day of week", 0, 7, 6, _DAYS),
)
_CRON_ITEM = re.compile(r"(?:\*|([0-9]+|[a-z]+)(?:-([0-9]+|[a-z]+))?)(?:/([0-9]+))?")
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 2, 4, 4, 60


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """When to snapshot: exactly one of ``every`` (a positive interval) or ``cron``."""

    every: datetime.timedelta | None = None
    cron: str | None = None

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            given = "both" if self.every else "neither"
            raise ConfigError("schedule", f"expected exactly one of every or cron, got {given}")
        if self.every is not None and (
            not isinstance(self.every, datetime.timedelta) or self.every <= datetime.timedelta(0)
        ):
            raise ConfigError("schedule.every", f"expected a positive duration, got {self.every}")
        if self.cron is not None:
            object.__setattr__(self, "cron", normalize_cron(self.cron, "schedule.cron"))


DEFAULT_SCHEDULE = Schedule(every=datetime.timedelta(minutes=10))
DEFAULT_KEEP = Policy(last=5)


@dataclass(frozen=True, kw_only=True)
class Override:
    """Settings for experiments whose name matches ``pattern`` (an fnmatch glob).

    ``schedule`` or ``keep``, when given, replaces the top-level one *entirely*: a
    partial ``keep: {last: 10}`` is the policy ``last 10``, nothing is merged. ``None``
    means "use the top-level default".
    """

    pattern: str
    schedule: Schedule | None = None
    keep: Policy | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError("experiments", f"expected a non-empty pattern, got {self.pattern!r}")


@dataclass(frozen=True, kw_only=True)
class Daemon:
    """How the daemon runs (the ``daemon:`` section; every key optional).

    - ``timeout``: how long a snapshot request waits for a safe point (default 60s).
    - ``jitter``: random delay added to each scheduled snapshot, so many experiments on
      one schedule do not hit the disk at the same instant (default: 5% of the interval,
      at most 5s; ``0s``: none).
    - ``staging_budget``: bytes of state in flight at once across experiments; a snapshot
      that would exceed it is skipped and counted (default 8GiB).
    - ``max_io_failures``: consecutive failed commits after which the daemon exits
      non-zero so its supervisor restarts it (default 3).
    - ``rescan``: how often the runtime directory is rescanned, besides the file system
      events (default 2s).
    - ``allowed_uids``: uids whose experiments are served (default: the daemon's, root).
    - ``log_level``: ``debug``, ``info``, ``warning`` or ``error``, in any case (default
      ``info``).
    """

    timeout: datetime.timedelta = datetime.timedelta(seconds=60)
    jitter: datetime.timedelta | None = None
    staging_budget: int = 8 << 30
    max_io_failures: int = 3
    rescan: datetime.timedelta = datetime.timedelta(seconds=2)
    allowed_uids: frozenset[int] | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.staging_budget <= 0:
            raise ConfigError("daemon.staging_budget", "expected a positive size")
        if self.max_io_failures < 1:
            raise ConfigError("daemon.max_io_failures", "expected a whole number >= 1")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError(
                "daemon.log_level",
                f"expected one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}",
            )

    def jitter_for(self, schedule: Schedule) -> float:
        """Seconds of jitter for ``schedule``."""
        if self.jitter is not None:
            return self.jitter.total_seconds()
        if schedule.every is None:
            return 5.0
        return min(schedule.every.total_seconds() * 0.05, 5.0)


_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration. ``source`` is the file it came from, if any."""

    store: Path
    runtime_dir: Path | None = None
    schedule: Schedule = DEFAULT_SCHEDULE
    keep: Policy = DEFAULT_KEEP
    experiments: tuple[Override, ...] = ()
    daemon: Daemon = Daemon()
    source: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.store, Path):
            raise ConfigError("store", f"expected a path, got {self.store!r}")
        object.__setattr__(self, "experiments", tuple(self.experiments))

    def for_experiment(self, name: str) -> tuple[Schedule, Policy]:
        """The schedule and policy for ``name``: the first matching override, else defaults."""
        for override in self.experiments:
            if fnmatchcase(name, override.pattern):
                return override.schedule or self.schedule, override.keep or self.keep
        return self.schedule, self.keep


# --- durations and cron -------------------------------------------------------------


def parse_duration(
    text: str | int | float, key_path: str, *, zero: bool = False
) -> datetime.timedelta:
    """``"2h30m"`` or a number of seconds → timedelta; anything else is a ConfigError.

    A duration is positive, or also zero where ``zero`` says it means "none" (jitter).
    """
    problem = f"expected {_DURATION_FORM}, got {_describe(text)}"
    match = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    try:
        if match and any(match.groups()):
            sizes = [size for _, size in _UNITS] + [1]
            ms = sum(int(n or 0) * size for n, size in zip(match.groups(), sizes, strict=True))
            span = datetime.timedelta(milliseconds=ms)
        elif isinstance(text, int | float) and not isinstance(text, bool) and math.isfinite(text):
            span = datetime.timedelta(seconds=text)
        else:
            raise ConfigError(key_path, problem)
    except (OverflowError, ValueError) as exc:
        raise ConfigError(key_path, f"{_describe(text)} is too long a duration") from exc
    if span < datetime.timedelta(0) or (span == datetime.timedelta(0) and not zero):
        raise ConfigError(key_path, f"must be positive: {problem}")
    if span % datetime.timedelta(milliseconds=1):
        raise ConfigError(key_path, f"must be in whole ms: {problem}")
    return span


def format_duration(span: datetime.timedelta) -> str:
    """A timedelta for display, in the syntax :func:`parse_duration` reads: ``2h30m``."""
    if span < datetime.timedelta(0):
        return "-" + format_duration(-span)
    ms, micros = divmod(span // datetime.timedelta(microseconds=1), 1000)
    parts = []
    for unit, size in (*_UNITS[1:], ("ms", 1)):
        amount, ms = divmod(ms, size)
        parts.append(f"{amount}{unit}" if amount else "")
    return "".join(parts) + (f"{micros}us" if micros else "") or "0s"


def normalize_cron(text: str, key_path: str) -> str:
    """Validate a 5-field crontab line; return it in the form APScheduler 3 reads rightly."""
    fields = text.lower().split() if isinstance(text, str) else []
    if len(fields) != 5:
        why = "5 fields (minute hour day-of-month month day-of-week) such as '*/15 * * * *'"
        raise ConfigError(key_path, f"expected {why}, got {_describe(text)}")
    values = [_cron_field(*pair, text, key_path) for pair in zip(fields, _CRON_FIELDS, strict=True)]
    if not fields[2].startswith("*") and not fields[4].startswith("*"):
        why = "cron runs on either, APScheduler only on both: put * in one of them"
        raise ConfigError(key_path, f"{text!r} restricts both day of month and day of week; {why}")
    if any(c.isalpha() for c in fields[3]):
        fields[3] = ",".join(str(v) for v in sorted(values[3]))
    if fields[4] != "*":
        fields[4] = ",".join(_DAYS[v] for v in sorted({v % 7 for v in values[4]}))
    return " ".join(fields)


def _cron_field(field: str, spec: _CronField, text: str, key_path: str) -> set[int]:
    name, low, high, star_high, names = spec

    def bad(why: str) -> ConfigError:
        return ConfigError(key_path, f"{name} field {field!r} in {text!r}: {why}")

    def value(token: str) -> int:
        if not token.isdigit() and token not in names[low:]:
            raise bad(f"unknown name {token!r}; expected a number {low}-{high}")
        number = int(token) if token.isdigit() else names.index(token)
        if not low <= number <= high:
            raise bad(f"{token} is outside {low}-{high}")
        return number

    found: set[int] = set()
    for item in field.split(","):
        match = _CRON_ITEM.fullmatch(item)
        if not match or (match[1] and match[3] and not match[2]):
            raise bad(f"expected *, N, A-B, */S or A-B/S (comma-separated), got {item!r}")
        first, last = (
            (value(match[1]), value(match[2] or match[1])) if match[1] else (low, star_high)
        )
        step = int(match[3] or 1)
        if first > last:
            raise bad(f"range {item!r} runs backwards")
        if match[3] and not 1 <= step <= last - first:
            raise bad(f"step {step} in {item!r} is not between 1 and {last - first}")
        found.update(range(first, last + 1, step))
    return found


# --- the document -------------------------------------------------------------------

Convert = Callable[[Any, str], Any]


def _describe(value: object) -> str:
    """``integer 5``, ``string '10 minutes'``: bounded, even for aliased YAML bombs."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    kind = "mapping" if isinstance(value, dict) else kinds.get(type(value), type(value).__name__)
    return "nothing (null)" if value is None else f"{kind} {_REPR.repr(value)}"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _mapping(raw: object, path: str, expected: str) -> dict[Any, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected {expected}, got {_describe(raw)}")
    return raw


def _walk(raw: object, path: str, table: Mapping[str, Convert]) -> dict[str, Any]:
    """Check a mapping against its allowed keys and convert each value; errors name the key."""
    allowed = ", ".join(table)
    fields = {}
    for key, value in _mapping(raw, path, f"a mapping with keys {allowed}").items():
        if key not in table:
            raise ConfigError(_join(path, key), f"unknown key {key!r}; allowed keys: {allowed}")
        if value is None:
            raise ConfigError(_join(path, key), "has no value; give one or leave the key out")
        fields[key] = table[key](value, _join(path, key))
    return fields


@contextmanager
def _under(path: str, root: str) -> Iterator[None]:
    """Re-root the key path of a ConfigError raised by a value class (``keep.last``)."""
    try:
        yield
    except ConfigError as exc:
        if path == root or not exc.key_path.startswith(root):
            raise
        raise ConfigError(path + exc.key_path[len(root) :], exc.problem) from exc


def _text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(path, f"expected a non-empty string, got {_describe(value)}")
    return value


def _count(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"expected a whole number, got {_describe(value)}")
    return value  # Policy checks the range, naming the key and the value


def _pinned(value: object, path: str) -> frozenset[int]:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list of version numbers, got {_describe(value)}")
    return frozenset(_count(item, path) for item in value)


def _schedule(value: object, path: str) -> Schedule:
    fields = _walk(value, path, {"every": parse_duration, "cron": _text})
    with _under(path, "schedule"):
        return Schedule(**fields)


_KEEP: dict[str, Convert] = dict.fromkeys(
    ("last", "hourly", "daily", "weekly", "monthly", "yearly"), _count
) | {"within": parse_duration, "pinned": _pinned, "timezone": _text}


def _keep(value: object, path: str) -> Policy:
    fields = _walk(value, path, _KEEP)
    with _under(path, "keep"):
        return Policy(**fields)


def _experiments(value: object, path: str) -> tuple[Override, ...]:
    overrides = []
    for pattern, body in _mapping(value, path, "a mapping of name pattern: settings").items():
        if not isinstance(pattern, str) or not pattern:
            why = f"expected a name pattern (a non-empty string), got {_describe(pattern)}"
            raise ConfigError(_join(path, pattern), why)
        fields = _walk(body, _join(path, pattern), {"schedule": _schedule, "keep": _keep})
        overrides.append(Override(pattern=pattern, **fields))
    return tuple(overrides)


_SIZE = re.compile(r"([0-9]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}


def parse_size(value: object, path: str) -> int:
    """``"4GiB"``, ``"500MB"`` or a whole number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match.group(1)) <= 0:
        raise ConfigError(
            path,
            f"expected a positive size such as 512MiB, 4GiB or a number of bytes, got "
            f"{_describe(value)}",
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _uids(value: object, path: str) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"expected a non-empty list of uids, got {_describe(value)}")
    uids = frozenset(_count(item, path) for item in value)
    if min(uids) < 0:
        raise ConfigError(path, "uids are not negative")
    return uids


_DAEMON: dict[str, Convert] = {
    "timeout": parse_duration,
    "jitter": lambda value, path: parse_duration(value, path, zero=True),
    "staging_budget": parse_size,
    "max_io_failures": _count,
    "rescan": parse_duration,
    "allowed_uids": _uids,
    "log_level": lambda value, path: _text(value, path).lower(),
}


def _daemon(value: object, path: str) -> Daemon:
    fields = _walk(value, path, _DAEMON)
    with _under(path, "daemon"):
        return Daemon(**fields)


_TOP: dict[str, Convert] = dict(
    store=_text,
    runtime_dir=_text,
    schedule=_schedule,
    keep=_keep,
    experiments=_experiments,
    daemon=_daemon,
)


def _yaml(text: str) -> object:
    try:
        document = yaml.safe_load(text)
        if document is not None:
            _no_duplicates(yaml.compose(text, Loader=yaml.SafeLoader), "", set())
    except yaml.constructor.ConstructorError as exc:
        # A tag safe_load refuses (!!python/object/apply...): nothing was built or run.
        mark = exc.problem_mark
        path = _path_at(text, mark) if mark else ""
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            path, f"refused{where}: {exc.problem} (only plain YAML values are allowed)"
        ) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"invalid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError("", "invalid YAML: nested too deeply") from exc
    return document


def _path_at(text: str, mark: yaml.Mark) -> str:
    """The key path of the value at ``mark`` (composing builds nodes, never objects)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return ""
    return _find(root, (mark.line, mark.column), "")


def _find(node: yaml.Node | None, where: tuple[int, int], path: str) -> str:
    if not isinstance(node, yaml.MappingNode):
        return path
    for key, value in node.value:
        start = (value.start_mark.line, value.start_mark.column)
        end = (value.end_mark.line, value.end_mark.column)
        if start <= where <= end:
            return _find(value, where, _join(path, key.value))
    return path


def _no_duplicates(node: yaml.Node | None, path: str, seen: set[int]) -> None:
    """PyYAML keeps the last of two equal keys silently; we refuse them."""
    if not isinstance(node, yaml.CollectionNode) or id(node) in seen:  # aliases: visit once
        return
    seen.add(id(node))
    keys: set[tuple[str, object]] = set()
    for key, value in node.value if isinstance(node, yaml.MappingNode) else []:
        if (key.tag, key.value) in keys:  # keys are scalars: safe_load refused the rest
            line = key.start_mark.line + 1
            raise ConfigError(_join(path, key.value), f"duplicate key at line {line}")
        keys.add((key.tag, key.value))
        _no_duplicates(value, _join(path, key.value), seen)
    for item in node.value if isinstance(node, yaml.SequenceNode) else []:
        _no_duplicates(item, path, seen)


def parse(text: str, *, base_dir: Path, source: Path | None = None) -> Config:
    """Parse and validate config text; relative paths resolve against ``base_dir``."""
    document = _yaml(text)
    if document is None:
        raise ConfigError("", "the document is empty; it needs at least 'store: DIRECTORY'")
    fields = _walk(document, "", _TOP)
    if "store" not in fields:
        raise ConfigError("store", "missing: expected a directory, e.g. 'store: ./snapshots'")
    for key in {"store", "runtime_dir"} & fields.keys():
        try:
            fields[key] = base_dir / Path(fields[key]).expanduser()
        except RuntimeError as exc:  # ~user for a user that does not exist
            raise ConfigError(key, f"cannot expand ~ in {fields[key]!r}") from exc
    return Config(source=source, **fields)


def load(path: Path) -> Config:
    """Read and parse the config file at ``path`` (relative paths: see the module doc)."""
    path = path.absolute()
    with _naming(path):
        return parse(_read(path), base_dir=path.parent, source=path)


def _read(path: Path) -> str:
    """The text of the config file at ``path``; a ConfigError says why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(
            "", f"cannot read the file: {why}; pass --config FILE or set SNAPSHOTD_CONFIG"
        ) from exc


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Errors of the config file at ``path`` start with its name: the daemon's log and a
    shell script may not show which file it was."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(exc.key_path, exc.problem, source=path) from exc.__cause__


def runtime_dir_of(path: Path) -> Path | None:
    """Only the ``runtime_dir`` of the config file at ``path`` (None: not set), for the
    commands that only talk to a running daemon: the rest of the file may be invalid,
    as while it is being edited, and the daemon keeps running on its last good config.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or ``runtime_dir`` is invalid.
    """
    path = path.absolute()
    with _naming(path):
        document = _yaml(_read(path))
        if not isinstance(document, dict) or document.get("runtime_dir") is None:
            return None
        try:
            return path.parent / Path(_text(document["runtime_dir"], "runtime_dir")).expanduser()
        except RuntimeError as exc:
            raise ConfigError("runtime_dir", f"cannot expand ~: {exc}") from None


def differences(old: Config, new: Config) -> list[str]:
    """The keys whose values differ from ``old`` to ``new``, the daemon section's by
    their own dotted names: ``["keep", "daemon.rescan"]``."""
    changed = [
        item.name
        for item in fields(Config)
        if item.name not in ("daemon", "source")
        and getattr(old, item.name) != getattr(new, item.name)
    ]
    return changed + [
        f"daemon.{item.name}"
        for item in fields(Daemon)
        if getattr(old.daemon, item.name) != getattr(new.daemon, item.name)
    ]


def default_path(environ: Mapping[str, str]) -> Path:
    """``$SNAPSHOTD_CONFIG`` if set and non-empty, else the system-wide file."""
    return Path(environ.get("SNAPSHOTD_CONFIG") or SYSTEM_CONFIG)
