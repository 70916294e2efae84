"""Named stages of the compression pipeline, observable from outside (benchmarks time them).

The library marks its stages: a function with :func:`timed` (``@timed("svd")``), a block with ``with
stage("write"):``. Nothing is measured unless a listener is registered with :func:`observe`; a listener has
``enter(name)`` and ``exit(name)``, called in the thread that runs the stage (a stage of the prefetch thread
overlaps the main thread's). Stages: ``load`` (checkpoint reads), ``digest`` (a base matrix's fingerprint, in the
read-ahead thread), ``delta`` (fine-tune minus base on the device), ``calibration text`` (the calibration file read
and tokenized, its tokenizer loaded), ``token tables`` (the token tables' weights: token counts, and, without the
calibration's pass, the output head's inputs from a pass of their own), ``calibration`` (the layers' Hessians, and the
output head's inputs where the calibration's pass goes on to them), ``sequential target``, ``svd``, ``allocation``,
``gptq``, ``rtn``, ``pack``, ``store`` (a matrix's result kept for resuming, or read back), ``tune``, ``write``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Listener(Protocol):
    def enter(self, name: str) -> None: ...

    def exit(self, name: str) -> None: ...


_listeners: list[Listener] = []


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the enclosed block as stage ``name`` for the registered listeners."""
    if not _listeners:
        yield
        return
    listeners = list(_listeners)
    for listener in listeners:
        listener.enter(name)
    try:
        yield
    finally:
        for listener in reversed(listeners):
            listener.exit(name)


def timed(name: str):
    """Decorator: every call of the function is stage ``name``."""

    def wrap(fn):
        @functools.wraps(fn)
        def staged(*args, **kwargs):
            if not _listeners:
                return fn(*args, **kwargs)
            with stage(name):
                return fn(*args, **kwargs)

        return staged

    return wrap


@contextmanager
def observe(listener: Listener) -> Iterator[Listener]:
    """Register ``listener`` for the enclosed block."""
    _listeners.append(listener)
    try:
        yield listener
    finally:
        _listeners.remove(listener)
