"""snapshotd.config: YAML text in, frozen validated values out (SPEC §4)."""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from snapshotd.config import (
    Config,
    Override,
    Schedule,
    default_path,
    differences,
    format_duration,
    load,
    normalize_cron,
    parse,
    parse_duration,
    runtime_dir_of,
)
from snapshotd.errors import ConfigError
from snapshotd.retention import Policy

td = datetime.timedelta

SPEC_EXAMPLE = """\
store: ./snapshots          # required: where snapshots live
runtime_dir: ./run          # optional: where experiments and the daemon meet
schedule:
  every: 10m                # durations: 500ms, 30s, 10m, 2h, 1d; or cron: "*/15 * * * *"
keep:                       # retention; rules are a union
  last: 5
  hourly: 24                # also daily, weekly, monthly, yearly
  within: 2d
experiments:                # optional overrides by name pattern (glob), first match wins
  "mnist-*":
    schedule: {every: 30s}
    keep: {last: 10}
"""


# --- whole documents ----------------------------------------------------------------


def test_spec_example_parses_into_the_expected_values(tmp_path: Path) -> None:
    config = parse(SPEC_EXAMPLE, base_dir=tmp_path)
    assert config == Config(
        store=tmp_path / "snapshots",
        runtime_dir=tmp_path / "run",
        schedule=Schedule(every=td(minutes=10)),
        keep=Policy(last=5, hourly=24, within=td(days=2)),
        experiments=(
            Override(
                pattern="mnist-*", schedule=Schedule(every=td(seconds=30)), keep=Policy(last=10)
            ),
        ),
        source=None,
    )


def test_absent_sections_take_the_documented_defaults(tmp_path: Path) -> None:
    config = parse("store: /srv/snapshots\n", base_dir=tmp_path)
    assert config.store == Path("/srv/snapshots")
    assert config.runtime_dir is None
    assert config.schedule == Schedule(every=td(minutes=10))
    assert config.keep == Policy(last=5)
    assert config.experiments == ()


def test_a_full_keep_section_is_read_key_by_key(tmp_path: Path) -> None:
    text = """\
store: s
keep: {last: 1, hourly: 2, daily: 3, weekly: 4, monthly: 5, yearly: 6, within: 1w,
       pinned: [7, 3], timezone: Europe/Berlin}
schedule: {cron: "0 3 * * mon-fri"}
"""
    config = parse(text, base_dir=tmp_path)
    assert config.keep == Policy(
        last=1,
        hourly=2,
        daily=3,
        weekly=4,
        monthly=5,
        yearly=6,
        within=td(weeks=1),
        pinned=frozenset({3, 7}),
        timezone="Europe/Berlin",
    )
    assert config.schedule.cron == "0 3 * * mon,tue,wed,thu,fri"


OVERRIDES = """\
store: s
schedule: {every: 1h}
keep: {daily: 7}
experiments:
  "mnist-debug-*": {}
  "mnist-*": {schedule: {every: 30s}}
  "*-lr": {keep: {last: 10}}
  "[ab]?": {schedule: {cron: "0 * * * *"}, keep: {last: 1}}
"""


@pytest.mark.parametrize(
    ("name", "schedule", "keep"),
    [
        pytest.param("mnist-lr", Schedule(every=td(seconds=30)), Policy(daily=7), id="first-wins"),
        pytest.param("mnist-debug-3", Schedule(every=td(hours=1)), Policy(daily=7), id="empty"),
        pytest.param("cifar-lr", Schedule(every=td(hours=1)), Policy(last=10), id="keep-only"),
        pytest.param("a1", Schedule(cron="0 * * * *"), Policy(last=1), id="char-class"),
        pytest.param("MNIST-x", Schedule(every=td(hours=1)), Policy(daily=7), id="case-sensitive"),
        pytest.param("other", Schedule(every=td(hours=1)), Policy(daily=7), id="no-match"),
    ],
)
def test_overrides_first_match_wins_and_replace_whole_sections(
    tmp_path: Path, name: str, schedule: Schedule, keep: Policy
) -> None:
    config = parse(OVERRIDES, base_dir=tmp_path)
    assert [o.pattern for o in config.experiments] == ["mnist-debug-*", "mnist-*", "*-lr", "[ab]?"]
    assert config.for_experiment(name) == (schedule, keep)


def test_load_resolves_relative_paths_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "etc" / "snap.yaml").write_text("store: ./snapshots\nruntime_dir: ../run\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = load(Path("../etc/snap.yaml"))
    assert config.source is not None
    assert config.source.resolve() == tmp_path / "etc" / "snap.yaml"
    assert config.store.is_absolute()
    assert config.store.resolve() == tmp_path / "etc" / "snapshots"
    assert config.runtime_dir is not None
    assert config.runtime_dir.resolve() == tmp_path / "run"


def test_tilde_is_expanded_and_absolute_paths_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = parse("store: ~/snaps\nruntime_dir: /run/x\n", base_dir=tmp_path / "cfg")
    assert config.store == tmp_path / "home" / "snaps"
    assert config.runtime_dir == Path("/run/x")


# --- durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("500ms", td(milliseconds=500), id="ms"),
        pytest.param("30s", td(seconds=30), id="s"),
        pytest.param("10m", td(minutes=10), id="m"),
        pytest.param("2h", td(hours=2), id="h"),
        pytest.param("1d", td(days=1), id="d"),
        pytest.param("1w", td(weeks=1), id="w"),
        pytest.param("2h30m", td(hours=2, minutes=30), id="compound"),
        pytest.param(
            "1d2h3m4s5ms", td(days=1, hours=2, minutes=3, seconds=4, milliseconds=5), id="all"
        ),
        pytest.param(" 90s ", td(seconds=90), id="spaces-around"),
        pytest.param(30, td(seconds=30), id="int-seconds"),
        pytest.param(0.25, td(milliseconds=250), id="float-seconds"),
    ],
)
def test_valid_durations(text: str | int | float, expected: datetime.timedelta) -> None:
    assert parse_duration(text, "schedule.every") == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param("10 minutes", "'10 minutes'", id="words"),
        pytest.param("-5s", "'-5s'", id="negative"),
        pytest.param("0s", "positive", id="zero"),
        pytest.param(0, "positive", id="zero-number"),
        pytest.param(-1.5, "positive", id="negative-number"),
        pytest.param("1.5h", "'1.5h'", id="fraction"),
        pytest.param("30", "string '30'", id="string-without-unit"),
        pytest.param("1m2h", "'1m2h'", id="wrong-order"),
        pytest.param("10M", "'10M'", id="upper-case"),
        pytest.param("", "string ''", id="empty"),
        pytest.param("\u0663s", "string", id="non-ascii-digit"),
        pytest.param(True, "boolean True", id="bool"),
        pytest.param(float("nan"), "nan", id="nan"),
        pytest.param(0.0001, "whole ms", id="sub-millisecond"),
        pytest.param("99999999999999w", "too long", id="overflow"),
        pytest.param([1], "list [1]", id="list"),
    ],
)
def test_invalid_durations_name_the_value_and_the_expected_form(
    value: object, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(value, "keep.within")  # type: ignore[arg-type]
    assert caught.value.key_path == "keep.within"
    assert fragment in str(caught.value)
    if "too long" not in fragment:
        assert "500ms, 30s, 10m, 2h, 1d" in str(caught.value)


@pytest.mark.parametrize(
    ("span", "text"),
    [
        pytest.param(td(minutes=10), "10m", id="10m"),
        pytest.param(td(milliseconds=500), "500ms", id="500ms"),
        pytest.param(td(hours=2, minutes=30), "2h30m", id="2h30m"),
        pytest.param(td(days=9, seconds=1), "9d1s", id="days"),
        pytest.param(td(0), "0s", id="zero"),
        pytest.param(td(microseconds=1500), "1ms500us", id="sub-ms"),
        pytest.param(-td(seconds=3), "-3s", id="negative"),
    ],
)
def test_format_duration(span: datetime.timedelta, text: str) -> None:
    assert format_duration(span) == text
    if span > td(0) and not span.microseconds % 1000:
        assert parse_duration(text, "x") == span


# --- cron ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        pytest.param("*/15 * * * *", "*/15 * * * *", id="every-15-minutes"),
        pytest.param("0 3 * * *", "0 3 * * *", id="daily"),
        pytest.param("0,30 9-17 * * *", "0,30 9-17 * * *", id="list-and-range"),
        pytest.param("0 0-23/6 1 * *", "0 0-23/6 1 * *", id="range-step"),
        pytest.param("0 0 1  jan,JUL *", "0 0 1 1,7 *", id="month-names"),
        pytest.param("0 0 * jan-jun/2 *", "0 0 * 1,3,5 *", id="month-name-range-step"),
        pytest.param("0 9 * * 1-5", "0 9 * * mon,tue,wed,thu,fri", id="weekday-numbers"),
        pytest.param("0 9 * * MON-Fri", "0 9 * * mon,tue,wed,thu,fri", id="weekday-names"),
        pytest.param("0 0 * * 0", "0 0 * * sun", id="sunday-0"),
        pytest.param("0 0 * * 7", "0 0 * * sun", id="sunday-7"),
        pytest.param("0 0 * * */2", "0 0 * * sun,tue,thu,sat", id="weekday-step"),
        pytest.param("0 0 */2 * mon", "0 0 */2 * mon", id="dom-star-step-and-dow"),
    ],
)
def test_valid_cron_is_normalized_for_apscheduler(text: str, normalized: str) -> None:
    assert normalize_cron(text, "schedule.cron") == normalized
    assert normalize_cron(normalized, "schedule.cron") == normalized  # idempotent
    assert Schedule(cron=text) == Schedule(cron=normalized)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("* * * *", "expected 5 fields", id="four-fields"),
        pytest.param("* * * * * *", "expected 5 fields", id="six-fields"),
        pytest.param("@daily", "'@daily'", id="macro"),
        pytest.param("60 * * * *", "60 is outside 0-59", id="minute-range"),
        pytest.param("* 24 * * *", "24 is outside 0-23", id="hour-range"),
        pytest.param("* * 0 * *", "0 is outside 1-31", id="day-range"),
        pytest.param("* * * 13 *", "13 is outside 1-12", id="month-range"),
        pytest.param("* * * * 8", "8 is outside 0-7", id="weekday-range"),
        pytest.param("* * * foo *", "unknown name 'foo'", id="month-name"),
        pytest.param("* * * * fri-sun", "runs backwards", id="backwards"),
        pytest.param("*/0 * * * *", "step 0", id="step-zero"),
        pytest.param("*/60 * * * *", "step 60", id="step-too-large"),
        pytest.param("5/10 * * * *", "'5/10'", id="start-slash-step"),
        pytest.param("L * * * *", "unknown name 'l'", id="letter"),
        pytest.param("1,,2 * * * *", "got ''", id="empty-item"),
        pytest.param("0 0 1 * mon", "both day of month and day of week", id="dom-or-dow"),
    ],
)
def test_invalid_cron_names_the_field_and_value(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        normalize_cron(text, "schedule.cron")
    assert caught.value.key_path == "schedule.cron"
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("text", "weekday"),
    [
        pytest.param("0 9 * * 1", 0, id="monday"),
        pytest.param("0 9 * * 0", 6, id="sunday"),
        pytest.param("0 9 * * 7", 6, id="sunday-7"),
        pytest.param("0 9 * * 5-6", 4, id="friday-first"),
    ],
)
def test_apscheduler_reads_the_normalized_weekday_as_cron_means_it(text: str, weekday: int) -> None:
    cron = pytest.importorskip("apscheduler.triggers.cron")
    trigger = cron.CronTrigger.from_crontab(normalize_cron(text, "c"), timezone="UTC")
    thursday = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    fire = trigger.get_next_fire_time(None, thursday)
    assert (fire.weekday(), fire.hour) == (weekday, 9)


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key_path", "fragments"),
    [
        pytest.param(
            "store: s\nstorage: x\n",
            "storage",
            ["'storage'", "store, runtime_dir"],
            id="unknown-top",
        ),
        pytest.param(
            "store: s\nschedule: {evry: 1m}\n",
            "schedule.evry",
            ["'evry'", "every, cron"],
            id="unknown-nested",
        ),
        pytest.param(
            'store: s\nexperiments: {"mnist-*": {keep: {lats: 3}}}\n',
            "experiments.mnist-*.keep.lats",
            ["'lats'", "last, hourly"],
            id="unknown-in-override",
        ),
        pytest.param("store: 5\n", "store", ["integer 5", "string"], id="type-top"),
        pytest.param(
            "store: s\nschedule: 10m\n", "schedule", ["string '10m'", "mapping"], id="type-section"
        ),
        pytest.param(
            "store: s\nkeep: {last: '5'}\n",
            "keep.last",
            ["string '5'", "whole number"],
            id="type-nested",
        ),
        pytest.param(
            'store: s\nexperiments: {"mnist-*": {schedule: {every: [1]}}}\n',
            "experiments.mnist-*.schedule.every",
            ["list [1]", "duration"],
            id="type-deep",
        ),
        pytest.param(
            "store: s\nexperiments: [a]\n",
            "experiments",
            ["list ['a']", "mapping"],
            id="type-experiments",
        ),
        pytest.param(
            "store: s\nexperiments: {a: 3}\n",
            "experiments.a",
            ["integer 3", "mapping"],
            id="type-override",
        ),
        pytest.param(
            "store: s\nkeep: {pinned: 3}\n", "keep.pinned", ["integer 3", "list"], id="type-pinned"
        ),
        pytest.param(
            "store: s\nkeep: {pinned: [1, x]}\n",
            "keep.pinned",
            ["string 'x'", "whole number"],
            id="type-pin",
        ),
        pytest.param(
            "store: s\nkeep: {timezone: 1}\n",
            "keep.timezone",
            ["integer 1", "string"],
            id="type-tz",
        ),
        pytest.param(
            "store: s\nkeep: {last: -1}\n", "keep.last", ["-1", "0 or more"], id="negative-count"
        ),
        pytest.param(
            'store: s\nexperiments: {"m-*": {keep: {last: -1}}}\n',
            "experiments.m-*.keep.last",
            ["-1", "0 or more"],
            id="negative-count-in-override",
        ),
        pytest.param("store: s\nkeep: {}\n", "keep", ["no rule"], id="empty-keep"),
        pytest.param(
            "store: s\nkeep: {timezone: Mars/Base}\n",
            "keep.timezone",
            ["'Mars/Base'"],
            id="bad-zone",
        ),
        pytest.param("store: s\nkeep:\n", "keep", ["no value"], id="null-section"),
        pytest.param("store: ''\n", "store", ["string ''", "non-empty"], id="empty-store"),
        pytest.param(
            "schedule: {every: 1m}\n",
            "store",
            ["missing", "store: ./snapshots"],
            id="missing-store",
        ),
        pytest.param(
            "store: s\nschedule: {every: 1m, cron: '* * * * *'}\n",
            "schedule",
            ["exactly one of every or cron", "both"],
            id="every-and-cron",
        ),
        pytest.param(
            "store: s\nschedule: {}\n", "schedule", ["exactly one", "neither"], id="no-schedule"
        ),
        pytest.param(
            "store: s\nschedule: {every: 0s}\n",
            "schedule.every",
            ["'0s'", "positive"],
            id="zero-every",
        ),
        pytest.param(
            "store: s\nschedule: {cron: '61 * * * *'}\n",
            "schedule.cron",
            ["'61'", "0-59"],
            id="bad-cron",
        ),
        pytest.param(
            "store: s\nexperiments: {1: {}}\n",
            "experiments.1",
            ["integer 1", "pattern"],
            id="glob-int",
        ),
        pytest.param(
            "store: s\nexperiments: {no: {}}\n",
            "experiments.False",
            ["boolean False", "pattern"],
            id="glob-bool",
        ),
        pytest.param(
            "store: s\nexperiments: {'': {}}\n",
            "experiments.",
            ["string ''", "pattern"],
            id="glob-empty",
        ),
        pytest.param("store: a\nstore: b\n", "store", ["duplicate", "line 2"], id="duplicate-top"),
        pytest.param(
            "store: s\nexperiments:\n  a*: {}\n  b*: {}\n  a*: {keep: {last: 1}}\n",
            "experiments.a*",
            ["duplicate", "line 5"],
            id="duplicate-pattern",
        ),
        pytest.param(
            "store: [a, b\nkeep: {}\n", "", ["invalid YAML", "line 2, column"], id="syntax"
        ),
        pytest.param("store: a\n\tkeep: {}\n", "", ["invalid YAML", "line 2"], id="tab-indent"),
        pytest.param("", "", ["empty", "store:"], id="empty-document"),
        pytest.param("# nothing here\n", "", ["empty"], id="comments-only"),
        pytest.param("- store\n- s\n", "", ["list ['store', 's']", "mapping"], id="top-list"),
        pytest.param("just text\n", "", ["string 'just text'", "mapping"], id="top-scalar"),
        pytest.param("store: " + "[" * 5000, "", ["invalid YAML"], id="deep-nesting"),
    ],
)
def test_config_errors_name_the_key_path_and_the_value(
    tmp_path: Path, text: str, key_path: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, base_dir=tmp_path)
    assert caught.value.key_path == key_path
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "tag",
    [
        pytest.param("!!python/object/apply:os.system", id="apply"),
        pytest.param("!!python/object/new:os.system", id="new"),
        pytest.param("!python/object/apply:os.system", id="local-tag"),
    ],
)
def test_python_tags_are_refused_not_executed(tmp_path: Path, tag: str) -> None:
    canary = tmp_path / "CANARY"
    config_file = tmp_path / "evil.yaml"
    config_file.write_text(f'store: {tag} ["touch {canary}"]\n')
    with pytest.raises(ConfigError) as caught:
        load(config_file)
    assert caught.value.key_path == "store"
    assert "line 1" in str(caught.value)
    assert tag.lstrip("!").split(":")[0] in str(caught.value)
    assert not canary.exists()


def test_an_alias_bomb_is_reported_briefly(tmp_path: Path) -> None:
    rows = ["  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError) as caught:
        parse("store:\n" + "\n".join(rows) + "\n", base_dir=tmp_path)
    assert caught.value.key_path == "store"
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        pytest.param(lambda d: d / "missing.yaml", "missing.yaml", id="missing"),
        pytest.param(lambda d: d, "directory", id="directory"),
        pytest.param(
            lambda d: _write(d / "latin1.yaml", b"store: caf\xe9\n"), "UTF-8", id="not-utf8"
        ),
    ],
)
def test_an_unreadable_file_says_what_to_do(
    tmp_path: Path, make: Callable[[Path], Path], fragment: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key_path == ""
    message = str(caught.value)
    assert fragment in message
    assert "pass --config FILE or set SNAPSHOTD_CONFIG" in message


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- value classes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "key_path"),
    [
        pytest.param(lambda: Schedule(), "schedule", id="schedule-empty"),
        pytest.param(lambda: Schedule(every=td(0)), "schedule.every", id="schedule-zero"),
        pytest.param(lambda: Schedule(cron="bad"), "schedule.cron", id="schedule-cron"),
        pytest.param(
            lambda: Schedule(every=td(seconds=1), cron="* * * * *"), "schedule", id="schedule-both"
        ),
        pytest.param(lambda: Override(pattern=""), "experiments", id="override-pattern"),
        pytest.param(
            lambda: Config(store="s"),  # type: ignore[arg-type]
            "store",
            id="config-store-str",
        ),
    ],
)
def test_invalid_values_cannot_be_constructed(build: Callable[[], object], key_path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build()
    assert caught.value.key_path == key_path


def test_values_are_frozen(tmp_path: Path) -> None:
    config = parse(SPEC_EXAMPLE, base_dir=tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.store = tmp_path  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.schedule.every = td(1)  # type: ignore[misc]


# --- default path -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, Path("/etc/snapshotd/snapshotd.yaml"), id="unset"),
        pytest.param({"SNAPSHOTD_CONFIG": ""}, Path("/etc/snapshotd/snapshotd.yaml"), id="empty"),
        pytest.param({"SNAPSHOTD_CONFIG": "exp.yaml"}, Path("exp.yaml"), id="set"),
        pytest.param({"OTHER": "x.yaml"}, Path("/etc/snapshotd/snapshotd.yaml"), id="other-var"),
    ],
)
def test_default_path(environ: dict[str, str], expected: Path) -> None:
    assert default_path(environ) == expected


# --- the shipped example, and the daemon section's forgiving spellings --------------

EXAMPLE = Path(__file__).parents[1] / "config" / "example.yaml"


def test_the_shipped_example_loads_names_every_key_and_says_the_defaults() -> None:
    from snapshotd import config as configuration

    text = EXAMPLE.read_text()
    loaded = load(EXAMPLE)
    # "all optional, shown with their defaults"
    assert loaded.daemon == configuration.Daemon()
    keys = [*configuration._TOP, "every", "cron", *configuration._KEEP, *configuration._DAEMON]
    missing = [key for key in keys if not re.search(rf"^\s*#?\s*{key}:", text, re.MULTILINE)]
    assert missing == []
    every = configuration.DEFAULT_SCHEDULE.every
    assert every is not None
    assert f"Default: every {format_duration(every)}." in text
    assert Policy(last=5) == configuration.DEFAULT_KEEP
    assert "Default: last 5, and no other rule." in text


def test_jitter_of_zero_turns_it_off_where_other_durations_must_be_positive(
    tmp_path: Path,
) -> None:
    config = parse("store: x\ndaemon: {jitter: 0s}\n", base_dir=tmp_path)
    assert config.daemon.jitter == td(0)
    assert config.daemon.jitter_for(Schedule(every=td(minutes=10))) == 0.0
    for text, key in (
        ("daemon: {timeout: 0s}", "daemon.timeout: must be positive"),
        ("schedule: {every: 0s}", "schedule.every: must be positive"),
        ("daemon: {jitter: -1s}", "daemon.jitter"),
        ("daemon: {jitter: -1}", "daemon.jitter: must be positive"),
    ):
        with pytest.raises(ConfigError, match=re.escape(key)):
            parse(f"store: x\n{text}\n", base_dir=tmp_path)


def test_log_level_in_any_case(tmp_path: Path) -> None:
    assert parse("store: x\ndaemon: {log_level: INFO}\n", base_dir=tmp_path).daemon.log_level == (
        "info"
    )
    with pytest.raises(ConfigError, match=r"daemon\.log_level"):
        parse("store: x\ndaemon: {log_level: LOUD}\n", base_dir=tmp_path)


# -- reload support: what changed, and the runtime directory of a file being edited -----


def test_differences_name_the_keys_that_changed_and_nothing_else(tmp_path: Path) -> None:
    old = parse("store: s\nkeep: {last: 3}\n", base_dir=tmp_path)
    assert differences(old, old) == []
    assert differences(old, dataclasses.replace(old, source=tmp_path / "x.yaml")) == []
    new = parse(
        "store: s\nkeep: {last: 4}\nschedule: {every: 1h}\ndaemon: {rescan: 5s}\n",
        base_dir=tmp_path,
    )
    assert differences(old, new) == ["schedule", "keep", "daemon.rescan"]


def test_runtime_dir_of_reads_past_other_invalid_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store: s\nruntime_dir: run\nkeep: {hourli: 2}\n")
    with pytest.raises(ConfigError, match=r"keep\.hourli"):
        load(path)
    assert runtime_dir_of(path) == tmp_path / "run"
    path.write_text("store: s\nkeep: {hourli: 2}\n")
    assert runtime_dir_of(path) is None


@pytest.mark.parametrize(
    ("text", "key_path"),
    [("runtime_dir: [\n", ""), ("runtime_dir: 5\n", "runtime_dir"), ("[1]: 2\n", "")],
)
def test_runtime_dir_of_refuses_what_it_cannot_use_naming_the_file(
    tmp_path: Path, text: str, key_path: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        runtime_dir_of(path)
    assert caught.value.key_path == key_path
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize("name", ["missing.yaml", "."], ids=["missing", "directory"])
def test_load_and_runtime_dir_of_say_the_same_of_a_file_they_cannot_read(
    tmp_path: Path, name: str
) -> None:
    path = (tmp_path / name).absolute()
    with pytest.raises(ConfigError) as loading:
        load(path)
    with pytest.raises(ConfigError) as peeking:
        runtime_dir_of(path)
    assert str(loading.value) == str(peeking.value)
    assert isinstance(loading.value.__cause__, OSError), "the OS's error stays reachable"


def test_runtime_dir_of_a_missing_file_or_a_document_without_one(tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(missing))}: config: cannot read"):
        runtime_dir_of(missing)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert runtime_dir_of(listed) is None  # load() says what is wrong with it
