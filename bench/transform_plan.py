"""The wall-time budget of ``python -m bench.compare --transform``, planned from measured costs.

The transform benchmark measures, in this order, the pipelines the comparison needs (the
library's default configuration, the DataLoader with as many workers as cores), then the rest of
both grids, then compute-only and the preset alone. Each pipeline starts with an untimed warm-up
epoch; :class:`TransformPlan` turns the warm-up's time into how many timed repetitions (each one
loader-only and one training epoch) fit in what the budget has left, keeping room for what
follows, and refuses an optional pipeline whose estimate (from the slowest warm-up so far) does
not fit at all. Essential pipelines always run, at least once. Pure: every decision is a
function of the numbers given (``bench.budget.Budget`` supplies the clock).
"""

from __future__ import annotations

from bench.budget import MARGIN, Budget


class TransformPlan:
    """``repeat`` timed repetitions wanted per pipeline, within ``budget``. ``tail_epochs``:
    epochs (of the slowest warm-up) kept for what follows the grids: compute-only's epochs and
    the preset alone."""

    def __init__(self, budget: Budget, repeat: int, tail_epochs: float):
        self.budget, self.repeat, self.tail_epochs = budget, repeat, tail_epochs
        self.warmups: dict[str, float] = {}
        self.repeats: dict[str, int] = {}
        self.cut: dict[str, str] = {}

    def _epoch_s(self) -> float:
        return max(self.warmups.values(), default=0.0)

    def _room(self) -> float:
        return self.budget.left() - self.tail_epochs * self._epoch_s() * MARGIN

    def admit(self, label: str, essential: bool) -> bool:
        """Whether to start ``label``: always when essential; else when a warm-up and one
        repetition at the slowest warm-up so far fit."""
        if essential or not self.warmups:
            return True
        need = 3 * self._epoch_s() * MARGIN
        if need <= self._room():
            return True
        self.cut[label] = (f"skipped: ~{need:.1f} s for a warm-up and one repetition, "
                           f"{max(0.0, self._room()):.1f} s of the budget left")
        return False

    def repetitions(self, label: str, warmup_s: float, essential: bool) -> int:
        """Timed repetitions for ``label`` after its warm-up took ``warmup_s``: as many as fit
        (2 epochs each), at most ``repeat``, at least 1 (an optional pipeline that got this far
        was admitted for one)."""
        self.warmups[label] = warmup_s
        per = 2 * warmup_s * MARGIN
        fit = int(self._room() // per) if per > 0 else self.repeat
        n = max(1, min(self.repeat, fit))
        self.repeats[label] = n
        if n < self.repeat:
            self.cut[label] = f"{n} of {self.repeat} repetitions (budget)"
        return n

    def describe(self) -> dict:
        return {"seconds": self.budget.seconds, "used_s": round(self.budget.elapsed(), 1),
                "repeats": dict(self.repeats), "cut": dict(self.cut)}
