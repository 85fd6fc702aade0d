"""The training recipe's step and logging: one optimizer step over its micro-batches, and a metrics row.

In: the RunState, the router tap, the stop signals. Out: a StepResult (Losses by name, the stop flag, routing
counts) per step; every log_every steps a metrics row (metrics.jsonl, TensorBoard) and the bar moved.
"""

from __future__ import annotations

import math
import time

import torch

from moegraft.errors import MoegraftError
from moegraft.routing import RouterTap, router_entropy
from moegraft.train.balance import balance_losses, layer_counts, update_selection_bias
from moegraft.train.checkpoint import StopSignals
from moegraft.train.distill import distill_kl
from moegraft.train.losses import heldout_loss, next_token_loss, split_mask
from moegraft.train.metrics import TrainBar, load_summary
from moegraft.train.state import Losses, NoRouters, RunState, StepResult, Window


class TrainingDivergedError(MoegraftError):
    """The loss became NaN or Inf; the run stopped and the last good checkpoint was kept."""


def train_step(state: RunState, tap: RouterTap | NoRouters, stop: StopSignals) -> StepResult:
    """One optimizer step over grad_accum micro-batches, then the selection-bias update (--balance bias)."""
    spec, procs, position = state.spec, state.procs, state.position
    acc = procs.accelerator
    state.counters.at_boundary = False
    # the 5 losses (Losses' order) and the stop flag, reduced over the processes as one tensor
    sums = torch.zeros(6, dtype=torch.float64, device=procs.device)
    step_counts: dict[int, torch.Tensor] = {}
    entropy: dict[int, float] = {}
    tokens = 0
    for micro in range(spec.grad_accum):
        x, mask = split_mask(
            state.data.stream.micro_batch(position.step, micro, acc.process_index).to(procs.device)
        )  # (B, T), (B, T) or None
        tokens += x.numel()
        with acc.accumulate(state.model):
            parts = micro_step(state, tap, x, mask, step_counts)
        sums[:5] += parts / spec.grad_accum
        # a model without routers (dense LoRA baseline) records nothing: no counts, E unused
        E = next((recs[-1].logits.shape[-1] for recs in tap.records.values()), 0)
        for layer, c in layer_counts(tap.records, E).items():
            step_counts[layer] = step_counts[layer] + c if layer in step_counts else c
        for layer, recs in tap.records.items():
            entropy[layer] = entropy.get(layer, 0.0) + router_entropy(recs[-1]) / spec.grad_accum
        tap.clear()
    state.scheduler.step()
    layers = sorted(step_counts)
    # (L, E) global for the step
    counts = procs.reduce_sum(torch.stack([step_counts[i] for i in layers])) if layers else []
    counts = dict(zip(layers, counts, strict=True))
    if spec.balance == "bias":
        update_selection_bias(state.core, counts, spec.bias_rate)
    sums[5] = float(stop.set)
    sums = acc.reduce(sums, "mean") if acc.num_processes > 1 else sums
    position.step += 1
    position.tokens += state.data.tokens_per_step
    state.counters.at_boundary = True
    *losses, stop_flag = sums.tolist()
    # every process feeds micro-batches of one shape (BlockStream), so this process's count times theirs
    return StepResult(Losses(*losses), stop_flag > 0, counts, entropy, tokens * acc.num_processes)


def micro_step(
    state: RunState,
    tap: RouterTap | NoRouters,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    prior: dict[int, torch.Tensor],
) -> torch.Tensor:
    """Forward, loss, backward (and, at the last micro-step, the optimizer step) of one micro-batch (B, T);
    returns its (5,) losses in Losses' order. `prior`: the step's counts so far (global-batch balance)."""
    spec, procs = state.spec, state.procs
    acc = procs.accelerator
    tap.clear()
    logits = state.model(input_ids=x, use_cache=False).logits  # (B, T, V)
    ce = next_token_loss(logits, x, mask)
    kl = torch.zeros((), device=procs.device)
    if state.teacher is not None:
        with torch.no_grad():
            t_logits = state.teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
        kl = distill_kl(logits, t_logits, spec.distill_chunk)
    aux, z = balance_losses(
        tap.records,
        aux=spec.balance == "aux" and spec.aux_coef > 0,
        z=spec.z_coef > 0,
        reduce=procs.reduce_sum,
        # f over the step so far, not this micro-batch alone: global-batch balance
        prior=prior,
    )
    loss = spec.ce_weight * ce + spec.distill_weight * kl + spec.aux_coef * aux + spec.z_coef * z
    parts = torch.stack([loss, ce, kl, aux, z]).detach().double()
    # every process must agree to stop, or the others would hang in the next collective
    bad = procs.reduce_sum(torch.tensor([0.0 if torch.isfinite(parts).all() else 1.0], device=procs.device))
    if bad.item() > 0:
        raise diverged(state, parts[0].item())
    tap.recording = False  # checkpointed layers re-run their routers in backward
    acc.backward(loss)
    tap.recording = True
    if acc.sync_gradients and spec.max_grad_norm > 0:
        acc.clip_grad_norm_(state.params, spec.max_grad_norm)
    state.optimizer.step()  # a no-op until the last micro-step (accelerate tracks the accumulation)
    state.optimizer.zero_grad(set_to_none=True)
    return parts


def diverged(state: RunState, loss: float) -> TrainingDivergedError:
    saved = state.counters.saved_step
    return TrainingDivergedError(
        f"non-finite loss at step {state.position.step + 1} (loss {loss}); lower --lr or "
        + (
            f"resume from {state.run_dir / 'checkpoints'} (last good: step {saved})"
            if saved > 0
            else "set --save-every to keep checkpoints"
        )
    )


def log_step(
    state: RunState, tap: RouterTap | NoRouters, window: Window, step: StepResult, bar: TrainBar
) -> dict:
    """Add the step to the logging window; every log_every steps (and at the last) write its metrics row, with
    the held-out loss every eval_every steps; move the bar. Returns the step's row (what `callback` gets)."""
    spec, position, counters, s = state.spec, state.position, state.counters, step.losses
    window.add(step)
    row = {"step": position.step, "loss": s.loss, "ce": s.ce}
    if position.step % spec.log_every != 0 and position.step != state.data.steps:
        tokens_per_s = window.tokens / max(1e-9, time.perf_counter() - window.t0)
        bar.update(tokens_per_s=tokens_per_s, loss=s.loss, balance=s.aux, worst_cv=None)
        return row
    if state.procs.device.type == "cuda":  # the window ends when the GPU has done its steps, not when queued
        torch.cuda.synchronize(state.procs.device)
    dt = time.perf_counter() - window.t0
    counters.timed_tokens += window.tokens
    counters.timed_seconds += dt
    tokens_per_s = window.tokens / dt
    m = window.mean()
    load = load_summary(window.load.flush())
    row = {
        "step": position.step,
        "tokens": position.tokens,
        "lr": state.scheduler.get_last_lr()[0],
        **m._asdict(),
        # the tokens fed since the last row over the wall time they took (evaluation and saving left out)
        "tokens_per_s": tokens_per_s,
        "window_tokens": window.tokens,
        "window_seconds": dt,
        **state.throughput(tokens_per_s),
        **load,
    }
    if spec.eval_every and position.step % spec.eval_every == 0 and position.step != state.data.steps:
        row["eval_loss"] = heldout_loss(
            state.core, state.data.eval_blocks, spec.batch, state.procs.accelerator
        )
        row["eval_ppl"] = math.exp(row["eval_loss"])
        tap.clear()
    state.metrics.write(row)
    counters.last_row = row
    bar.update(
        tokens_per_s=tokens_per_s,
        loss=m.loss,
        balance=m.aux if spec.balance == "aux" else m.z,
        worst_cv=load["worst_cv"] if load["layers"] else None,
        entropy_norm=load["mean_entropy_norm"],
    )
    window.reset()
    return row
