"""What a training run reports: per-layer load over a logging window, a JSONL log, TensorBoard, a live bar.

In: router counts and entropies per micro-step, losses per step. Out: `metrics.jsonl` rows, optional TensorBoard
scalars, and a rich progress bar with tokens/s, loss, balance loss, the worst layer's load CV and the mean
router entropy / ln E.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moegraft.progress import Progress
from moegraft.routing import LoadStats


class LoadWindow:
    """Per-layer expert counts and router entropy summed since the last `flush`."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self._entropy: dict[int, list[float]] = {}

    def add(self, counts: dict[int, torch.Tensor], entropy: dict[int, float]) -> None:
        for layer, c in counts.items():
            c = c.detach().cpu().long()
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c
        for layer, h in entropy.items():
            self._entropy.setdefault(layer, []).append(h)

    def flush(self) -> dict[int, LoadStats]:
        def mean(xs: list[float] | None) -> float:
            return sum(xs) / len(xs) if xs else math.nan

        stats = {
            layer: LoadStats.from_counts(c, mean(self._entropy.get(layer)))
            for layer, c in sorted(self.counts.items())
        }
        self.counts, self._entropy = {}, {}
        return stats


def load_summary(stats: dict[int, LoadStats]) -> dict:
    """JSON-ready per-layer load lists plus the worst layer's CV / MaxVio / min share, the total of dead
    experts and the mean entropy / ln E (NaN when no entropy was recorded)."""
    layers = list(stats)
    known = [s.entropy_norm for s in stats.values() if not math.isnan(s.entropy_norm)]
    return {
        "layers": layers,
        "load_cv": [round(stats[i].cv, 5) for i in layers],
        "load_maxvio": [round(stats[i].max_vio, 5) for i in layers],
        "dead": [stats[i].dead for i in layers],
        "under_10pct": [stats[i].under_10pct for i in layers],
        "router_entropy": [round(stats[i].entropy, 5) for i in layers],
        "router_entropy_norm": [round(stats[i].entropy_norm, 5) for i in layers],
        "min_share": [round(stats[i].min_share, 5) for i in layers],
        "worst_cv": max((s.cv for s in stats.values()), default=0.0),
        "worst_maxvio": max((s.max_vio for s in stats.values()), default=0.0),
        "worst_min_share": min((s.min_share for s in stats.values()), default=1.0),
        "mean_entropy_norm": sum(known) / len(known) if known else math.nan,
        "dead_total": sum(s.dead for s in stats.values()),
    }


class MetricsLog:
    """Appends one JSON object per line to `path` (and mirrors scalars to TensorBoard when asked and installed)."""

    def __init__(self, path: Path, *, tensorboard: bool = False, enabled: bool = True):
        self.path, self.enabled, self._tb = Path(path), enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: the JSONL log is the record
                pass
            else:
                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TrainBar(Progress):
    """The training bar: steps done / total, elapsed, remaining, and a text field with the latest numbers."""

    def __init__(self, total: int, done: int, *, enabled: bool):
        super().__init__(total, "train", enabled=enabled, info=True, done=done)

    def update(
        self,
        *,
        tokens_per_s: float,
        loss: float,
        balance: float,
        worst_cv: float | None,
        entropy_norm: float | None = None,
    ) -> None:
        """Advance one step; `entropy_norm` (mean H / ln E) sits next to the CV, so a balance reached by
        flattening the router (H / ln E → 1) is visible."""
        if self.enabled:
            cv = "" if worst_cv is None else f" worst CV {worst_cv:.2f}"
            if entropy_norm is not None and not math.isnan(entropy_norm):
                cv += f"  H/lnE {entropy_norm:.2f}"
            self.advance(1, info=f"{tokens_per_s:,.0f} tok/s  loss {loss:.4f}  bal {balance:.4f}{cv}")
