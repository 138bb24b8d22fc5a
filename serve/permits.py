"""Backpressure: at most ``max_concurrent_requests`` requests are served at once; one more gets 429 at once.

As in Text Embeddings Inference, a request that finds no free permit is refused immediately (``overloaded``) instead
of joining an unbounded queue, so a burst costs the server nothing and the client learns at once that it should back
off. The count lives on the event loop's thread, so it needs no lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import ServeError


class Permits:
    """A counter of requests in flight, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold one permit for the block, or raise ``ServeError("overloaded")`` when none is free."""
        if self.in_use >= self.limit:
            raise ServeError(
                "overloaded",
                f"Model is overloaded: {self.limit} requests are already being served (--max_concurrent_requests); "
                "retry later.",
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
