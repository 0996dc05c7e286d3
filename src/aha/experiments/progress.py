"""One progress bar over the whole run: tqdm when it is installed, else a line now and then on stderr.

tqdm is in the ``experiments`` extra; the fallback keeps ``--quick`` (and the tests)
free of it.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``total`` units of work; ``stage(name)`` names what runs, ``update(loss)`` counts one unit."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.name = total, 0, ""
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.start = self._last = time.perf_counter()
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit="step", file=self.stream, dynamic_ncols=True)

    def stage(self, name: str) -> None:
        self.name = name
        if self._bar is not None:
            self._bar.set_description(name)
        elif self.enabled:
            print(f"[{self._elapsed()}] {name}", file=self.stream, flush=True)

    def update(self, loss: float | None = None, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._last > 30 or self.done == self.total):
            self._last = now
            eta = (now - self.start) / max(1, self.done) * (self.total - self.done)
            tail = "" if loss is None else f" loss {loss:.3f}"
            pct = 100 * self.done / max(1, self.total)
            print(
                f"[{self._elapsed()}] {self.name}: {pct:3.0f}% ({self.done}/{self.total}), eta {eta / 60:.1f} min{tail}",
                file=self.stream,
                flush=True,
            )

    def _elapsed(self) -> str:
        s = int(time.perf_counter() - self.start)
        return f"{s // 60:d}m{s % 60:02d}s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
