"""Imports started early in a thread, so that they overlap native work that releases the
GIL (an onnxruntime session being built: the reference pass's, 0.6 s for BERT-base).

sympy, which onnxruntime's symbolic shape inference (INT8 pre-processing) imports, takes
0.3-0.5 s of the interpreter on its own; started with the stage it is done by the time the
pass needs it. Code that times something waits for the imports first (:func:`settle`): a busy
thread would slow the runs it times.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

_threads: list[threading.Thread] = []


def start(load: Callable[[], object]) -> None:
    """Run ``load`` (an import) in a daemon thread; its errors are left for the caller's own
    import to raise."""

    def quiet() -> None:
        # the same import, made later where it is needed, reports what fails
        with contextlib.suppress(Exception):
            load()

    thread = threading.Thread(target=quiet, name="kquant-prefetch", daemon=True)
    thread.start()
    _threads.append(thread)


def settle() -> None:
    """Wait for every import :func:`start` began."""
    while _threads:
        _threads.pop().join()
