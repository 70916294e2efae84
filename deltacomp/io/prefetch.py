"""Read-ahead: produce the next items of an iterator in a thread while the caller works on the current one."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items`` with the next ``depth`` read ahead in a thread, so reads overlap the caller's work."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
