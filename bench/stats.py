"""Samples and the statistics the benchmark reports (median, nearest-rank percentiles)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Wall times (seconds) of one measurement."""

    name: str
    values: list = field(default_factory=list)
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def p(self, q: float) -> float:
        """The q-quantile by nearest rank (p(0.95) of 30 samples is the 29th smallest)."""
        if not self.values:
            return float("nan")
        v = sorted(self.values)
        return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]

    @property
    def minimum(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def maximum(self) -> float:
        return max(self.values) if self.values else float("nan")


def ms(seconds: float) -> str:
    """Seconds as milliseconds with two decimals."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def us(seconds: float) -> str:
    """Seconds as microseconds with two decimals."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e6:.2f}"
