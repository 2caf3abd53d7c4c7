"""The ``snapshotd`` command line: parse, load the config, call the store or the daemon.

Exit codes are part of the interface; they live in :mod:`snapshotd.exitcode` with the
table of their meanings (docs and README repeat it). User errors print one line to
stderr starting with ``snapshotd:`` and never a traceback. ``--json`` on the read
commands prints one JSON document to stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from snapshotd import config as configuration
from snapshotd import control, exitcode, rendezvous
from snapshotd.errors import (
    ConfigError,
    DaemonError,
    NoSnapshot,
    PeerUnreachable,
    SnapshotdError,
    UsageError,
)
from snapshotd.names import check_name
from snapshotd.store import Check, Store, Version

__all__ = ["main"]

EXIT_OK = exitcode.OK
EXIT_BAD_SNAPSHOT = exitcode.BAD_SNAPSHOT
EXIT_USAGE = exitcode.USAGE
EXIT_STORE = exitcode.STORE
EXIT_NO_DAEMON = exitcode.NO_DAEMON

Handler = Callable[[argparse.Namespace, TextIO], int]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; return its exit code."""
    out = out or sys.stdout
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is the command of `restore NAME -- CMD ARGS...`,
    # taken out before parsing so that options may follow NAME in any order.
    command = words[words.index("--") + 1 :] if "--" in words else []
    words = words[: words.index("--")] if "--" in words else words
    parser = _parser()
    args = parser.parse_args(words)
    args.cmd = command
    if command and args.command != "restore":
        parser.error("'-- CMD ARGS...' goes with restore only")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _warnings_to(_print_warning)
        try:
            handler: Handler = args.handler
            return handler(args, out)
        except SnapshotdError as exc:
            print(f"snapshotd: {exc}", file=sys.stderr)
            return exitcode.of(exc)
        except BrokenPipeError:
            return EXIT_OK
        except OSError as exc:
            print(f"snapshotd: {exc}", file=sys.stderr)
            return EXIT_STORE


def _warnings_to(emit: Callable[[str], object]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that hands ``emit`` the message alone: a user reads what
    went wrong, not the line of snapshotd that noticed it."""

    def show(message: Warning | str, *where: object, **more: object) -> None:
        emit(str(message))

    return show


def _print_warning(text: str) -> None:
    print(f"snapshotd: warning: {text}", file=sys.stderr)


# -- parsing -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        help="config file (default: $SNAPSHOTD_CONFIG, then /etc/snapshotd/snapshotd.yaml)",
    )
    # Only for the commands that open a store themselves; the others ask the daemon, which
    # has its own, and would ignore it.
    with_store = argparse.ArgumentParser(add_help=False, parents=[common])
    with_store.add_argument("--store", type=Path, help="store directory (overrides the config's)")
    parser = argparse.ArgumentParser(
        prog="snapshotd",
        description="Periodic, versioned, crash-safe snapshots of running experiments.",
        epilog="exit codes: " + "; ".join(f"{code} {text}" for code, text in exitcode.MEANINGS),
    )
    parser.add_argument("--version", action="version", version=f"snapshotd {_installed()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, parent in (
        (_add_start, with_store),
        (_add_status, common),
        (_add_list, with_store),
        (_add_snapshot, common),
        (_add_restore, common),
        (_add_verify, with_store),
        (_add_prune, with_store),
        (_add_export, with_store),
    ):
        add(commands, parent)
    return parser


def _installed() -> str:
    try:
        return importlib.metadata.version("snapshotd")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(not installed)"


def _add_start(commands: Any, common: argparse.ArgumentParser) -> None:
    _command(
        commands,
        common,
        "start",
        "run the daemon in the foreground; SIGTERM or SIGINT stops it, SIGHUP or saving "
        "the config file reloads it",
        _start,
    )


def _add_status(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "status",
        "is the daemon up; experiments, last/next snapshot",
        _status,
    )
    sub.add_argument("--json", action="store_true", help="print JSON")


def _add_snapshot(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands, common, "snapshot", "take one snapshot now; print its version", _snapshot
    )
    sub.add_argument("name", help="experiment")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _add_restore(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "restore",
        "push the newest good (or given) snapshot into the running experiment NAME, "
        "or with -- CMD ARGS... start CMD so that its register() resumes from it",
        _restore,
    )
    sub.usage = (
        "snapshotd restore [-h] [--config CONFIG] [--version V] [--store STORE] NAME "
        "[--json | -- CMD ARGS...]"
    )
    sub.add_argument("name", help="experiment")
    sub.add_argument("--version", type=int, help="version (default: the newest good one)")
    sub.add_argument(
        "--store",
        type=Path,
        help="with -- CMD only: the store to resume from (overrides the config's); a "
        "running experiment is restored by its daemon, from the daemon's store",
    )
    sub.add_argument("--json", action="store_true", help="without -- CMD: print JSON")


def _command(
    commands: Any, common: argparse.ArgumentParser, name: str, help_text: str, handler: Handler
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name, parents=[common], help=help_text, description=help_text
    )
    sub.set_defaults(handler=handler)
    return sub


def _add_list(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(commands, common, "list", "list the versions of each experiment", _list)
    sub.add_argument("name", nargs="?", help="only this experiment")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _add_verify(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "verify",
        "re-read and check every snapshot (exit 1 if any is bad)",
        _verify,
    )
    sub.add_argument("name", nargs="?", help="only this experiment")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _add_prune(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "prune",
        "apply the retention policy now; say why each version is kept, deleted or moved "
        "to quarantine",
        _prune,
    )
    sub.add_argument("name", nargs="?", help="only this experiment")
    sub.add_argument("--dry-run", action="store_true", help="decide and print, delete nothing")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _add_export(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "export",
        "write one snapshot as .safetensors (the file itself, with its tree and metadata) "
        "or .npz (its arrays by name only)",
        _export,
    )
    sub.add_argument("name", help="experiment")
    sub.add_argument("--version", type=int, help="version (default: the newest good one)")
    sub.add_argument("-o", "--output", type=Path, required=True, help="FILE.safetensors|.npz")


# -- configuration -------------------------------------------------------------------


def _config_path(args: argparse.Namespace) -> Path:
    """``--config``, else the default (``$SNAPSHOTD_CONFIG``, then the system file)."""
    path: Path = args.config or configuration.default_path(os.environ)
    return path


def _load_config(args: argparse.Namespace) -> configuration.Config:
    return configuration.load(_config_path(args))


def _store(args: argparse.Namespace) -> Store:
    if args.store is not None and args.config is None:
        return Store(args.store)
    loaded = _load_config(args)
    return Store(args.store or loaded.store)


def _stored(store: Store) -> Store:
    """``store``, for a command that reads it: a store that is not there is an error, not
    an empty listing (a mistyped ``--store`` must not look like "nothing is wrong")."""
    if not store.root.is_dir():
        raise NoSnapshot(
            f"there is no store at {store.root}: check --store or the config's 'store' "
            "(snapshotd start makes it)"
        )
    return store


def _names(store: Store, name: str | None) -> list[str]:
    """``name`` if the store has a run of that name, else every run when none is given."""
    if name is None:
        return store.names()
    known = store.names()
    if check_name(name) not in known:
        runs = ", ".join(known) if known else "none yet"
        raise NoSnapshot(f"there is no run named {name!r} in {store.root} (runs: {runs})")
    return [name]


def _daemon_settings(args: argparse.Namespace) -> tuple[Path, float]:
    """The runtime directory the daemon uses, and how long it lets a snapshot wait for a
    safe point (seconds), from the config if there is one.

    A config that does not validate, as while it is being edited, is only warned about:
    the daemon keeps running on its last good one, and these commands need no more of
    the file than its ``runtime_dir``.
    """
    path = _config_path(args)
    if not (args.config or path.exists()):
        return rendezvous.runtime_dir(None, os.environ), _DEFAULT_TIMEOUT
    try:
        loaded = configuration.load(path)
    except ConfigError as exc:
        explicit = configuration.runtime_dir_of(path)  # raises when even that is unreadable
        _print_warning(
            f"{exc}; going on with its runtime_dir (a running daemon keeps its last good config)"
        )
        return rendezvous.runtime_dir(explicit, os.environ), _DEFAULT_TIMEOUT
    return rendezvous.runtime_dir(
        loaded.runtime_dir, os.environ
    ), loaded.daemon.timeout.total_seconds()


_DEFAULT_TIMEOUT = configuration.Daemon().timeout.total_seconds()


def _answer_within(timeout: float) -> float:
    """How long to wait for the daemon's answer to a snapshot or restore, given its
    ``daemon.timeout``: first the one already in flight may take that long, then this
    one, then the commit or the load."""
    return 2 * timeout + 60.0


def _call(
    args: argparse.Namespace, runtime: Path, verb: str, payload: dict[str, Any], timeout: float
) -> Any:
    try:
        return control.call(runtime, verb, payload, timeout=timeout)
    except PeerUnreachable as exc:
        start = "snapshotd start" + (f" --config {args.config}" if args.config else "")
        raise DaemonError(
            f"no daemon is running for {runtime} ({exc}); start it with: {start}",
            code=EXIT_NO_DAEMON,
        ) from exc


# -- commands ------------------------------------------------------------------------


def _start(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load_config(args)
    _configure_logging(loaded.daemon.log_level)
    # A bad snapshot skipped or quarantined is a warning in the daemon's log (with its
    # time and level, for journald), not a bare line on stderr.
    warnings.showwarning = _warnings_to(logging.getLogger("snapshotd").warning)
    from snapshotd.daemon import Daemon  # APScheduler and watchdog load only here

    daemon = Daemon(loaded, dict(os.environ), store=args.store)
    code = daemon.run()
    if daemon.abandoned:
        # A worker thread is still inside a commit we gave up on: do not wait for it.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def _configure_logging(level: str) -> None:
    # Under systemd, journald adds the time; on a terminal we add it ourselves.
    timed = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format=timed + "%(levelname)s %(name)s: %(message)s",
    )
    # APScheduler logs every job run at INFO, and watchdog every file event at DEBUG: our
    # own lines say what happened. (watchdog's would also feed themselves when the log
    # file is in a watched directory: each line written is another event to log.)
    for chatty in ("apscheduler", "watchdog"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _status(args: argparse.Namespace, out: TextIO) -> int:
    try:
        runtime, _wait = _daemon_settings(args)
        status = _call(args, runtime, "status", {}, timeout=10.0)
    except DaemonError as exc:
        if exc.code != EXIT_NO_DAEMON:
            raise
        if args.json:
            _print_json(out, {"running": False})
        else:
            print(f"daemon: not running ({exc})", file=out)
        return EXIT_NO_DAEMON
    if args.json:
        _print_json(out, {"running": True, **status})
        return EXIT_OK
    print(f"daemon: running (pid {status['pid']}, since {status['started']})", file=out)
    print(f"store: {status['store']}  runtime: {status['runtime_dir']}", file=out)
    rows = [
        [
            e["name"],
            str(e["pid"] or "-"),
            e["schedule"],
            _step(e["last_version"]),
            e["last_snapshot"] or "-",
            e["next_snapshot"] or "-",
            str(e["failures"]),
            str(e["skips"]),
            e["last_error"] or "",
        ]
        for e in status["experiments"]
    ]
    _print_table(
        out,
        [
            "NAME",
            "PID",
            "SCHEDULE",
            "LAST",
            "LAST AT (UTC)",
            "NEXT AT (UTC)",
            "FAILED",
            "SKIPPED",
            "LAST ERROR",
        ],
        rows,
    )
    for gone in status.get("left", []):
        print(
            f"left: {gone['name']} (pid {gone['pid'] or '-'}) at {gone['left']}: "
            f"{gone['why']}; last version {_step(gone['last_version'])}"
            + (
                _RESUME_HINT.format(name=gone["name"], store=status["store"])
                if gone["crashed"]
                else ""
            ),
            file=out,
        )
    return EXIT_OK


_RESUME_HINT = "; to resume it: snapshotd restore {name} --store {store} -- COMMAND ARGS..."


def _snapshot(args: argparse.Namespace, out: TextIO) -> int:
    check_name(args.name)
    runtime, wait = _daemon_settings(args)
    result = _call(args, runtime, "snapshot", {"name": args.name}, timeout=_answer_within(wait))
    if args.json:
        _print_json(out, result)
    else:
        print(result["version"], file=out)
    return EXIT_OK


def _restore(args: argparse.Namespace, out: TextIO) -> int:
    if args.cmd and args.json:
        raise UsageError("--json is for restore NAME: with -- CMD the output is CMD's")
    if args.cmd:
        return _restore_by_starting(args, args.cmd)
    if args.store is not None:
        raise UsageError(
            "--store is for restore NAME -- CMD ARGS...: a running experiment is restored "
            "by its daemon, from the daemon's store"
        )
    check_name(args.name)
    runtime, wait = _daemon_settings(args)
    result = _call(
        args,
        runtime,
        "restore",
        {"name": args.name, "version": args.version},
        timeout=_answer_within(wait),
    )
    for version in result.get("skipped", []):
        _print_warning(
            f"{args.name} v{version} failed verification and was moved to quarantine; "
            "an older version was restored"
        )
    if args.json:
        _print_json(out, result)
        return EXIT_OK
    print(f"restored {args.name} v{result['version']} (step {_step(result['step'])})", file=out)
    return EXIT_OK


def _restore_by_starting(args: argparse.Namespace, command: list[str]) -> int:
    store = _store(args)
    good = [v for v in store.versions(args.name) if v.problem is None]
    if not good or (args.version is not None and args.version not in {v.version for v in good}):
        wanted = f"version {args.version}" if args.version is not None else "any version"
        raise NoSnapshot(f"{args.name!r} has no snapshot ({wanted}) in {store.root}")
    environ = dict(os.environ)
    environ["SNAPSHOTD_RESUME"] = str(args.version) if args.version is not None else "latest"
    environ["SNAPSHOTD_STORE"] = str(store.root.absolute())
    sys.stdout.flush()
    try:
        os.execvpe(command[0], command, environ)  # noqa: S606 - the user names CMD; its exit code becomes ours
    except OSError as exc:
        raise UsageError(f"cannot run {command[0]!r}: {exc.strerror}") from exc


def _list(args: argparse.Namespace, out: TextIO) -> int:
    store = _stored(_store(args))
    rows = [v for name in _names(store, args.name) for v in store.versions(name)]
    if args.json:
        _print_json(out, [_version_json(v) for v in rows])
        return EXIT_OK
    _print_table(
        out,
        ["NAME", "VERSION", "CREATED (UTC)", "STEP", "SIZE", "STATE"],
        [
            [v.name, str(v.version), _when(v), _step(v.step), _size(v.nbytes), _state(v)]
            for v in rows
        ],
    )
    return EXIT_OK


def _verify(args: argparse.Namespace, out: TextIO) -> int:
    store = _stored(_store(args))
    checks = [check for name in _names(store, args.name) for check in store.verify(name)]
    bad = [c for c in checks if not c.ok]
    if args.json:
        _print_json(
            out,
            {
                "checked": len(checks),
                "bad": len(bad),
                "snapshots": [_check_json(c) for c in checks],
            },
        )
    else:
        for check in checks:
            verdict = "ok" if check.ok else f"BAD: {check.problem}"
            print(f"{check.name} v{check.version}: {verdict}", file=out)
        print(f"{len(checks)} checked, {len(bad)} bad", file=out)
    return EXIT_BAD_SNAPSHOT if bad else EXIT_OK


def _prune(args: argparse.Namespace, out: TextIO) -> int:
    loaded = _load_config(args)
    store = _stored(Store(args.store or loaded.store))
    report = []
    for name in _names(store, args.name):
        _schedule, policy = loaded.for_experiment(name)
        for decision in store.prune(name, policy, dry_run=args.dry_run):
            report.append((name, decision))
    if args.json:
        _print_json(
            out,
            [
                {
                    "name": n,
                    "version": d.version,
                    "action": d.action,
                    "keep": d.keep,
                    "reasons": list(d.reasons),
                    "dry_run": args.dry_run,
                }
                for n, d in report
            ],
        )
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for name, decision in report:
        why = ", ".join(decision.reasons)
        if not decision.damaged:  # a damaged one's reason says what happens to it
            why = f"keep ({why})" if decision.keep else verb
        print(f"{name} v{decision.version}: {why}", file=out)
    return EXIT_OK


def _export(args: argparse.Namespace, out: TextIO) -> int:
    store = _stored(_store(args))
    _names(store, args.name)
    version = store.export(args.name, args.output, args.version)
    print(f"exported {args.name} v{version} to {args.output}", file=out)
    return EXIT_OK


# -- output --------------------------------------------------------------------------


def _version_json(v: Version) -> dict[str, Any]:
    return {
        "name": v.name,
        "version": v.version,
        "created": None if v.problem else v.created.isoformat(),
        "step": v.step,
        "nbytes": v.nbytes,
        "safe_point": v.safe_point,
        "state": v.state,
        "problem": v.problem,
        "path": str(v.path),
    }


def _check_json(c: Check) -> dict[str, Any]:
    return {
        "name": c.name,
        "version": c.version,
        "ok": c.ok,
        "problem": c.problem,
        "path": str(c.path),
    }


def _when(v: Version) -> str:
    return "-" if v.problem else v.created.strftime("%Y-%m-%d %H:%M:%S")


def _step(step: int | None) -> str:
    return "-" if step is None else str(step)


def _state(v: Version) -> str:
    if v.problem:
        return f"damaged: {v.problem}"
    return {None: "ok", True: "ok", False: "ok (no safe point)"}[v.safe_point]


def _size(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _print_table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def _print_json(out: TextIO, value: object) -> None:
    json.dump(value, out, indent=2)
    out.write("\n")
