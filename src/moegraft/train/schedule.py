"""The learning-rate schedule every moegraft optimizer follows: linear warm-up, then a cosine to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine_lr(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at step s (for `LambdaLR`): (s+1)/warmup while warming up, then
    a cosine from 1 to `min_ratio` at `steps`, held there after."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f
