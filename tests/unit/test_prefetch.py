"""Imports started early (kquant_job/prefetch.py) never run beside timed calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from kquant_job import prefetch
from kquant_job.validate.runtime import block_latency_ms, paired_latency_ms


def _block(call: Callable[[], object]) -> None:
    block_latency_ms(call, 3, 1, 1000.0)


def _paired(call: Callable[[], object]) -> None:
    paired_latency_ms(call, call, 3, 1, 1000.0)


@pytest.mark.parametrize("measure", [_block, _paired])
def test_latency_waits_for_the_imports_begun_before_it(measure) -> None:
    done = threading.Event()
    prefetch.start(lambda: (time.sleep(0.3), done.set()))
    seen: list[bool] = []
    measure(lambda: seen.append(done.is_set()))
    assert seen and all(seen)  # every call, warm-up included, came after the import


def test_a_failing_import_is_left_for_its_later_caller(monkeypatch) -> None:
    def broken() -> None:
        raise ImportError("no such module")

    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    prefetch.start(broken)
    prefetch.settle()  # no error here: the real import reports it where it is needed
    assert escaped == [] and prefetch._threads == []  # nothing escaped the thread, joined
