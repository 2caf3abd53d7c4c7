"""The bounded memo shared by the header and protocol decoders."""

from __future__ import annotations

import functools
import operator
import threading

from snapshotd.recent import Recent


def test_keeps_at_most_its_size_dropping_the_oldest() -> None:
    memo: Recent[int, str] = Recent(3)
    for key in range(5):
        memo.put(key, str(key))

    assert [memo.get(key) for key in range(5)] == [None, None, "2", "3", "4"]


def test_recall_derives_once_and_keeps_only_when_asked() -> None:
    memo: Recent[str, int] = Recent(4)
    made: list[str] = []

    def make(key: str) -> int:
        made.append(key)
        return len(key)

    assert memo.recall("abc", lambda: make("abc")) == 3
    assert memo.recall("abc", lambda: make("abc")) == 3
    assert memo.recall("toolong", lambda: make("toolong"), keep=False) == 7
    assert memo.recall("toolong", lambda: make("toolong"), keep=False) == 7

    assert made == ["abc", "toolong", "toolong"]
    assert memo.get("toolong") is None


def test_threads_sharing_a_memo_never_see_an_error_or_a_wrong_value() -> None:
    memo: Recent[int, int] = Recent(4)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(20_000):
                key = (i + offset) % 16
                if memo.recall(key, functools.partial(operator.mul, key, 2)) != key * 2:
                    raise AssertionError(f"wrong value for {key}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
