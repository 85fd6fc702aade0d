"""The training recipe on accelerate: a converted MoE checkpoint and text in, a trained native checkpoint out.

In: MOE_DIR (from `moegraft convert`), a TrainSpec. Out: OUT/ with `moegraft-train.json`, `metrics.jsonl`,
`checkpoints/step-N/` (accelerate state, safetensors) and `model/` (native checkpoint, written atomically).
`TrainRecipe` runs it in named steps: setup, step, log, save, finish. A recipe that trains adapters instead
(`moegraft finetune`, compare's dense LoRA) is a subclass that overrides `prepare_model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn

from moegraft.errors import MoegraftError, SourceError, SpecError
from moegraft.io.atomic import atomic_output_dir, write_text_atomic
from moegraft.io.source import checkpoint_dtype
from moegraft.models import load_causal_lm, parameters_by_pathway, peft_calls
from moegraft.routing import RouterTap, router_entropy, router_modules
from moegraft.train.balance import balance_losses, layer_counts, update_selection_bias
from moegraft.train.batches import BlockStream, blocks_digest, read_blocks, split_heldout
from moegraft.train.checkpoint import (
    StopNow,
    StopSignals,
    latest_checkpoint,
    model_bytes,
    resume_point,
    save_checkpoint,
    shared_pid,
    staged_run,
    state_bytes,
)
from moegraft.train.distill import distill_kl
from moegraft.train.fsdp import cpu_processes, every_rank_loads, full_state_dict, is_fsdp, make_accelerator
from moegraft.train.layerwise import LayerFit, distill_layers
from moegraft.train.losses import heldout_loss, next_token_loss, split_mask
from moegraft.train.metrics import LoadWindow, MetricsLog, TrainBar, load_summary
from moegraft.train.precision import (
    DTYPES,
    cast_floating,
    load_dtype,
    record_dtype,
    resolve_precision,
    upcast_trainable,
)
from moegraft.train.schedule import cosine_lr
from moegraft.train.spec import META_FILE, SPEC_FILE, TrainSpec, read_meta, write_spec_file

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


LAYERWISE_FILE = "layerwise.json"  # OUT/: the layer-wise phase's per-layer errors, before and after


class TrainingDivergedError(MoegraftError):
    """The loss became NaN or Inf; the run stopped and the last good checkpoint was kept."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path  # OUT: spec, metrics, checkpoints
    model_dir: Path  # OUT/model: the trained native checkpoint
    steps: int
    tokens: int
    final_loss: float  # mean training loss of the last logging window
    eval_loss: float
    eval_ppl: float
    trainable_params: int
    seconds: float  # wall time of train(): loading, data, training, evaluation, saving
    train_seconds: float = math.nan  # the training loop alone (what an equal-budget comparison times)
    tokens_per_s: float = math.nan  # tokens fed over the steps' wall time (evaluation and saving left out)
    flops_per_token: float | None = None  # model FLOPs of a step per token (plan.training.TrainFlops)
    mfu: float | None = None  # model FLOPs utilisation: achieved FLOP/s / (peak per device x processes)
    # the held-out blocks (N, T) or (N, 2, T) behind eval_loss, so other models can be scored on exactly them
    eval_blocks: torch.Tensor | None = field(default=None, repr=False, compare=False)


class _RunState:
    """Position of the run, checkpointed with the model so that --resume continues at the same data."""

    def __init__(self) -> None:
        self.step, self.tokens = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.tokens = int(d["step"]), int(d["tokens"])


class _NoRouters:
    """RouterTap's stand-in for a model without routers (a dense model under an adapter): records nothing."""

    def __init__(self) -> None:
        self.records: dict = {}
        self.recording = True

    def __enter__(self) -> _NoRouters:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def clear(self) -> None:
        pass


@dataclass
class _Step:
    """What one optimizer step measured, the same on every process."""

    sums: torch.Tensor  # (6,) loss, ce, kl, aux, z (mean over micro-batches and processes), any stop request
    counts: dict[int, torch.Tensor]  # layer → (E,) the global batch's expert assignments
    entropy: dict[int, float]  # layer → this process's router entropy, mean over micro-batches
    tokens: int = 0  # token ids fed to the model in the step, over every process


class TrainRecipe:
    """One training run in named steps: `setup` (model, data, teacher, optimizer; or the checkpoint resumed),
    `step` (one optimizer step), `log` (a metrics row every log_every steps), `save` (a checkpoint), `finish`
    (held-out loss, OUT/model). `run` joins them in a run directory that --overwrite replaces only at the end.

    A subclass that trains adapters sets `adapter = True` and overrides `prepare_model`.
    """

    # True: `prepare_model` wraps the model in adapters that decide what trains (finetune, compare's dense LoRA).
    # The source may then be a dense model (an HF directory or a .gguf), a carve gets no automatic teacher and
    # keeps the next-token loss, and OUT/model holds what the wrapper's save_pretrained writes, in its dtypes.
    adapter = False

    def __init__(
        self,
        moe_dir: str | Path,
        out: str | Path,
        spec: TrainSpec,
        *,
        progress: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        callback: Callable[[dict], None] | None = None,
    ):
        self.moe_dir, self.out, self.spec = Path(moe_dir), Path(out), spec
        self.progress, self.resume, self.overwrite, self.callback = progress, resume, overwrite, callback

    def run(self) -> TrainResult:
        """setup → step, log, save until the budget is spent → finish; see `train` for what it raises."""
        self.t_start = time.perf_counter()
        with staged_run(
            self.out, overwrite=self.overwrite and not self.resume, cpu=cpu_processes(self.spec.device)
        ) as run_dir:
            self.run_dir = run_dir  # OUT itself, or the temporary that replaces it under --overwrite
            self.setup()
            self.fit()
            result = self.finish()
        return dataclasses.replace(result, run_dir=self.out, model_dir=self.out / "model")

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything the steps need, in order: the spec resolved for the checkpoint, the processes, the model,
        the data and the step budget, the run's record, the teacher, the optimizer (and, with --resume, the
        checkpoint's state)."""
        self._resolve_spec()
        self._start_processes()
        self._load_model()
        self._load_data()
        self._record_run()
        self._load_teacher()
        self._count_flops()
        self._fit_layers()
        self._prepare_optimizer()

    def _resolve_spec(self) -> None:
        # 'auto' fields (what trains, lr, teacher, CE weight) follow from the checkpoint: a carve recovers, a
        # graft learns
        self.spec = self.spec.for_checkpoint(read_meta(self.moe_dir), recovery=not self.adapter)
        cfg_path = self.moe_dir / "config.json"
        self.saved_dtype = torch.float32  # what OUT/model is written in: the checkpoint's own dtype
        if cfg_path.is_file():
            self.spec.check_model(json.loads(cfg_path.read_text()))
            self.saved_dtype = checkpoint_dtype(self.moe_dir)  # from the tensors, as convert decides it
        elif not self.adapter:
            raise SourceError(
                f"{self.moe_dir}: no config.json; pass a directory written by `moegraft convert`"
            )

    def _start_processes(self) -> None:
        spec = self.spec
        self.precision = resolve_precision(spec.precision, spec.device)
        self.accelerator = make_accelerator(
            grad_accum=spec.grad_accum, device=spec.device, precision=self.precision
        )
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        # the main process checks OUT (and cleans a killed run's temporaries) before the others look for a
        # checkpoint in it
        run, resume = self.run_dir, self.resume
        ckpt = resume_point(run, spec, resume=resume, overwrite=self.overwrite) if self.main else None
        self.accelerator.wait_for_everyone()
        if resume and not self.main:
            ckpt = resume_point(run, spec, resume=True, overwrite=False)
        self.ckpt = ckpt
        set_seed(spec.seed)

    def _load_model(self) -> None:
        model, tok = load_causal_lm(
            self.moe_dir, device="cpu", dtype=load_dtype(self.precision, self.saved_dtype)
        )
        if tok is None:
            raise SourceError(f"{self.moe_dir}: no tokenizer; convert copies the source's tokenizer files")
        self.tok = tok
        model = self.prepare_model(model, tok)
        if self.precision != "fp32":
            upcast_trainable(model)  # fp32 master weights; the frozen rest keeps the checkpoint's dtype
        if self.spec.gradient_checkpointing:
            # non-reentrant: gradients reach the trainable layers even though the embeddings' output needs none
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if not self.n_trainable:
            raise SpecError(f"--trainable {','.join(self.spec.trainable)} selects no parameter of this model")

    def prepare_model(self, model: nn.Module, tok) -> nn.Module:
        """The model to train, with requires_grad set on exactly what trains: here the spec's pathways.

        An adapter recipe returns the model wrapped (e.g. in PEFT LoRA adapters) instead."""
        trainable = {n for p in self.spec.trainable for n in parameters_by_pathway(model)[p]}
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        return model

    def _load_data(self) -> None:
        """The train stream and the held-out blocks; the step budget."""
        spec, tok = self.spec, self.tok
        # (N, T), or (N, 2, T) with the loss mask
        blocks = read_blocks(spec.data, tok, seq_len=spec.seq_len, loss_mask=spec.loss_mask)
        if spec.eval_data is None:
            blocks, eval_blocks = split_heldout(blocks, spec.eval_fraction, spec.eval_blocks)
        else:
            eval_blocks = read_blocks(
                spec.eval_data,
                tok,
                seq_len=spec.seq_len,
                loss_mask=spec.loss_mask,
                max_blocks=spec.eval_blocks,
            )
        self.eval_blocks = eval_blocks
        processes = self.accelerator.num_processes
        self.stream = BlockStream(
            blocks, batch=spec.batch, grad_accum=spec.grad_accum, processes=processes, seed=spec.seed
        )
        self.tokens_per_step = self.stream.global_batch * spec.seq_len
        if spec.steps is not None:
            self.steps = spec.steps
        elif spec.tokens is not None:
            self.steps = math.ceil(spec.tokens / self.tokens_per_step)
        else:
            self.steps = max(1, len(blocks) // self.stream.global_batch)
        self.warmup = spec.warmup_steps if spec.warmup_steps is not None else self.steps // 20

    def _record_run(self) -> None:
        """Write the run's record (spec and what it resolved to), or, on resume, check that the global batch is
        the one the run was trained with."""
        spec, blocks, eval_blocks = self.spec, self.stream.blocks, self.eval_blocks
        self.resolved = {
            "steps": self.steps,
            "warmup_steps": self.warmup,
            "global_batch": self.stream.global_batch,
            "tokens_per_step": self.tokens_per_step,
            "processes": self.accelerator.num_processes,
            "precision": self.precision,
            "fsdp": is_fsdp(self.accelerator),
            "trainable_params": self.n_trainable,
            "train_blocks": len(blocks),
            "eval_blocks": len(eval_blocks),
            # fingerprints of the token ids: two runs with equal ones (and seed, global batch) saw the same data
            "train_blocks_sha256": blocks_digest(blocks),
            "eval_blocks_sha256": blocks_digest(eval_blocks),
        }
        if self.main and self.ckpt is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_spec_file(self.run_dir / SPEC_FILE, self.moe_dir, spec, self.resolved)
        if self.ckpt is not None:
            saved = json.loads((self.run_dir / SPEC_FILE).read_text())["resolved"]
            if saved["global_batch"] != self.resolved["global_batch"]:
                raise SpecError(
                    f"--resume: global batch {self.resolved['global_batch']} != the run's {saved['global_batch']}; "
                    "keep batch · grad-accum · processes the same"
                )

    def _load_teacher(self) -> None:
        self.teacher = None
        spec = self.spec
        if spec.distill is None:
            return
        try:
            with every_rank_loads():  # the teacher is not sharded: each process runs all of it
                teacher, _ = load_causal_lm(
                    spec.distill, dtype=DTYPES[self.precision], device=str(self.device), with_tokenizer=False
                )
        except SourceError as e:  # e.g. a carve's recorded dense source that is not on this machine
            raise SourceError(
                f"teacher: {e}; pass --distill DENSE (the dense model) or --distill none"
            ) from None
        teacher.requires_grad_(False)
        if teacher.config.get_text_config().vocab_size != self.model.config.get_text_config().vocab_size:
            raise SpecError(
                f"--distill {spec.distill}: its vocabulary differs from the MoE model's; "
                "the teacher must share the tokenizer"
            )
        self.teacher = teacher

    def _count_flops(self) -> None:
        """FLOPs per trained token (moegraft.plan.training.train_flops_per_token, from the model's config and
        what trains) and the device's peak, for MFU. A model plan cannot read gets neither (no MFU)."""
        from moegraft.device import peak_flops
        from moegraft.plan.training import train_flops_per_token

        cfg_path = self.moe_dir / "config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else self.model.config.to_dict()
        trainable = {n: tuple(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        teacher = None if self.teacher is None else self.teacher.config.to_dict()
        try:
            self.flops = train_flops_per_token(config, trainable, self.spec.seq_len, teacher_config=teacher)
        except (MoegraftError, KeyError, ValueError):  # e.g. a model type plan does not cost
            self.flops = None
        peak = peak_flops(self.device, self.spec.peak_tflops)
        self.peak_flops = None if peak is None else peak * self.accelerator.num_processes
        self.timed_tokens, self.timed_seconds = 0, 0.0  # over every logging window: the run's tokens/s

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.flops is None or self.peak_flops is None:
            return None
        return tokens_per_s * self.flops.per_token / self.peak_flops

    def _fit_layers(self) -> None:
        """A carve's layer-wise phase (moegraft.train.layerwise) before the end-to-end steps, on a fresh run only
        (a resumed run's checkpoint holds its result); OUT/layerwise.json records each layer's error. Every
        process runs it on the same blocks with the same seed (DDP then starts from rank 0's weights anyway)."""
        spec = self.spec
        self.layer_fits: list[LayerFit] = []
        if not spec.layerwise_epochs or self.ckpt is not None:  # the spec refused it without a teacher
            return
        blocks = self.stream.blocks
        if blocks.dim() == 3:  # (N, 2, T) with the loss mask: every token's FFN output counts here
            blocks = blocks[:, 0]
        budget = spec.layerwise_tokens or spec.tokens
        if budget:
            blocks = blocks[: math.ceil(budget / blocks.shape[1])]
        t0 = time.perf_counter()
        self.model.to(self.device)  # beside the teacher
        self.layer_fits = distill_layers(
            self.model,
            self.teacher,
            blocks,
            epochs=spec.layerwise_epochs,
            lr=spec.layerwise_lr,
            seed=spec.seed,
            progress=self.progress and self.main,
        )
        seconds = time.perf_counter() - t0
        # what the phase alone bought, on the run's held-out blocks (the end-to-end steps start from here)
        eval_loss = heldout_loss(self.model, self.eval_blocks, spec.batch)
        if self.main:
            fits = self.layer_fits
            doc = {
                "epochs": spec.layerwise_epochs,
                "lr": spec.layerwise_lr,
                "tokens": int(blocks.numel()),
                "seconds": seconds,
                "eval_loss": eval_loss,
                "eval_ppl": math.exp(eval_loss),
                "mean_rel_error_before": sum(f.rel_error_before for f in fits) / len(fits),
                "mean_rel_error_after": sum(f.rel_error_after for f in fits) / len(fits),
                "layers": [f.record() for f in fits],
            }
            write_text_atomic(self.run_dir / LAYERWISE_FILE, json.dumps(doc, indent=2) + "\n")

    def _prepare_optimizer(self) -> None:
        spec, acc = self.spec, self.accelerator
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_lr(self.steps, self.warmup, spec.min_lr_ratio)
        )
        self.model.train()
        self.model, self.optimizer = acc.prepare(self.model, optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP2 replaced them by shards
        # the scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per
        # process
        self.state = _RunState()
        acc.register_for_checkpointing(self.scheduler, self.state)
        if self.ckpt is not None:
            acc.load_state(str(self.ckpt))
        self.core = acc.unwrap_model(self.model)
        self.owner = shared_pid(acc)  # names the checkpoint temporaries every process writes into
        self.saved_step = self.state.step if self.ckpt is not None else -1
        self.at_boundary = (
            True  # False from a step's first forward until its optimizer step and counters are done
        )
        self.metrics = MetricsLog(
            self.run_dir / "metrics.jsonl", tensorboard=spec.tensorboard, enabled=self.main
        )
        self.window = LoadWindow()
        self.win_sums = torch.zeros(
            5, dtype=torch.float64
        )  # loss, ce, kl, aux, z summed over the window's steps
        self.win_steps, self.win_tokens, self.win_t0, self.last_row = 0, 0, time.perf_counter(), {}

    # -- the steps -----------------------------------------------------------------------------------------------

    def fit(self) -> None:
        """Step, log and save until the budget is spent, then score the held-out blocks. A stop signal saves the
        last whole step (never a half-done one) and re-raises, naming the checkpoint."""
        spec = self.spec
        self.tap = (
            RouterTap(self.core) if router_modules(self.core) else _NoRouters()
        )  # a dense model has none
        t_loop = time.perf_counter()
        with (
            self.tap,
            StopSignals() as self.stop,
            TrainBar(self.steps, self.state.step, enabled=self.progress and self.main) as self.bar,
        ):
            try:
                while self.state.step < self.steps:
                    step = self.step()
                    row = self.log(step)
                    if spec.save_every and self.state.step % spec.save_every == 0:
                        self.save(self.state.step)
                    if self.callback is not None:
                        self.callback(row)
                    if step.sums[5].item() > 0:
                        raise self.stop.request()
            except KeyboardInterrupt as e:
                # a checkpoint only of a whole step: a second signal (StopNow) mid-step must not save a half-done
                # step under the previous step's number
                if self.at_boundary and not isinstance(e, StopNow):
                    self.save(self.state.step)
                self.metrics.close()
                if hasattr(e, "checkpoint"):
                    e.checkpoint = latest_checkpoint(self.run_dir)
                raise
            self.train_seconds = time.perf_counter() - t_loop
            self.eval_loss = heldout_loss(self.core, self.eval_blocks, spec.batch, self.accelerator)
            self.tap.clear()

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, "sum") if self.accelerator.num_processes > 1 else t

    def step(self) -> _Step:
        """One optimizer step over grad_accum micro-batches, then the selection-bias update (--balance bias)."""
        spec, acc, tap = self.spec, self.accelerator, self.tap
        self.at_boundary = False
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)  # 5 losses + the stop flag
        step_counts: dict[int, torch.Tensor] = {}
        entropy: dict[int, float] = {}
        tokens = 0
        for micro in range(spec.grad_accum):
            x, mask = split_mask(
                self.stream.micro_batch(self.state.step, micro, acc.process_index).to(self.device)
            )  # (B, T), (B, T) or None
            tokens += x.numel()
            with acc.accumulate(self.model):
                parts = self._micro_step(x, mask, step_counts)
            sums[:5] += parts / spec.grad_accum
            # a model without routers (dense LoRA baseline) records nothing: no counts, E unused
            E = next((recs[-1].logits.shape[-1] for recs in tap.records.values()), 0)
            for layer, c in layer_counts(tap.records, E).items():
                step_counts[layer] = step_counts[layer] + c if layer in step_counts else c
            for layer, recs in tap.records.items():
                entropy[layer] = entropy.get(layer, 0.0) + router_entropy(recs[-1]) / spec.grad_accum
            tap.clear()
        self.scheduler.step()
        layers = sorted(step_counts)
        counts = (
            self._reduce_sum(torch.stack([step_counts[i] for i in layers])) if layers else []
        )  # (L, E) global for the step
        counts = dict(zip(layers, counts, strict=True))
        if spec.balance == "bias":
            update_selection_bias(self.core, counts, spec.bias_rate)
        sums[5] = float(self.stop.set)
        sums = acc.reduce(sums, "mean") if acc.num_processes > 1 else sums
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        self.at_boundary = True
        # every process feeds micro-batches of one shape (BlockStream), so this process's count times theirs
        return _Step(sums, counts, entropy, tokens * acc.num_processes)

    def _micro_step(
        self, x: torch.Tensor, mask: torch.Tensor | None, prior: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """Forward, loss, backward (and, at the last micro-step, the optimizer step) of one micro-batch (B, T);
        returns its (5,) losses: loss, ce, kl, aux, z. `prior`: the step's counts so far (global-batch balance)."""
        spec, acc, tap = self.spec, self.accelerator, self.tap
        tap.clear()
        logits = self.model(input_ids=x, use_cache=False).logits  # (B, T, V)
        ce = next_token_loss(logits, x, mask)
        kl = torch.zeros((), device=self.device)
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
            kl = distill_kl(logits, t_logits, spec.distill_chunk)
        aux, z = balance_losses(
            tap.records,
            aux=spec.balance == "aux" and spec.aux_coef > 0,
            z=spec.z_coef > 0,
            reduce=self._reduce_sum,
            # f over the step so far, not this micro-batch alone: global-batch balance
            prior=prior,
        )
        loss = spec.ce_weight * ce + spec.distill_weight * kl + spec.aux_coef * aux + spec.z_coef * z
        parts = torch.stack([loss, ce, kl, aux, z]).detach().double()
        # every process must agree to stop, or the others would hang in the next collective
        bad = self._reduce_sum(
            torch.tensor([0.0 if torch.isfinite(parts).all() else 1.0], device=self.device)
        )
        if bad.item() > 0:
            raise TrainingDivergedError(
                f"non-finite loss at step {self.state.step + 1} (loss {parts[0].item()}); lower --lr or "
                + (
                    f"resume from {self.run_dir / 'checkpoints'} (last good: step {self.saved_step})"
                    if self.saved_step > 0
                    else "set --save-every to keep checkpoints"
                )
            )
        tap.recording = False  # checkpointed layers re-run their routers in backward
        acc.backward(loss)
        tap.recording = True
        if acc.sync_gradients and spec.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, spec.max_grad_norm)
        self.optimizer.step()  # a no-op until the last micro-step (accelerate tracks the accumulation)
        self.optimizer.zero_grad(set_to_none=True)
        return parts

    def log(self, step: _Step) -> dict:
        """Add the step to the logging window; every log_every steps (and at the last) write its metrics row, with
        the held-out loss every eval_every steps; move the bar. Returns the step's row (what `callback` gets)."""
        spec, s = self.spec, step.sums
        self.window.add(step.counts, step.entropy)
        self.win_sums += s[:5].cpu()
        self.win_steps += 1
        self.win_tokens += step.tokens
        row = {"step": self.state.step, "loss": float(s[0]), "ce": float(s[1])}
        if self.state.step % spec.log_every != 0 and self.state.step != self.steps:
            self.bar.update(
                tokens_per_s=self.win_tokens / max(1e-9, time.perf_counter() - self.win_t0),
                loss=row["loss"],
                balance=float(s[3]),
                worst_cv=None,
            )
            return row
        if (
            self.device.type == "cuda"
        ):  # the window ends when the GPU has done its steps, not when they are queued
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.win_t0
        self.timed_tokens += self.win_tokens
        self.timed_seconds += dt
        tokens_per_s = self.win_tokens / dt
        m = (self.win_sums / self.win_steps).tolist()
        load = load_summary(self.window.flush())
        row = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "lr": self.scheduler.get_last_lr()[0],
            "loss": m[0],
            "ce": m[1],
            "kl": m[2],
            "aux": m[3],
            "z": m[4],
            # the tokens fed since the last row over the wall time they took (evaluation and saving left out)
            "tokens_per_s": tokens_per_s,
            "window_tokens": self.win_tokens,
            "window_seconds": dt,
            **self._throughput(tokens_per_s),
            **load,
        }
        if spec.eval_every and self.state.step % spec.eval_every == 0 and self.state.step != self.steps:
            row["eval_loss"] = heldout_loss(self.core, self.eval_blocks, spec.batch, self.accelerator)
            row["eval_ppl"] = math.exp(row["eval_loss"])
            self.tap.clear()
        self.metrics.write(row)
        self.last_row = row
        self.bar.update(
            tokens_per_s=row["tokens_per_s"],
            loss=m[0],
            balance=m[3] if spec.balance == "aux" else m[4],
            worst_cv=load["worst_cv"] if load["layers"] else None,
            entropy_norm=load["mean_entropy_norm"],
        )
        self.win_sums.zero_()
        self.win_steps, self.win_tokens, self.win_t0 = 0, 0, time.perf_counter()
        return row

    def _throughput(self, tokens_per_s: float) -> dict:
        """flops_per_token and, when the peak is known, mfu for a metrics row."""
        out: dict = {}
        if self.flops is not None:
            out["flops_per_token"] = self.flops.per_token
        mfu = self._mfu(tokens_per_s)
        if mfu is not None:
            out["mfu"] = mfu
        return out

    def save(self, step: int) -> None:
        """Checkpoint the run as of `step` (once per step, never step 0); every process writes its part."""
        if step != self.saved_step and step > 0:
            need = state_bytes(self.core, self.optimizer)
            save_checkpoint(self.accelerator, self.run_dir, step, pid=self.owner, need=need)
            self.saved_step = step

    # -- finish --------------------------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """Log the final held-out loss, gather the full state dict (every process takes part: FSDP gathers the
        shards to rank 0) and write OUT/model atomically on the main process."""
        eval_ppl = math.exp(self.eval_loss)
        tokens_per_s = self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else math.nan
        self.metrics.write(
            {
                "step": self.state.step,
                "tokens": self.state.tokens,
                "eval_loss": self.eval_loss,
                "eval_ppl": eval_ppl,
                "tokens_per_s": tokens_per_s,
                **self._throughput(tokens_per_s),
                "final": True,
            }
        )
        self.metrics.close()
        model_dir = self.run_dir / "model"
        self.accelerator.wait_for_everyone()
        # trainable tensors go back to the checkpoint's dtype here, once. An adapter keeps its factors as PEFT
        # made them (fp32); its merge follows the base's dtype.
        state_dict = full_state_dict(self.accelerator, self.model)
        if not self.adapter:
            state_dict = cast_floating(state_dict, self.saved_dtype)
        result = TrainResult(
            self.run_dir,
            model_dir,
            self.state.step,
            self.state.tokens,
            float(self.last_row.get("loss", math.nan)),
            self.eval_loss,
            eval_ppl,
            self.n_trainable,
            time.perf_counter() - self.t_start,
            train_seconds=self.train_seconds,
            tokens_per_s=tokens_per_s,
            flops_per_token=None if self.flops is None else self.flops.per_token,
            mfu=self._mfu(tokens_per_s),
            eval_blocks=self.eval_blocks,
        )
        if self.main:
            with atomic_output_dir(model_dir, overwrite=True, need=model_bytes(self.core)) as tmp:
                self.save_model(tmp, state_dict, result)
        self.accelerator.wait_for_everyone()
        return result

    def save_model(self, tmp: Path, state_dict: dict[str, torch.Tensor], result: TrainResult) -> None:
        """Write the trained model into `tmp` (what becomes OUT/model): weights, tokenizer, moegraft.json and the
        run's record with its result."""
        with peft_calls():
            self.core.save_pretrained(tmp, state_dict=state_dict)
        if not self.adapter:
            record_dtype(tmp, self.saved_dtype)
        self.tok.save_pretrained(tmp)
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
        write_spec_file(tmp / SPEC_FILE, self.moe_dir, self.spec, self.resolved, outcome)


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
