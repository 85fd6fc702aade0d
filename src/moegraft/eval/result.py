"""What `moegraft eval` measured, as one object: what report.json holds and what the terminal shows.

In: the LM metrics (moegraft.eval.metrics) and router health per MoE layer (moegraft.eval.routing_report) of one
model on one set of blocks. Out: `to_json()` for report.json, `summary()` for the terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moegraft.eval.metrics import LMMetrics
from moegraft.eval.routing_report import LayerRouting


@dataclass
class EvalResult:
    """Everything `moegraft eval` measured; `to_json()` is what report.json holds."""

    model: str
    baseline: str | None
    data: str
    blocks: int  # N
    seq_len: int  # T
    metrics: LMMetrics
    routing: list[LayerRouting] | None  # None for a dense model
    experts_impl: str | None
    lm_eval: dict | None = None  # "model" / "baseline" → task → metric → value
    seconds: float = 0.0
    report_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    retain_data: str | None = None  # the second dataset (other text: what the model may have forgotten)
    retain: LMMetrics | None = None  # perplexity (and KL/agreement vs the baseline) on it
    dtype: str | None = None  # the weights' dtype of models eval loaded (None: models given loaded)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "baseline": self.baseline,
            "data": self.data,
            "blocks": self.blocks,
            "seq_len": self.seq_len,
            "metrics": self.metrics.to_json(),
            "routing": None if self.routing is None else [r.to_json() for r in self.routing],
            "experts_impl": self.experts_impl,
            "dtype": self.dtype,
            "lm_eval": self.lm_eval,
            "seconds": self.seconds,
            "notes": self.notes,
            "retain_data": self.retain_data,
            "retain": None if self.retain is None else self.retain.to_json(),
        }

    def summary(self) -> str:
        """A few lines for the terminal."""
        m = self.metrics
        lines = [f"eval {self.model} on {self.data}: {m.tokens} tokens ({self.blocks} × {self.seq_len})"]
        lines.append(f"  perplexity {m.perplexity:.4f}")
        if m.baseline_perplexity is not None:
            lines[-1] += (
                f"  (baseline {m.baseline_perplexity:.4f}, ratio {m.perplexity / m.baseline_perplexity:.4f})"
            )
            lines.append(
                f"  KL(baseline ‖ model) {m.kl:.3g} nats/token, top-1 agreement {m.top1_agreement:.2%}"
            )
        if self.retain is not None:
            lines.append(f"  retention on {self.retain_data}: " + _ppl_line(self.retain))
        if self.routing:
            worst = max(self.routing, key=lambda r: r.cv)
            dead = sum(r.dead for r in self.routing)
            total = sum(r.num_experts for r in self.routing)
            # H/ln E beside the CV: a uniform router (H/ln E = 1) also reads as balanced
            h = sum(r.entropy_norm for r in self.routing) / len(self.routing)
            least = min(self.routing, key=lambda r: r.min_share)
            lines.append(
                f"  routing: {len(self.routing)} MoE layers, worst load CV {worst.cv:.2f} (layer {worst.layer}), "
                f"mean H/ln E {h:.2f}, max MaxVio {max(r.max_vio for r in self.routing):.2f}, "
                f"worst min share {least.min_share:.2f} (layer {least.layer}), dead experts {dead}/{total}"
            )
        for who, tasks in (self.lm_eval or {}).items():
            for task, scores in tasks.items():
                lines.append(
                    f"  lm-eval {task} ({who}): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                )
        if self.report_dir is not None:
            lines.append(f"  report: {self.report_dir}")
        return "\n".join(lines)


def _ppl_line(m: LMMetrics) -> str:
    line = f"perplexity {m.perplexity:.4f} ({m.tokens} tokens)"
    if m.baseline_perplexity is not None:
        line += (
            f", baseline {m.baseline_perplexity:.4f}, ratio {m.perplexity / m.baseline_perplexity:.4f}, "
            f"KL {m.kl:.3g}, top-1 agreement {m.top1_agreement:.2%}"
        )
    return line
