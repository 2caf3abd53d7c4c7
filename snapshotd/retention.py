"""The retention engine: which snapshot versions of a run to keep, and why.

This module owns the keep/delete decision and nothing else. It is pure: no I/O, no
clock reads. The store hands in candidates (a version and a timezone-aware creation
time each) and gets back one :class:`Decision` per candidate, newest version first,
with every rule that keeps it spelled out for ``prune --dry-run``.

Semantics:

* Order is by **version** (higher = newer), never by timestamp: clocks can jump
  backwards, version numbers cannot.
* Rules are a union. Each rule is evaluated on its own over all candidates (restic
  style), so a snapshot kept by one rule also counts toward every other rule's count.
* ``last N`` keeps the N highest versions.
* ``hourly/daily/weekly/monthly/yearly N``: walk the candidates newest version first;
  the first candidate seen in a bucket represents that bucket and is kept, until N
  buckets are kept. Buckets without candidates do not count, so ``daily 7`` with gaps
  reaches back more than seven days. Buckets are computed in ``Policy.timezone``:
  daily is the local date, weekly the ISO year and week (Monday to Sunday), monthly
  year and month, yearly the year. Hourly is the local date and hour **plus the UTC
  offset**, so the hour repeated when DST ends is two buckets, and the hour skipped
  when DST starts is no bucket at all. A candidate always belongs to the bucket of its
  own timestamp; after a backward clock jump a bucket already represented by a newer
  version is not counted again.
* ``within D`` keeps every candidate created at most D before the **newest version's**
  creation time (not before now: a stalled writer must not make everything expire).
  A candidate created after the newest one, from a backward clock jump, is within.
* ``pinned`` versions are always kept.
* Safety floor: the newest version is always kept (reason ``"newest"``), whatever the
  policy. An empty policy is a :class:`~snapshotd.errors.ConfigError`.

Reasons appear in a fixed order (newest, last, hourly .. yearly, within, pinned) and
read like ``"last 1/5"``, ``"daily 2026-11-28 (1/7)"``, ``"hourly 2026-10-25T02+01:00
(2/24)"``, ``"weekly 2026-W48 (1/4)"``, ``"within 2 days of newest"``, ``"pinned"``.
"""

from __future__ import annotations

import datetime
import itertools
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from snapshotd.errors import ConfigError, UsageError

__all__ = ["Candidate", "Decision", "Policy", "plan"]

_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A retention policy; every field is a rule and the rules are a union."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: datetime.timedelta | None = None
    pinned: frozenset[int] = frozenset()
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        for name in _COUNT_RULES:
            _check_count(name, getattr(self, name))
        _check_within(self.within)
        object.__setattr__(self, "pinned", _checked_pins(self.pinned))
        _load_zone(self.timezone)
        if not self.rules:
            raise ConfigError(
                "keep",
                "no rule keeps anything: every count (last, hourly, daily, weekly, monthly, "
                "yearly) is 0 and neither within nor pinned is set, which would delete "
                "everything but the newest snapshot; set a count above 0 (last: 1 keeps "
                "only the newest), within or pinned",
            )

    @property
    def rules(self) -> tuple[str, ...]:
        """The active rules in words, e.g. ``("last 5", "daily 7", "within 2 days")``."""
        rules = [f"{name} {getattr(self, name)}" for name in _COUNT_RULES if getattr(self, name)]
        if self.within is not None:
            rules.append(f"within {_duration(self.within)}")
        if self.pinned:
            rules.append("pinned " + ", ".join(str(v) for v in sorted(self.pinned)))
        return tuple(rules)

    @property
    def zone(self) -> datetime.tzinfo:
        """The zone calendar buckets are computed in."""
        return _load_zone(self.timezone)


class Candidate(Protocol):
    """A stored snapshot as the store describes it; retention needs nothing else."""

    @property
    def version(self) -> int: ...

    @property
    def created(self) -> datetime.datetime: ...


@dataclass(frozen=True)
class Decision:
    """The verdict on one version; ``reasons`` is empty exactly when it is to be deleted.

    ``damaged``: not judged by the policy at all, because the file failed verification;
    it is kept, in quarantine (the store sets this, and its reason says why and where).
    """

    version: int
    keep: bool
    reasons: tuple[str, ...]
    damaged: bool = False

    @property
    def action(self) -> str:
        """``keep``, ``delete`` or ``quarantine``."""
        return "quarantine" if self.damaged else "keep" if self.keep else "delete"


def plan(candidates: Iterable[Candidate], policy: Policy) -> list[Decision]:
    """One Decision per candidate, newest version first."""
    snaps = _ordered(candidates)
    reasons: dict[int, list[str]] = {snap.version: [] for snap in snaps}
    for version, reason in _all_reasons(snaps, policy):
        reasons[version].append(reason)
    return [Decision(version, bool(why), tuple(why)) for version, why in reasons.items()]


# --- validation ---------------------------------------------------------------------


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"keep.{name}", f"must be a whole number, not {value!r}")
    if value < 0:
        raise ConfigError(f"keep.{name}", f"must be 0 or more, not {value}")


def _check_within(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, datetime.timedelta):
        raise ConfigError("keep.within", f"must be a duration, not {value!r}")
    if value <= datetime.timedelta(0):
        raise ConfigError("keep.within", f"must be longer than zero, not {value}")


def _checked_pins(value: object) -> frozenset[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigError("keep.pinned", f"must be a set of versions, not {value!r}")
    pins = frozenset(value)
    for pin in sorted(pins, key=repr):
        if isinstance(pin, bool) or not isinstance(pin, int) or pin < 1:
            raise ConfigError("keep.pinned", f"versions are whole numbers >= 1, not {pin!r}")
    return pins


def _load_zone(name: object) -> datetime.tzinfo:
    if name == "UTC":  # needs no tz database, so the default works everywhere
        return datetime.UTC
    if not isinstance(name, str):
        raise ConfigError("keep.timezone", f"must be an IANA zone name, not {name!r}")
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError("keep.timezone", f"unknown IANA zone {name!r}") from exc


def _ordered(candidates: Iterable[Candidate]) -> list[Candidate]:
    snaps = sorted(candidates, key=lambda snap: snap.version, reverse=True)
    for newer, older in itertools.pairwise(snaps):
        if newer.version == older.version:
            raise UsageError(f"version {newer.version} is listed twice")
    for snap in snaps:
        if snap.created.utcoffset() is None:
            raise UsageError(f"version {snap.version}: created time has no timezone")
    return snaps


# --- rules --------------------------------------------------------------------------

_Reasons = Iterator[tuple[int, str]]


def _all_reasons(snaps: Sequence[Candidate], policy: Policy) -> _Reasons:
    if not snaps:
        return
    yield snaps[0].version, "newest"
    yield from _last(snaps, policy.last)
    zone = policy.zone
    for name, key in _BUCKETS:
        yield from _calendar(snaps, name, key, getattr(policy, name), zone)
    if policy.within is not None:
        yield from _within(snaps, policy.within)
    yield from ((snap.version, "pinned") for snap in snaps if snap.version in policy.pinned)


def _last(snaps: Sequence[Candidate], count: int) -> _Reasons:
    for rank, snap in enumerate(snaps[:count], start=1):
        yield snap.version, f"last {rank}/{count}"


def _calendar(
    snaps: Sequence[Candidate],
    name: str,
    key: Callable[[datetime.datetime], str],
    count: int,
    zone: datetime.tzinfo,
) -> _Reasons:
    seen: set[str] = set()
    for snap in snaps:
        if len(seen) >= count:
            return
        bucket = key(snap.created.astimezone(zone))
        if bucket not in seen:
            seen.add(bucket)
            yield snap.version, f"{name} {bucket} ({len(seen)}/{count})"


def _within(snaps: Sequence[Candidate], span: datetime.timedelta) -> _Reasons:
    anchor = snaps[0].created
    reason = f"within {_duration(span)} of newest"
    for snap in snaps:
        if anchor - snap.created <= span:
            yield snap.version, reason


# --- buckets and words --------------------------------------------------------------


def _hour(local: datetime.datetime) -> str:
    return local.isoformat(timespec="hours")  # 2026-10-25T02+01:00: the offset is part of it


def _week(local: datetime.datetime) -> str:
    iso = local.isocalendar()
    return f"{iso.year}-W{iso.week:02d}"


_BUCKETS: tuple[tuple[str, Callable[[datetime.datetime], str]], ...] = (
    ("hourly", _hour),
    ("daily", lambda local: local.date().isoformat()),
    ("weekly", _week),
    ("monthly", lambda local: f"{local.year:04d}-{local.month:02d}"),
    ("yearly", lambda local: f"{local.year:04d}"),
)

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def _duration(span: datetime.timedelta) -> str:
    """``2 days``, ``1 day 12 hours``, ``1 minute 30 seconds``; sub-second spans as str()."""
    if span.microseconds:
        return str(span)
    left = int(span.total_seconds())
    parts = []
    for unit, size in _UNITS:
        amount, left = divmod(left, size)
        if amount:
            parts.append(f"{amount} {unit}{'' if amount == 1 else 's'}")
    return " ".join(parts)
