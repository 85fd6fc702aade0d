"""The training recipe on accelerate: a converted MoE checkpoint and text in, a trained native checkpoint out.

In: MOE_DIR (from `moegraft convert`), a TrainSpec. Out: OUT/ with `moegraft-train.json`, `metrics.jsonl`,
`checkpoints/step-N/` (accelerate state, safetensors) and `model/` (native checkpoint, written atomically).
`TrainRecipe` runs it in named steps: setup (a frozen RunState, moegraft.train.setup), record, step and log
(moegraft.train.steps), save, finish. What trains is a ModelPreparation it is given (moegraft.train.strategies;
the LoRA ones in moegraft.finetune.adapters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moegraft.errors import SpecError
from moegraft.io.atomic import atomic_output_dir
from moegraft.models import peft_calls
from moegraft.routing import RouterTap, router_modules
from moegraft.train.batches import blocks_digest
from moegraft.train.checkpoint import (
    StopNow,
    StopSignals,
    latest_checkpoint,
    model_bytes,
    save_checkpoint,
    shared_pid,
    staged_run,
    state_bytes,
)
from moegraft.train.fsdp import cpu_processes, full_state_dict
from moegraft.train.losses import heldout_loss, next_token_loss, split_mask
from moegraft.train.metrics import MetricsLog, TrainBar
from moegraft.train.precision import cast_floating, record_dtype
from moegraft.train.setup import (
    count_flops,
    fit_layers,
    load_data,
    load_model,
    load_teacher,
    prepare_optimizer,
    resolve_spec,
    resolved_record,
    start_processes,
)
from moegraft.train.spec import META_FILE, SPEC_FILE, TrainSpec, write_spec_file
from moegraft.train.state import Counters, Fitted, NoRouters, Processes, RunState, TrainResult, Window
from moegraft.train.steps import TrainingDivergedError, log_step, train_step
from moegraft.train.strategies import ModelPreparation, Prepared, TrainPathways

__all__ = [
    "TrainRecipe",
    "TrainResult",
    "TrainingDivergedError",
    "blocks_digest",
    "heldout_loss",
    "next_token_loss",
    "split_mask",
    "train",
]


class TrainRecipe:
    """One training run in named steps: `setup` (processes, model, data, teacher, optimizer; or the checkpoint
    resumed) into a frozen RunState, `record_run` (OUT's spec file), `fit` (`train_step`, one optimizer step, and
    `log_step`, a metrics row every log_every steps), `save` (a checkpoint), `finish` (held-out loss, OUT/model). `run` joins them in a
    run directory that --overwrite replaces only at the end.

    `preparation` decides what trains (default: the spec's pathways); a subclass may extend the named steps.
    """

    def __init__(
        self,
        moe_dir: str | Path,
        out: str | Path,
        spec: TrainSpec,
        *,
        preparation: ModelPreparation | None = None,
        progress: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        callback: Callable[[dict], None] | None = None,
    ):
        self.moe_dir, self.out, self.spec, self.preparation = Path(moe_dir), Path(out), spec, preparation
        self.progress, self.resume, self.overwrite, self.callback = progress, resume, overwrite, callback

    @property
    def adapter(self) -> bool:
        """Whether the preparation wraps the model in adapters (see ModelPreparation)."""
        return self.preparation is not None and self.preparation.adapter

    def run(self):
        """setup → step, log, save until the budget is spent → finish; see `train` for what it raises.

        Returns what `outcome` makes of the TrainResult once OUT holds the run (the TrainResult itself here)."""
        t_start = time.perf_counter()
        cpu = cpu_processes(self.spec.device)
        with staged_run(self.out, overwrite=self.overwrite and not self.resume, cpu=cpu) as run_dir:
            state = self.setup(run_dir)
            fitted = self.fit(state)
            result = self.finish(state, fitted, t_start)
        return self.outcome(
            state, dataclasses.replace(result, run_dir=self.out, model_dir=self.out / "model")
        )

    def outcome(self, state: RunState, result: TrainResult):
        """What `run` returns, once OUT holds the run: here the TrainResult (finetune: a FinetuneResult)."""
        return result

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self, run_dir: Path) -> RunState:
        """Everything the steps need, in order: the spec resolved for the checkpoint, the processes, the model,
        the data and the step budget, the run's record, the teacher, the FLOPs, a carve's layer-wise phase, the
        optimizer (and, with --resume, the checkpoint's state)."""
        spec, saved_dtype = resolve_spec(self.moe_dir, self.spec, adapter=self.adapter)
        procs = start_processes(spec, run_dir, resume=self.resume, overwrite=self.overwrite)
        preparation = self.preparation or TrainPathways(spec.trainable)
        prepared, tok, n_trainable = load_model(
            self.moe_dir, spec, preparation, precision=procs.precision, saved_dtype=saved_dtype
        )
        data = load_data(spec, tok, procs.accelerator.num_processes)
        resolved = resolved_record(data, procs, n_trainable)
        self.record_run(run_dir, spec, resolved, procs, prepared)
        teacher = load_teacher(spec, prepared.model, procs)
        flops, peak_flops = count_flops(self.moe_dir, spec, prepared.model, teacher, procs)
        fit_layers(spec, prepared.model, teacher, data, procs, run_dir, progress=self.progress)
        model, optimizer, scheduler, position = prepare_optimizer(spec, prepared.model, data, procs)
        acc = procs.accelerator
        return RunState(
            spec=spec,
            run_dir=run_dir,
            procs=procs,
            saved_dtype=saved_dtype,
            tok=tok,
            adapted=prepared.facts,
            n_trainable=n_trainable,
            data=data,
            resolved=resolved,
            teacher=teacher,
            flops=flops,
            peak_flops=peak_flops,
            model=model,
            core=acc.unwrap_model(model, keep_torch_compile=False),
            params=[p for p in model.parameters() if p.requires_grad],  # FSDP2 replaced them by shards
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            owner=shared_pid(acc),
            metrics=MetricsLog(run_dir / "metrics.jsonl", tensorboard=spec.tensorboard, enabled=procs.main),
            counters=Counters(saved_step=position.step if procs.ckpt is not None else -1),
        )

    def record_run(
        self, run_dir: Path, spec: TrainSpec, resolved: dict, procs: Processes, prepared: Prepared
    ) -> None:
        """Write the run's record (spec and what it resolved to), or, on resume, check that the global batch is
        the one the run was trained with."""
        if procs.main and procs.ckpt is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_spec_file(run_dir / SPEC_FILE, self.moe_dir, spec, resolved)
        if procs.ckpt is not None:
            saved = json.loads((run_dir / SPEC_FILE).read_text())["resolved"]
            if saved["global_batch"] != resolved["global_batch"]:
                raise SpecError(
                    f"--resume: global batch {resolved['global_batch']} != the run's {saved['global_batch']}; "
                    "keep batch · grad-accum · processes the same"
                )

    # -- the steps -----------------------------------------------------------------------------------------------

    def fit(self, state: RunState) -> Fitted:
        """Step, log and save until the budget is spent, then score the held-out blocks. A stop signal saves the
        last whole step (never a half-done one) and re-raises, naming the checkpoint."""
        spec, position, steps = state.spec, state.position, state.data.steps
        tap = RouterTap(state.core) if router_modules(state.core) else NoRouters()  # a dense model has none
        window = Window()
        t_loop = time.perf_counter()
        bar = TrainBar(steps, position.step, enabled=self.progress and state.procs.main)
        with tap, StopSignals() as stop, bar:
            try:
                while position.step < steps:
                    step = train_step(state, tap, stop)
                    row = log_step(state, tap, window, step, bar)
                    if spec.save_every and position.step % spec.save_every == 0:
                        self.save(state, position.step)
                    if self.callback is not None:
                        self.callback(row)
                    if step.stop:
                        raise stop.request()
            except KeyboardInterrupt as e:
                # a checkpoint only of a whole step: a second signal (StopNow) mid-step must not save a half-done
                # step under the previous step's number
                if state.counters.at_boundary and not isinstance(e, StopNow):
                    self.save(state, position.step)
                state.metrics.close()
                if hasattr(e, "checkpoint"):
                    e.checkpoint = latest_checkpoint(state.run_dir)
                raise
            train_seconds = time.perf_counter() - t_loop
            eval_loss = heldout_loss(state.core, state.data.eval_blocks, spec.batch, state.procs.accelerator)
            tap.clear()
        return Fitted(train_seconds, eval_loss)

    def save(self, state: RunState, step: int) -> None:
        """Checkpoint the run as of `step` (once per step, never step 0); every process writes its part."""
        if step != state.counters.saved_step and step > 0:
            need = state_bytes(state.core, state.optimizer)
            save_checkpoint(state.procs.accelerator, state.run_dir, step, pid=state.owner, need=need)
            state.counters.saved_step = step

    # -- finish --------------------------------------------------------------------------------------------------

    def finish(self, state: RunState, fitted: Fitted, t_start: float) -> TrainResult:
        """Log the final held-out loss, gather the full state dict (every process takes part: FSDP gathers the
        shards to rank 0) and write OUT/model atomically on the main process."""
        acc, counters, position = state.procs.accelerator, state.counters, state.position
        eval_ppl = math.exp(fitted.eval_loss)
        timed = counters.timed_seconds
        tokens_per_s = counters.timed_tokens / timed if timed > 0 else math.nan
        state.metrics.write(
            {
                "step": position.step,
                "tokens": position.tokens,
                "eval_loss": fitted.eval_loss,
                "eval_ppl": eval_ppl,
                "tokens_per_s": tokens_per_s,
                **state.throughput(tokens_per_s),
                "final": True,
            }
        )
        state.metrics.close()
        model_dir = state.run_dir / "model"
        acc.wait_for_everyone()
        # trainable tensors go back to the checkpoint's dtype here, once. An adapter keeps its factors as PEFT
        # made them (fp32); its merge follows the base's dtype.
        state_dict = full_state_dict(acc, state.core)
        if not self.adapter:
            state_dict = cast_floating(state_dict, state.saved_dtype)
        result = TrainResult(
            state.run_dir,
            model_dir,
            position.step,
            position.tokens,
            float(counters.last_row.get("loss", math.nan)),
            fitted.eval_loss,
            eval_ppl,
            state.n_trainable,
            time.perf_counter() - t_start,
            train_seconds=fitted.train_seconds,
            tokens_per_s=tokens_per_s,
            flops_per_token=None if state.flops is None else state.flops.per_token,
            mfu=state.mfu(tokens_per_s),
            eval_blocks=state.data.eval_blocks,
            adapted=state.adapted,
        )
        if state.procs.main:
            with atomic_output_dir(model_dir, overwrite=True, need=model_bytes(state.core)) as tmp:
                self.save_model(state, tmp, state_dict, result)
        acc.wait_for_everyone()
        return result

    def save_model(
        self, state: RunState, tmp: Path, state_dict: dict[str, torch.Tensor], result: TrainResult
    ) -> None:
        """Write the trained model into `tmp` (what becomes OUT/model): weights, tokenizer, moegraft.json and the
        run's record with its result."""
        with peft_calls():
            state.core.save_pretrained(tmp, state_dict=state_dict)
        if not self.adapter:
            record_dtype(tmp, state.saved_dtype)
        state.tok.save_pretrained(tmp)
        meta = self.moe_dir / META_FILE
        if meta.is_file():
            shutil.copy2(meta, tmp / META_FILE)
        outcome = {
            "steps": result.steps,
            "tokens": result.tokens,
            "final_loss": result.final_loss,
            "eval_loss": result.eval_loss,
            "eval_ppl": result.eval_ppl,
        }
        write_spec_file(tmp / SPEC_FILE, self.moe_dir, state.spec, state.resolved, outcome)


def train(
    moe_dir: str | Path,
    out: str | Path,
    spec: TrainSpec,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train a converted MoE checkpoint's router and experts (the rest frozen by default).

    Args:
        moe_dir: a directory written by `moegraft convert` (Qwen2-MoE, GLM-4.5 MoE or Gemma 4 MoE).
        out: run directory: spec, metrics.jsonl, checkpoints/, and the final model in OUT/model.
        spec: what to train, on what, for how long.
        progress: show a live bar (main process only).
        resume: continue from the latest checkpoint in OUT/checkpoints (same spec required).
        overwrite: replace an existing OUT.
        callback: called after each optimizer step with that step's row (tests, notebooks); may raise
            KeyboardInterrupt to stop the run as Ctrl-C would.

    Returns:
        Where the run and model went, the budget spent, and the final held-out perplexity.

    Raises:
        SpecError, SourceError, OutputExistsError, TrainingDivergedError (all MoegraftError).
    """
    recipe = TrainRecipe(
        moe_dir, out, spec, progress=progress, resume=resume, overwrite=overwrite, callback=callback
    )
    return recipe.run()
