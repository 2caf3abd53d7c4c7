"""Write the golden snapshot of format snapshotd/1 (run once; the file is committed).

    python -m tests.golden.make_golden

The golden file must load with every future version of snapshotd; tests/test_golden.py
checks it against :func:`expected_state`. Never regenerate it for an existing format
version: add a new golden file for a new one.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import snapshotd

GOLDEN = Path(__file__).with_name("format-v1.safetensors")
CREATED = datetime(2026, 11, 28, 12, 0, 0, 123456, tzinfo=UTC)


def expected_state() -> dict[str | int, Any]:
    """The state stored in the golden file, rebuilt from code."""
    return {
        "W": np.arange(784 * 10, dtype=np.float32).reshape(784, 10) / 7.0,
        "b": np.linspace(-1, 1, 10, dtype=np.float64),
        "flags": np.array([True, False, True]),
        "ints": [np.arange(-4, 4, dtype=dt) for dt in ("int8", "int16", "int32", "int64")],
        "uints": tuple(np.arange(8, dtype=dt) for dt in ("uint8", "uint16", "uint32", "uint64")),
        "half": np.array([0.5, -2.0, 65504.0], dtype=np.float16),
        "c64": np.array([1 + 2j, -3.5j], dtype=np.complex64),
        "c128": np.array([[1 + 1j, 2 - 2j]], dtype=np.complex128),
        "scalar": np.float32(2.5),
        "zero_d": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "plain": {"lr": 0.01, "epoch": 3, "tag": "run-1", "done": False, "none": None},
        1: "int key",
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        store = snapshotd.Store(root)
        store.commit(
            "golden",
            expected_state(),
            step=1234,
            metadata={"purpose": "format-v1 golden file"},
            safe_point=True,
            created=CREATED,
        )
        shutil.copyfile(Path(root) / "golden" / "v000001.safetensors", GOLDEN)
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
