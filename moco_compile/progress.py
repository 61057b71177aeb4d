"""The phases of a build: how long each took, shown on stderr as they run.

``phases = Phases(show=True)``; ``with phases("calibration"): ...`` times the block and,
when shown, runs a spinner naming the phase and prints ``done <phase> in <s>`` after it.
The passes accept any callable that returns a context manager for a phase name, so the
planner's phases (rules, design, certification) are timed the same way without the passes
knowing about terminals.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("import", "calibration", "rules", "design", "certification", "rewrite", "verification", "latency")


class Phases:
    """Seconds per phase of one build, in the order they ran (a phase run twice adds up)."""

    def __init__(self, show: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self._show = show
        self._started = time.perf_counter()
        self._console = None
        if show:
            from rich.console import Console

            self._console = Console(stderr=True)

    @contextmanager
    def __call__(self, name: str, description: str = "", *, spinner: bool = True) -> Iterator[None]:
        """Time the block as phase ``name``; ``spinner=False`` where the block shows its own progress bar."""
        started = time.perf_counter()
        status = self._console.status(f"{name}: {description}" if description else name) \
            if self._console is not None and spinner else None
        try:
            if status is not None:
                with status:
                    yield
            else:
                yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if self._console is not None:
                self._console.print(f"[dim]done {name} in {elapsed:.1f} s[/dim]", highlight=False)

    def elapsed(self) -> float:
        """Seconds since the build started."""
        return time.perf_counter() - self._started

    def to_dict(self) -> dict:
        """``{"seconds": {phase: s}, "total": s}`` for ``report.json``."""
        return {"seconds": {name: round(value, 3) for name, value in self.seconds.items()},
                "total": round(self.elapsed(), 3)}
