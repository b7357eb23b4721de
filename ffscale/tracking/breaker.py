"""Tracking must not stop training: a call that fails opens the breaker, and calls are skipped for
a while (the run directory keeps what could not be sent; the stage's end catches MLflow up); one
warning per tracker."""

from __future__ import annotations

import time

from ffscale.util.secrets import redact


class Down(Exception):
    """The tracking server failed recently; the call was not made."""


class Breaker:
    def __init__(self, uri: str, open_s: float = 60.0):
        self.uri, self.open_s = uri, open_s
        self.down_until = 0.0
        self.warned = False

    def call(self, fn, *a, **kw):
        """fn(*a, **kw), or Down when the server failed within the last `open_s` seconds or now."""
        if time.monotonic() < self.down_until:
            raise Down
        try:
            return fn(*a, **kw)
        except Exception as e:
            self.failed(e)
            raise Down from None

    def failed(self, error: Exception) -> None:
        self.down_until = time.monotonic() + self.open_s
        if not self.warned:
            print(f"ffscale: MLflow at {redact(self.uri)} failed ({type(error).__name__}: {redact(str(error))[:200]}); "
                  "training continues, metrics are kept and retried", flush=True)  # fmt: skip
            self.warned = True

    def close(self) -> None:
        """The server answered: calls go through again."""
        self.down_until = 0.0

    def attempt(self, fn, *a, **kw):
        """fn(*a, **kw), or None when the server is down."""
        try:
            return self.call(fn, *a, **kw)
        except Down:
            return None
