"""The import direction of the package: pure core -> I/O shells -> use cases -> wiring.

Each module has a rank; a module may import only modules of a strictly lower rank, and
third-party packages only where the table allows. New modules must be added here, so
the architecture stays written down in one place.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import snapshotd

PACKAGE = Path(snapshotd.__file__).parent

RANKS: dict[str, int] = {
    # 0: the exception tree
    "errors": 0,
    # 1-2: pure values and logic (no files, sockets or clock)
    "names": 1,
    "crashpoint": 1,
    "exitcode": 1,
    "tree": 1,
    "retention": 1,
    "target": 1,
    "recent": 1,
    "collector": 1,
    "quota": 1,
    "lanes": 2,
    "format": 2,
    "config": 2,
    "protocol": 2,
    # 3-4: I/O shells, one resource each
    "snapshot": 3,
    "rendezvous": 3,
    "arena": 3,
    "channel": 3,
    "sdnotify": 3,
    "store": 4,
    "transport": 4,
    "control": 4,
    "client": 5,
    # 6: use cases
    "capture": 6,
    # 7-8: process wiring
    "discovery": 7,
    "daemon": 8,
    "cli": 9,
    "__init__": 10,
    "__main__": 11,
}

#: Third-party imports allowed per module (numpy and the standard library are free).
FOREIGN: dict[str, set[str]] = {
    "format": {"xxhash"},
    "config": {"yaml"},
    "discovery": {"watchdog"},
    "daemon": {"apscheduler"},
}
ALWAYS_ALLOWED = {"numpy"}
PURE_FORBIDDEN = {"socket", "fcntl", "subprocess", "time", "threading", "signal"}
#: Modules that must stay pure (crashpoint is a process hook, so it is not among them).
PURE = [
    "exitcode",
    "names",
    "tree",
    "retention",
    "target",
    "recent",
    "collector",
    "format",
    "config",
    "protocol",
]
CLOCK_READS = re.compile(r"\.(now|utcnow|today)\(|\btime\.(time|monotonic)\(")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "snapshotd":
                found.update(f"snapshotd.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_rank() -> None:
    assert set(_modules()) == set(RANKS), "add new modules to RANKS with their layer"


@pytest.mark.parametrize("module", _modules())
def test_imports_flow_downward(module: str) -> None:
    for name in _imports(PACKAGE / f"{module}.py"):
        top, _, rest = name.partition(".")
        if top == "snapshotd" and rest:
            target = rest.split(".")[0]
            assert RANKS[target] < RANKS[module], f"{module} imports {target}"


@pytest.mark.parametrize("module", _modules())
def test_foreign_imports_are_where_the_table_says(module: str) -> None:
    stdlib = set(sys.stdlib_module_names)
    for name in _imports(PACKAGE / f"{module}.py"):
        top = name.split(".")[0]
        if top in stdlib or top in {"snapshotd", "__future__"} or top in ALWAYS_ALLOWED:
            continue
        assert top in FOREIGN.get(module, set()), f"{module} imports {top}"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_touch_no_sockets_processes_or_clock(module: str) -> None:
    tops = {name.split(".")[0] for name in _imports(PACKAGE / f"{module}.py")}
    assert not tops & PURE_FORBIDDEN, f"{module} imports {tops & PURE_FORBIDDEN}"
    source = (PACKAGE / f"{module}.py").read_text()
    assert CLOCK_READS.search(source) is None, f"{module} reads the clock"


def test_client_import_stays_light() -> None:
    code = (
        "import sys, snapshotd\n"
        "heavy = {'yaml', 'apscheduler', 'watchdog', 'snapshotd.config', 'snapshotd.cli'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_public_names_are_sorted_and_exist() -> None:
    assert snapshotd.__all__ == sorted(snapshotd.__all__)
    for name in snapshotd.__all__:
        assert hasattr(snapshotd, name), name


#: Modules that turn bytes into objects of any class. snapshotd never pickles (DESIGN §6):
#: not on disk, not on the wire.
UNPICKLERS = {"pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
#: Calls that can unpickle: numpy's readers unless told ``allow_pickle=False``, and
#: PyYAML's loaders other than ``safe_load``.
PICKLE_CAPABLE = {"load", "read_array", "fromfile", "unsafe_load", "full_load", "load_all"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        root: ast.expr = node.func
        while isinstance(root, ast.Attribute):
            root = root.value
        foreign = isinstance(root, ast.Name) and root.id in {"np", "numpy", "yaml"}
        keywords = {k.arg: k.value for k in node.keywords}
        refused = keywords.get("allow_pickle")
        says_no = isinstance(refused, ast.Constant) and refused.value is False
        if foreign and node.func.attr in PICKLE_CAPABLE and not says_no:
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}(...)")
        if "allow_pickle" in keywords and not says_no:
            found.append(f"line {node.lineno}: allow_pickle not False")
    return found


@pytest.mark.parametrize("module", _modules())
def test_nothing_can_unpickle(module: str) -> None:
    path = PACKAGE / f"{module}.py"
    tops = {name.split(".")[0] for name in _imports(path)}
    assert not tops & UNPICKLERS, f"{module} imports {tops & UNPICKLERS}"
    assert _unsafe_calls(ast.parse(path.read_text())) == [], module


@pytest.mark.parametrize(
    "source",
    [
        "import numpy as np\nnp.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import numpy as np\nnp.lib.format.read_array(f)",
    ],
)
def test_the_unpickling_check_finds_what_it_looks_for(source: str) -> None:
    assert _unsafe_calls(ast.parse(source)), source
