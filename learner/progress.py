"""Progress inside an epoch: samples generated, scored and trained as they advance.

An SD1.5 epoch of 256 samples takes minutes even on a GPU, so the epoch's summary line alone leaves a user
staring at nothing. On a terminal this is one line rewritten in place (and cleared before the summary);
elsewhere (logs of `ray job submit`, CI) it is a plain line every `every_s` seconds.
"""

from __future__ import annotations

import sys
import time


class EpochProgress:
    """Counts of one epoch's stages; `update(sampled=, scored=, trained=)` takes absolute counts."""

    STAGES = ("sampled", "scored", "trained")

    def __init__(
        self, label: str, totals: dict[str, int], stream=None, every_s: float = 30.0, tty: bool | None = None
    ):
        self.label = label
        self.totals = totals
        self.counts = {k: 0 for k in self.STAGES if k in totals}
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._width = 0

    def line(self) -> str:
        parts = [f"{k} {self.counts[k]}/{self.totals[k]}" for k in self.counts]
        return f"{self.label}: {', '.join(parts)} ({time.perf_counter() - self.t0:.0f} s)"

    def update(self, **counts: int) -> None:
        changed = False
        for k, v in counts.items():
            if k in self.counts and v is not None:
                v = min(int(v), self.totals[k])
                changed |= v != self.counts[k]
                self.counts[k] = v
        now = time.perf_counter()
        if self.tty:
            if changed or now - self._last >= 1.0:
                text = self.line()
                self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
                self.stream.flush()
                self._width, self._last = len(text), now
        elif now - self._last >= self.every_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        """Clear the terminal line (the epoch's summary line follows)."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class NoProgress:
    """Stand-in when progress is off (tests, benchmarks)."""

    def update(self, **counts: int) -> None:
        pass

    def close(self) -> None:
        pass
