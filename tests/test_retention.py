"""Golden tests for the retention engine: exact kept sets, exact reasons, exact errors."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from snapshotd.errors import ConfigError, UsageError
from snapshotd.retention import Candidate, Decision, Policy, plan

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
BERLIN = "Europe/Berlin"


@dataclass(frozen=True)
class Snap:
    version: int
    created: datetime


def at(text: str) -> datetime:
    """An aware datetime from ISO text; a bare time is UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def series(first: str, step: timedelta, count: int) -> list[Snap]:
    """Versions 1..count, created ``step`` apart starting at ``first``."""
    return [Snap(i + 1, at(first) + i * step) for i in range(count)]


def listed(*times: str) -> list[Snap]:
    """Versions 1..n in the order given, created at the given times."""
    return [Snap(i + 1, at(text)) for i, text in enumerate(times)]


def kept(snaps: list[Snap], policy: Policy) -> set[int]:
    return {d.version for d in plan(snaps, policy) if d.keep}


def reasons(snaps: list[Snap], policy: Policy) -> dict[int, tuple[str, ...]]:
    return {d.version: d.reasons for d in plan(snaps, policy)}


def test_snap_is_a_candidate() -> None:
    candidate: Candidate = Snap(1, at("2026-01-01T00:00"))
    assert candidate.version == 1


# --- one rule at a time ------------------------------------------------------------

FIVE_DAYS = series("2026-01-01T12:00", DAY, 5)
EVERY_20_MIN = series("2026-01-01T10:00", timedelta(minutes=20), 9)  # 10:00 .. 12:40
TWICE_A_DAY = series("2026-01-01T06:00", 12 * HOUR, 8)  # 06:00 and 18:00, Jan 1..4
# Mon 2026-01-05 .. Wed 2026-01-21: ISO weeks W02 (v1-7), W03 (v8-14), W04 (v15-17)
SEVENTEEN_DAYS = series("2026-01-05T12:00", DAY, 17)
MONTHS = listed("2026-01-10", "2026-01-20", "2026-02-10", "2026-02-20", "2026-03-10", "2026-03-20")
YEARS = listed("2023-06-01", "2024-01-01", "2024-12-31T23:00", "2025-03-01", "2026-02-01")

SINGLE_RULE_TABLE = [
    ("last 1", FIVE_DAYS, Policy(last=1), {5}),
    ("last 3", FIVE_DAYS, Policy(last=3), {5, 4, 3}),
    ("last more than exist", FIVE_DAYS, Policy(last=9), {5, 4, 3, 2, 1}),
    ("hourly 2: newest of 12h and 11h", EVERY_20_MIN, Policy(hourly=2), {9, 6}),
    ("hourly 5: only 3 hours exist", EVERY_20_MIN, Policy(hourly=5), {9, 6, 3}),
    ("daily 3: the 18:00 ones", TWICE_A_DAY, Policy(daily=3), {8, 6, 4}),
    ("weekly 2", SEVENTEEN_DAYS, Policy(weekly=2), {17, 14}),
    ("weekly 3: Sundays represent full weeks", SEVENTEEN_DAYS, Policy(weekly=3), {17, 14, 7}),
    ("monthly 2", MONTHS, Policy(monthly=2), {6, 4}),
    ("monthly 3", MONTHS, Policy(monthly=3), {6, 4, 2}),
    ("yearly 3", YEARS, Policy(yearly=3), {5, 4, 3}),
    ("yearly 9: one per year", YEARS, Policy(yearly=9), {5, 4, 3, 1}),
]


@pytest.mark.parametrize(
    ("snaps", "policy", "expected"),
    [row[1:] for row in SINGLE_RULE_TABLE],
    ids=[row[0] for row in SINGLE_RULE_TABLE],
)
def test_single_rule_keeps_exactly(snaps: list[Snap], policy: Policy, expected: set[int]) -> None:
    assert kept(snaps, policy) == expected


# --- rules together ----------------------------------------------------------------

# Mon 2026-01-05 (v1) .. Wed 2026-01-14 (v10)
TEN_DAYS = series("2026-01-05T12:00", DAY, 10)


def test_a_daily_keep_also_counts_for_weekly() -> None:
    # weekly's first slot is Wed 01-14, which daily keeps too; borg would skip it
    # and reach back one more week, we (like restic) do not.
    assert kept(TEN_DAYS, Policy(daily=2, weekly=2)) == {10, 9, 7}
    assert reasons(TEN_DAYS, Policy(daily=2, weekly=2))[10] == (
        "newest",
        "daily 2026-01-14 (1/2)",
        "weekly 2026-W03 (1/2)",
    )


def test_sixty_dailies_with_daily_7_weekly_4() -> None:
    # 60 dailies at 12:00 ending Wed 2026-01-14 (v60). restic keeps 9: the 7 dailies
    # 01-08..01-14, whose Wed 01-14 and Sun 01-11 already fill two weeklies, plus
    # Sun 01-04 (v50) and Sun 12-28 (v43). borg keeps 11, snapper 10. We keep restic's 9.
    snaps = series("2025-11-16T12:00", DAY, 60)
    assert snaps[-1].created == at("2026-01-14T12:00")
    assert kept(snaps, Policy(daily=7, weekly=4)) == {60, 59, 58, 57, 56, 55, 54, 50, 43}


def test_empty_buckets_do_not_count() -> None:
    snaps = listed("2026-01-01", "2026-01-02", "2026-01-05", "2026-01-09", "2026-01-10")
    assert kept(snaps, Policy(daily=4)) == {5, 4, 3, 2}


def test_within_is_measured_from_the_newest_not_from_now() -> None:
    # years old: measured from now nothing would be within 2 days
    snaps = listed("2019-03-01", "2019-03-08", "2019-03-09", "2019-03-10")
    assert kept(snaps, Policy(within=2 * DAY)) == {4, 3, 2}  # exactly 2 days is within
    assert kept(snaps, Policy(within=47 * HOUR)) == {4, 3}


def test_pinned_versions_are_kept_and_unknown_pins_ignored() -> None:
    snaps = series("2026-01-01T12:00", DAY, 6)
    assert kept(snaps, Policy(last=1, pinned=frozenset({2, 5, 99}))) == {6, 5, 2}


def test_newest_is_kept_even_when_only_an_old_pin_is_set() -> None:
    snaps = series("2026-01-01T12:00", DAY, 6)
    assert reasons(snaps, Policy(pinned=frozenset({1}))) == {
        6: ("newest",),
        5: (),
        4: (),
        3: (),
        2: (),
        1: ("pinned",),
    }


def test_newest_is_kept_even_when_within_is_tiny() -> None:
    snaps = series("2026-01-01T12:00", DAY, 3)
    assert kept(snaps, Policy(within=timedelta(microseconds=1))) == {3}


def test_every_reason_in_a_fixed_order() -> None:
    snaps = series("2026-11-25T12:00", DAY, 4)
    policy = Policy(last=1, daily=2, within=2 * DAY, pinned=frozenset({1}))
    assert plan(snaps, policy) == [
        Decision(
            4,
            True,
            ("newest", "last 1/1", "daily 2026-11-28 (1/2)", "within 2 days of newest"),
        ),
        Decision(3, True, ("daily 2026-11-27 (2/2)", "within 2 days of newest")),
        Decision(2, True, ("within 2 days of newest",)),
        Decision(1, True, ("pinned",)),
    ]


def test_bucket_labels() -> None:
    snaps = listed("2026-11-28T12:34")
    policy = Policy(hourly=1, weekly=1, monthly=1, yearly=1, within=36 * HOUR)
    assert reasons(snaps, policy)[1] == (
        "newest",
        "hourly 2026-11-28T12+00:00 (1/1)",
        "weekly 2026-W48 (1/1)",
        "monthly 2026-11 (1/1)",
        "yearly 2026 (1/1)",
        "within 1 day 12 hours of newest",
    )


def test_dropped_versions_have_no_reason() -> None:
    decisions = plan(FIVE_DAYS, Policy(last=2))
    assert [(d.version, d.keep, d.reasons) for d in decisions[2:]] == [
        (3, False, ()),
        (2, False, ()),
        (1, False, ()),
    ]


def test_output_is_newest_version_first_whatever_the_input_order() -> None:
    snaps = series("2026-01-01T12:00", 7 * HOUR, 30)
    policy = Policy(last=2, hourly=3, daily=2, weekly=2, within=DAY)
    shuffled = snaps[:]
    random.Random(7).shuffle(shuffled)
    assert plan(shuffled, policy) == plan(snaps, policy)
    assert [d.version for d in plan(shuffled, policy)] == list(range(30, 0, -1))


def test_no_candidates_no_decisions() -> None:
    assert plan([], Policy(last=1)) == []


# --- time zones and DST ------------------------------------------------------------

# Europe/Berlin falls back on Sun 2026-10-25 at 01:00 UTC (03:00 CEST -> 02:00 CET)
FALL_BACK = series("2026-10-24T23:00", timedelta(minutes=30), 8)  # 01:00+02 .. 03:30+01


def hourly_reasons(snaps: list[Snap], policy: Policy) -> dict[int, str]:
    return {
        d.version: reason
        for d in plan(snaps, policy)
        for reason in d.reasons
        if reason.startswith("hourly")
    }


def test_dst_end_repeated_hour_is_two_buckets() -> None:
    assert hourly_reasons(FALL_BACK, Policy(hourly=24, timezone=BERLIN)) == {
        8: "hourly 2026-10-25T03+01:00 (1/24)",
        6: "hourly 2026-10-25T02+01:00 (2/24)",
        4: "hourly 2026-10-25T02+02:00 (3/24)",
        2: "hourly 2026-10-25T01+02:00 (4/24)",
    }
    assert kept(FALL_BACK, Policy(hourly=3, timezone=BERLIN)) == {8, 6, 4}


def test_dst_end_day_has_25_hourly_buckets_and_one_daily() -> None:
    day = series("2026-10-24T22:00", HOUR, 25)  # 00:00+02 .. 23:00+01 local
    assert len(kept(day, Policy(hourly=100, timezone=BERLIN))) == 25
    assert kept(day, Policy(daily=9, timezone=BERLIN)) == {25}
    assert kept(day, Policy(daily=9)) == {25, 2}  # in UTC the first two are on 10-24


# Europe/Berlin springs forward on Sun 2026-03-29 at 01:00 UTC (02:00 CET -> 03:00 CEST)
SPRING_FORWARD = series("2026-03-29T00:00", timedelta(minutes=30), 5)  # 01:00+01 .. 04:00+02


def test_dst_start_skipped_hour_is_no_bucket() -> None:
    assert hourly_reasons(SPRING_FORWARD, Policy(hourly=3, timezone=BERLIN)) == {
        5: "hourly 2026-03-29T04+02:00 (1/3)",
        4: "hourly 2026-03-29T03+02:00 (2/3)",
        2: "hourly 2026-03-29T01+01:00 (3/3)",
    }
    day = series("2026-03-28T23:00", HOUR, 23)  # 00:00+01 .. 23:00+02 local
    assert len(kept(day, Policy(hourly=100, timezone=BERLIN))) == 23
    assert kept(day, Policy(daily=9, timezone=BERLIN)) == {23}


def test_week_bucket_follows_the_zone() -> None:
    # Sun 23:30 UTC after the fall-back is Mon 00:30 in Berlin: a new ISO week there
    snaps = listed("2026-10-20T12:00", "2026-10-25T23:30")
    assert kept(snaps, Policy(weekly=2)) == {2}
    assert kept(snaps, Policy(weekly=2, timezone=BERLIN)) == {2, 1}


def test_year_bucket_follows_the_zone() -> None:
    snaps = listed("2024-06-01", "2024-12-31T23:30", "2025-06-01")
    assert kept(snaps, Policy(yearly=2)) == {3, 2}
    assert kept(snaps, Policy(yearly=2, timezone=BERLIN)) == {3, 1}  # v2 is 2025 there


def test_offsets_in_the_input_do_not_matter() -> None:
    utc = listed("2026-10-25T00:30", "2026-10-25T01:30")
    local = listed("2026-10-25T02:30+02:00", "2026-10-25T02:30+01:00")
    policy = Policy(hourly=5, timezone=BERLIN)
    assert plan(utc, policy) == plan(local, policy)


# --- clocks that jump backwards ----------------------------------------------------

# versions keep rising while the clock went back a day after v3
DAY_JUMP = listed(
    "2026-01-01T12:00",
    "2026-01-02T12:00",
    "2026-01-03T12:00",
    "2026-01-02T13:00",
    "2026-01-02T14:00",
    "2026-01-03T09:00",
)
# the clock went back 25 minutes after v2
HOUR_JUMP = listed("2026-01-01T10:05", "2026-01-01T11:05", "2026-01-01T10:40", "2026-01-01T11:20")

CLOCK_JUMP_TABLE = [
    ("newest is the highest version", DAY_JUMP, Policy(last=1), {6}),
    ("a bucket is represented once", DAY_JUMP, Policy(daily=2), {6, 5}),
    ("seen buckets are not recounted", DAY_JUMP, Policy(daily=3), {6, 5, 1}),
    ("later than newest is within", DAY_JUMP, Policy(within=HOUR), {6, 3}),
    ("within reaches back from newest", DAY_JUMP, Policy(within=19 * HOUR), {6, 5, 3}),
    ("hourly 1", HOUR_JUMP, Policy(hourly=1), {4}),
    ("hourly by own timestamp", HOUR_JUMP, Policy(hourly=2), {4, 3}),
]


@pytest.mark.parametrize(
    ("snaps", "policy", "expected"),
    [row[1:] for row in CLOCK_JUMP_TABLE],
    ids=[row[0] for row in CLOCK_JUMP_TABLE],
)
def test_clock_jumped_backwards(snaps: list[Snap], policy: Policy, expected: set[int]) -> None:
    assert kept(snaps, policy) == expected


# --- validation --------------------------------------------------------------------

INVALID_TABLE: list[tuple[dict[str, Any], str]] = [
    ({"last": -1}, "keep.last"),
    ({"hourly": -3}, "keep.hourly"),
    ({"daily": True}, "keep.daily"),
    ({"weekly": 1.5}, "keep.weekly"),
    ({"monthly": "3"}, "keep.monthly"),
    ({"yearly": -1, "last": 1}, "keep.yearly"),
    ({"within": timedelta(0)}, "keep.within"),
    ({"within": -HOUR}, "keep.within"),
    ({"within": 3600}, "keep.within"),
    ({"pinned": frozenset({0})}, "keep.pinned"),
    ({"pinned": frozenset({True})}, "keep.pinned"),
    ({"pinned": "12"}, "keep.pinned"),
    ({"pinned": 3}, "keep.pinned"),
    ({"last": 1, "timezone": "Mars/Olympus_Mons"}, "keep.timezone"),
    ({"last": 1, "timezone": ""}, "keep.timezone"),
    ({"last": 1, "timezone": "../etc/passwd"}, "keep.timezone"),
    ({"last": 1, "timezone": None}, "keep.timezone"),
    ({}, "keep"),
    ({"last": 0, "daily": 0, "pinned": frozenset()}, "keep"),
]


@pytest.mark.parametrize(("kwargs", "key_path"), INVALID_TABLE)
def test_invalid_policy(kwargs: dict[str, Any], key_path: str) -> None:
    with pytest.raises(ConfigError) as info:
        Policy(**kwargs)
    assert info.value.key_path == key_path


@pytest.mark.parametrize("kwargs", [{}, {"last": 0}, {"last": 0, "daily": 0}])
def test_empty_policy_says_why_and_what_to_set(kwargs: dict[str, Any]) -> None:
    # keep: {last: 0} is written, but keeps nothing: "no rule is set" would mislead.
    with pytest.raises(ConfigError, match="would delete everything but the newest") as info:
        Policy(**kwargs)
    assert "every count (last, hourly, daily, weekly, monthly, yearly) is 0" in str(info.value)
    assert "last: 1 keeps only the newest" in str(info.value)


VALID_TABLE: list[tuple[Policy, tuple[str, ...]]] = [
    (Policy(last=1), ("last 1",)),
    (Policy(pinned=frozenset({7, 3})), ("pinned 3, 7",)),
    (Policy(within=timedelta(minutes=90)), ("within 1 hour 30 minutes",)),
    (Policy(daily=7, weekly=4, timezone=BERLIN), ("daily 7", "weekly 4")),
]


@pytest.mark.parametrize(("policy", "rules"), VALID_TABLE)
def test_valid_policy_rules(policy: Policy, rules: tuple[str, ...]) -> None:
    assert policy.rules == rules


def test_pins_from_a_list_become_a_frozenset() -> None:
    pins: Any = [3, 3, 5]
    assert Policy(pinned=pins).pinned == frozenset({3, 5})


def test_policy_is_frozen_and_keyword_only() -> None:
    policy = Policy(last=1)
    with pytest.raises(AttributeError):
        policy.last = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Policy(1)  # type: ignore[call-arg]


def test_duplicate_versions_are_refused() -> None:
    with pytest.raises(UsageError, match="version 2 is listed twice"):
        plan([Snap(2, at("2026-01-01")), Snap(2, at("2026-01-02"))], Policy(last=1))


def test_naive_times_are_refused() -> None:
    with pytest.raises(UsageError, match="no timezone"):
        plan([Snap(1, datetime(2026, 1, 1))], Policy(last=1))


# --- properties --------------------------------------------------------------------

ZONES = ["UTC", BERLIN, "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    counts = {name: draw(st.integers(0, 6)) for name in COUNT_RULES}
    within = draw(st.none() | st.timedeltas(timedelta(seconds=1), timedelta(days=30)))
    pinned = draw(st.frozensets(st.integers(1, 40), max_size=4))
    assume(any(counts.values()) or within is not None or pinned)
    zone = draw(st.sampled_from(ZONES))
    return Policy(**counts, within=within, pinned=pinned, timezone=zone)


@st.composite
def histories(draw: st.DrawFn) -> list[Snap]:
    versions = draw(st.lists(st.integers(1, 40), unique=True, max_size=30))
    base = at("2026-10-01T00:00")  # spans the October DST change; clocks may jump anywhere
    offsets = st.integers(-3 * 86400, 90 * 86400).map(lambda s: timedelta(seconds=s))
    return [Snap(v, base + draw(offsets)) for v in versions]


@given(snaps=histories(), policy=policies())
def test_plan_invariants(snaps: list[Snap], policy: Policy) -> None:
    decisions = plan(snaps, policy)
    versions = [d.version for d in decisions]
    assert versions == sorted((s.version for s in snaps), reverse=True)
    assert all(d.keep == bool(d.reasons) for d in decisions)
    if decisions:
        assert decisions[0].keep
        assert decisions[0].reasons[0] == "newest"
    assert {d.version for d in decisions if "pinned" in d.reasons} == policy.pinned & set(versions)
    assert all(d.keep for d in decisions if d.version in policy.pinned)
    assert sum(d.keep for d in decisions) >= min(policy.last, len(decisions))
    for name in COUNT_RULES:
        used = sum(r.startswith(name + " ") for d in decisions for r in d.reasons)
        assert used <= getattr(policy, name)
    assert plan(list(reversed(snaps)), policy) == decisions
