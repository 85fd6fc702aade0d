"""The training recipe on accelerate: a converted MoE checkpoint and text in, a trained native checkpoint out.

In: MOE_DIR (from `moegraft convert`), a TrainSpec. Out: OUT/ with `moegraft-train.json`, `metrics.jsonl`,
`checkpoints/step-N/` (accelerate state, safetensors) and `model/` (native checkpoint, written atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from moegraft import __version__
from moegraft.data import pack, pack_masked, read_texts
from moegraft.errors import MoegraftError, OutputExistsError, SourceError, SpecError
from moegraft.io.atomic import atomic_output_dir, write_text_atomic
from moegraft.io.source import checkpoint_dtype
from moegraft.models import load_causal_lm, parameters_by_pathway
from moegraft.routing import RouterTap, router_entropy, router_modules
from moegraft.train.balance import balance_losses, layer_counts, update_selection_bias
from moegraft.train.batches import BlockStream, split_heldout
from moegraft.train.checkpoint import (
    StopNow,
    StopSignals,
    clean_stale_checkpoints,
    latest_checkpoint,
    model_bytes,
    save_checkpoint,
    shared_pid,
    staged_run,
    state_bytes,
    trim_metrics,
)
from moegraft.train.distill import distill_kl
from moegraft.train.fsdp import every_rank_loads, full_state_dict, is_fsdp, make_accelerator
from moegraft.train.metrics import LoadWindow, MetricsLog, TrainBar, load_summary
from moegraft.train.precision import (
    DTYPES,
    cast_floating,
    load_dtype,
    record_dtype,
    resolve_precision,
    upcast_trainable,
)
from moegraft.train.spec import META_FILE, SPEC_FILE, TrainSpec, read_meta


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
    """RouterTap's stand-in for a model without routers (a dense model under `adapt`): records nothing."""

    def __init__(self) -> None:
        self.records: dict = {}
        self.recording = True

    def __enter__(self) -> _NoRouters:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def clear(self) -> None:
        pass


def _lr_lambda(steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def next_token_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy of logits (B, T, V) on ids (B, T), in fp32.

    With a loss mask (B, T), only the targets where it is true count (e.g. assistant tokens of a chat).
    """
    if mask is None:
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()
        )  # (B·(T-1), V) vs (B·(T-1),)
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
    )  # (B·(T-1),)
    m = mask[:, 1:].flatten().to(per_token.dtype)  # (B·(T-1),) the mask of each target token
    # a micro-batch without any target token contributes 0, not NaN
    return (per_token * m).sum() / m.sum().clamp_min(1)


def split_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks (B, T) → (ids, None); masked blocks (B, 2, T) (ids and loss mask stacked) → (ids, mask)."""
    return (x, None) if x.dim() == 2 else (x[:, 0], x[:, 1].bool())


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, blocks: torch.Tensor, batch: int, accelerator: Accelerator | None = None
) -> float:
    """Token-weighted mean next-token loss on blocks (N, T), or masked blocks (N, 2, T) on their masked targets;
    with an accelerator, shared over its processes."""
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    mine = blocks[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    # FSDP gathers each layer's weights in every forward, so every process runs the same number of batches:
    # one whose blocks ran out scores a stand-in block with weight 0
    per_rank = -(-len(blocks) // world)
    for i in range(0, per_rank, batch):
        part = mine[i : i + batch] if i < len(mine) else blocks[:1]
        x, m = split_mask(part.to(device))  # (b, T), (b, T) or None
        n = 0 if i >= len(mine) else x.numel() - x.shape[0] if m is None else int(m[:, 1:].sum())
        total += torch.tensor(
            [float(next_token_loss(model(input_ids=x, use_cache=False).logits, x, m)) * n, n],
            dtype=torch.float64,
            device=device,
        )
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


def _prepare_run_dir(run: Path, spec: TrainSpec, *, resume: bool, overwrite: bool) -> Path | None:
    """Check OUT against --resume/--overwrite; return the checkpoint to resume from (or None)."""
    if resume:
        saved = run / SPEC_FILE
        if not saved.is_file():
            raise MoegraftError(f"--resume: {saved} not found; start without --resume")
        old = TrainSpec.model_validate(json.loads(saved.read_text())["spec"])
        if not old.same_run(spec):
            diff = sorted(
                k
                for k, v in spec.model_dump().items()
                if old.model_dump()[k] != v
                and k not in ("log_every", "save_every", "eval_every", "device", "tensorboard")
            )
            raise SpecError(
                f"--resume: the spec differs from the saved run in {', '.join(diff)}; use the same flags"
            )
        clean_stale_checkpoints(run)  # what a killed run was still writing
        ckpt = latest_checkpoint(run)  # complete ones only: renamed into place with their marker
        if ckpt is None:
            raise MoegraftError(
                f"--resume: no complete checkpoint in {run / 'checkpoints'}; start without --resume"
            )
        trim_metrics(run / "metrics.jsonl", int(ckpt.name.split("-")[1]))
        return ckpt
    # with --overwrite, `staged_run` made `run` a fresh temporary: the old run is replaced only at the end
    if run.exists() and any(run.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{run} already exists; pass --overwrite, --resume, or choose another output path"
        )
    return None


def train(
    moe_dir: str | Path,
    out: str | Path,
    spec: TrainSpec,
    *,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    callback: Callable[[dict], None] | None = None,
    adapt: Callable[[torch.nn.Module, object], torch.nn.Module] | None = None,
) -> TrainResult:
    """Train a converted MoE checkpoint's router and experts (the rest frozen by default).

    Args:
        moe_dir: a directory written by `moegraft convert` (Qwen2-MoE, GLM-4.5 MoE or Gemma 4 MoE); with
            `adapt`, also a dense model (HF directory or .gguf file).
        out: run directory: spec, metrics.jsonl, checkpoints/, and the final model in OUT/model.
        spec: what to train, on what, for how long.
        progress: show a live bar (main process only).
        resume: continue from the latest checkpoint in OUT/checkpoints (same spec required).
        overwrite: replace an existing OUT.
        callback: called after each optimizer step with that step's row (tests, notebooks); may raise
            KeyboardInterrupt to stop the run as Ctrl-C would.
        adapt: `adapt(model, tokenizer) -> model` replaces the freezing by `spec.trainable`: it may wrap the
            loaded model (e.g. in PEFT LoRA adapters, `moegraft finetune`) and leaves requires_grad set on
            exactly what to train; OUT/model then holds what the wrapper's save_pretrained writes.

    Returns:
        Where the run and model went, the budget spent, and the final held-out perplexity.

    Raises:
        SpecError, SourceError, OutputExistsError, TrainingDivergedError (all MoegraftError).
    """
    t_start = time.perf_counter()
    with staged_run(Path(out), overwrite=overwrite and not resume, cpu=spec.device == "cpu") as run:
        result = _train(Path(moe_dir), run, spec, progress, resume, overwrite, callback, adapt, t_start)
    return dataclasses.replace(result, run_dir=Path(out), model_dir=Path(out) / "model")


def _train(moe_dir, run, spec, progress, resume, overwrite, callback, adapt, t_start) -> TrainResult:
    """`train` writing into `run` (OUT itself, or the temporary that replaces it under --overwrite)."""
    meta = moe_dir / META_FILE
    # 'auto' fields (what trains, lr, teacher, CE weight) follow from the checkpoint: a carve recovers, a graft learns
    spec = spec.for_checkpoint(read_meta(moe_dir), recovery=adapt is None)
    cfg_path = moe_dir / "config.json"
    saved_dtype = torch.float32  # what OUT/model is written in: the checkpoint's own dtype
    if cfg_path.is_file():
        spec.check_model(json.loads(cfg_path.read_text()))
        saved_dtype = checkpoint_dtype(moe_dir)  # from the tensors, as convert decides it
    elif adapt is None:
        raise SourceError(f"{moe_dir}: no config.json; pass a directory written by `moegraft convert`")
    # With `adapt`, the source may also be a dense model (an HF dir or a .gguf that load_causal_lm reads, e.g. the
    # dense LoRA baseline of `moegraft compare`): the adapter says what trains, and a model without routers simply
    # has no balance terms or load statistics.

    precision = resolve_precision(spec.precision, spec.device)
    accelerator = make_accelerator(grad_accum=spec.grad_accum, device=spec.device, precision=precision)
    main = accelerator.is_main_process
    ckpt = _prepare_run_dir(run, spec, resume=resume, overwrite=overwrite) if main else None
    accelerator.wait_for_everyone()
    if resume and not main:
        ckpt = _prepare_run_dir(run, spec, resume=True, overwrite=False)
    set_seed(spec.seed)

    model, tok = load_causal_lm(moe_dir, device="cpu", dtype=load_dtype(precision, saved_dtype))
    if tok is None:
        raise SourceError(f"{moe_dir}: no tokenizer; convert copies the source's tokenizer files")
    if adapt is None:
        trainable = {n for p in spec.trainable for n in parameters_by_pathway(model)[p]}
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
    else:
        model = adapt(model, tok)
    if precision != "fp32":
        upcast_trainable(model)  # fp32 master weights; the frozen rest keeps the checkpoint's dtype
    if spec.gradient_checkpointing:
        # non-reentrant: gradients reach the trainable layers even though the embeddings' output needs none
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    if not params:
        raise SpecError(f"--trainable {','.join(spec.trainable)} selects no parameter of this model")

    # data: the train stream and the held-out blocks
    blocks = _blocks(spec.data, tok, spec)  # (N, T), or (N, 2, T) with the loss mask
    if spec.eval_data is None:
        blocks, eval_blocks = split_heldout(blocks, spec.eval_fraction, spec.eval_blocks)
    else:
        eval_blocks = _blocks(spec.eval_data, tok, spec, max_blocks=spec.eval_blocks)
    stream = BlockStream(
        blocks,
        batch=spec.batch,
        grad_accum=spec.grad_accum,
        processes=accelerator.num_processes,
        seed=spec.seed,
    )
    tokens_per_step = stream.global_batch * spec.seq_len
    if spec.steps is not None:
        steps = spec.steps
    elif spec.tokens is not None:
        steps = math.ceil(spec.tokens / tokens_per_step)
    else:
        steps = max(1, len(blocks) // stream.global_batch)
    warmup = spec.warmup_steps if spec.warmup_steps is not None else steps // 20
    resolved = {
        "steps": steps,
        "warmup_steps": warmup,
        "global_batch": stream.global_batch,
        "tokens_per_step": tokens_per_step,
        "processes": accelerator.num_processes,
        "precision": precision,
        "fsdp": is_fsdp(accelerator),
        "trainable_params": n_trainable,
        "train_blocks": len(blocks),
        "eval_blocks": len(eval_blocks),
        # fingerprints of the token ids: two runs with equal ones (and seed, global batch) saw the same data
        "train_blocks_sha256": blocks_digest(blocks),
        "eval_blocks_sha256": blocks_digest(eval_blocks),
    }
    if main and ckpt is None:
        run.mkdir(parents=True, exist_ok=True)
        _write_spec(run / SPEC_FILE, moe_dir, spec, resolved)
    if ckpt is not None:
        saved = json.loads((run / SPEC_FILE).read_text())["resolved"]
        if saved["global_batch"] != resolved["global_batch"]:
            raise SpecError(
                f"--resume: global batch {resolved['global_batch']} != the run's {saved['global_batch']}; "
                "keep batch · grad-accum · processes the same"
            )

    teacher = None
    if spec.distill is not None:
        try:
            with every_rank_loads():  # the teacher is not sharded: each process runs all of it
                teacher, _ = load_causal_lm(
                    spec.distill, dtype=DTYPES[precision], device=str(accelerator.device), with_tokenizer=False
                )
        except SourceError as e:  # e.g. a carve's recorded dense source that is not on this machine
            raise SourceError(f"teacher: {e}; pass --distill DENSE (the dense model) or --distill none") from None
        teacher.requires_grad_(False)
        if teacher.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
            raise SpecError(
                f"--distill {spec.distill}: its vocabulary differs from the MoE model's; "
                "the teacher must share the tokenizer"
            )

    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, warmup, spec.min_lr_ratio))
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them by sharded ones
    # the scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per process
    state = _RunState()
    accelerator.register_for_checkpointing(scheduler, state)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
    core = accelerator.unwrap_model(model)
    device = accelerator.device

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, "sum") if accelerator.num_processes > 1 else t

    log = MetricsLog(run / "metrics.jsonl", tensorboard=spec.tensorboard, enabled=main)
    window = LoadWindow()
    win_sums = torch.zeros(5, dtype=torch.float64)  # loss, ce, kl, aux, z summed over the window's steps
    win_steps, win_t0, last_row = 0, time.perf_counter(), {}
    saved_step = state.step if ckpt is not None else -1

    owner = shared_pid(accelerator)  # names the checkpoint temporaries every process writes into
    at_boundary = True  # False from a step's first forward until its optimizer step and counters are done

    def save(step: int) -> None:
        nonlocal saved_step
        if step != saved_step and step > 0:
            save_checkpoint(accelerator, run, step, pid=owner, need=state_bytes(core, optimizer))
            saved_step = step

    router_tap = RouterTap(core) if router_modules(core) else _NoRouters()  # a dense model has no routers
    t_loop = time.perf_counter()
    with (
        router_tap as tap,
        StopSignals() as stop,
        TrainBar(steps, state.step, enabled=progress and main) as bar,
    ):
        try:
            while state.step < steps:
                at_boundary = False
                step_sums = torch.zeros(6, dtype=torch.float64, device=device)  # 5 losses + the stop flag
                step_counts: dict[int, torch.Tensor] = {}
                entropy: dict[int, float] = {}
                for micro in range(spec.grad_accum):
                    x, mask = split_mask(
                        stream.micro_batch(state.step, micro, accelerator.process_index).to(device)
                    )  # (B, T), (B, T) or None
                    with accelerator.accumulate(model):
                        tap.clear()
                        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
                        ce = next_token_loss(logits, x, mask)
                        kl = torch.zeros((), device=device)
                        if teacher is not None:
                            with torch.no_grad():
                                t_logits = teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
                            kl = distill_kl(logits, t_logits, spec.distill_chunk)
                        aux, z = balance_losses(
                            tap.records,
                            aux=spec.balance == "aux" and spec.aux_coef > 0,
                            z=spec.z_coef > 0,
                            reduce=reduce_sum,
                            # f over the step so far, not this micro-batch alone: global-batch balance
                            prior=step_counts,
                        )
                        loss = spec.ce_weight * ce + spec.distill_weight * kl + spec.aux_coef * aux + spec.z_coef * z
                        parts = torch.stack([loss, ce, kl, aux, z]).detach().double()
                        # every process must agree to stop, or the others would hang in the next collective
                        bad = reduce_sum(
                            torch.tensor([0.0 if torch.isfinite(parts).all() else 1.0], device=device)
                        )
                        if bad.item() > 0:
                            raise TrainingDivergedError(
                                f"non-finite loss at step {state.step + 1} (loss {parts[0].item()}); lower --lr or "
                                + (
                                    f"resume from {run / 'checkpoints'} (last good: step {saved_step})"
                                    if saved_step > 0
                                    else "set --save-every to keep checkpoints"
                                )
                            )
                        tap.recording = False  # checkpointed layers re-run their routers in backward
                        accelerator.backward(loss)
                        tap.recording = True
                        if accelerator.sync_gradients and spec.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, spec.max_grad_norm)
                        optimizer.step()  # a no-op until the last micro-step (accelerate tracks the accumulation)
                        optimizer.zero_grad(set_to_none=True)
                    step_sums[:5] += parts / spec.grad_accum
                    # a model without routers (dense LoRA baseline) records nothing: no counts, E unused
                    E = next((recs[-1].logits.shape[-1] for recs in tap.records.values()), 0)
                    for layer, c in layer_counts(tap.records, E).items():
                        step_counts[layer] = step_counts[layer] + c if layer in step_counts else c
                    for layer, recs in tap.records.items():
                        entropy[layer] = entropy.get(layer, 0.0) + router_entropy(recs[-1]) / spec.grad_accum
                    tap.clear()
                scheduler.step()
                layers = sorted(step_counts)
                counts = (
                    reduce_sum(torch.stack([step_counts[i] for i in layers])) if layers else []
                )  # (L, E) global for the step
                counts = dict(zip(layers, counts, strict=True))
                if spec.balance == "bias":
                    update_selection_bias(core, counts, spec.bias_rate)
                step_sums[5] = float(stop.set)
                step_sums = (
                    accelerator.reduce(step_sums, "mean") if accelerator.num_processes > 1 else step_sums
                )
                state.step += 1
                state.tokens += tokens_per_step
                at_boundary = True
                window.add(counts, entropy)
                win_sums += step_sums[:5].cpu()
                win_steps += 1

                row = {"step": state.step, "loss": float(step_sums[0]), "ce": float(step_sums[1])}
                if state.step % spec.log_every == 0 or state.step == steps:
                    dt = time.perf_counter() - win_t0
                    m = (win_sums / win_steps).tolist()
                    load = load_summary(window.flush())
                    row = {
                        "step": state.step,
                        "tokens": state.tokens,
                        "lr": scheduler.get_last_lr()[0],
                        "loss": m[0],
                        "ce": m[1],
                        "kl": m[2],
                        "aux": m[3],
                        "z": m[4],
                        "tokens_per_s": win_steps * tokens_per_step / dt,
                        **load,
                    }
                    if spec.eval_every and state.step % spec.eval_every == 0 and state.step != steps:
                        row["eval_loss"] = heldout_loss(core, eval_blocks, spec.batch, accelerator)
                        row["eval_ppl"] = math.exp(row["eval_loss"])
                        tap.clear()
                    log.write(row)
                    last_row = row
                    bar.update(
                        tokens_per_s=row["tokens_per_s"],
                        loss=m[0],
                        balance=m[3] if spec.balance == "aux" else m[4],
                        worst_cv=load["worst_cv"] if load["layers"] else None,
                        entropy_norm=load["mean_entropy_norm"],
                    )
                    win_sums.zero_()
                    win_steps, win_t0 = 0, time.perf_counter()
                else:
                    bar.update(
                        tokens_per_s=tokens_per_step / max(1e-9, time.perf_counter() - win_t0) * win_steps,
                        loss=row["loss"],
                        balance=float(step_sums[3]),
                        worst_cv=None,
                    )
                if spec.save_every and state.step % spec.save_every == 0:
                    save(state.step)
                if callback is not None:
                    callback(row)
                if step_sums[5].item() > 0:
                    raise stop.request()
        except KeyboardInterrupt as e:
            # a checkpoint only of a whole step: a second signal (StopNow) mid-step must not save a half-done
            # step under the previous step's number
            if at_boundary and not isinstance(e, StopNow):
                save(state.step)
            log.close()
            if hasattr(e, "checkpoint"):
                e.checkpoint = latest_checkpoint(run)
            raise

        train_seconds = time.perf_counter() - t_loop
        eval_loss = heldout_loss(core, eval_blocks, spec.batch, accelerator)
        tap.clear()
    eval_ppl = math.exp(eval_loss)
    log.write(
        {
            "step": state.step,
            "tokens": state.tokens,
            "eval_loss": eval_loss,
            "eval_ppl": eval_ppl,
            "final": True,
        }
    )
    log.close()

    model_dir = run / "model"
    accelerator.wait_for_everyone()
    # every process takes part (FSDP gathers the shards to rank 0); trainable tensors go back to the checkpoint's
    # dtype here, once. An adapter keeps its factors as PEFT made them (fp32); its merge follows the base's dtype.
    state_dict = full_state_dict(accelerator, model)
    if adapt is None:
        state_dict = cast_floating(state_dict, saved_dtype)
    result = TrainResult(
        run,
        model_dir,
        state.step,
        state.tokens,
        float(last_row.get("loss", math.nan)),
        eval_loss,
        eval_ppl,
        n_trainable,
        time.perf_counter() - t_start,
        train_seconds=train_seconds,
        eval_blocks=eval_blocks,
    )
    if main:
        with atomic_output_dir(model_dir, overwrite=True, need=model_bytes(core)) as tmp:
            core.save_pretrained(tmp, state_dict=state_dict)
            if adapt is None:
                record_dtype(tmp, saved_dtype)
            tok.save_pretrained(tmp)
            if meta.is_file():
                shutil.copy2(meta, tmp / META_FILE)
            _write_spec(
                tmp / SPEC_FILE,
                moe_dir,
                spec,
                resolved,
                {
                    "steps": state.step,
                    "tokens": state.tokens,
                    "final_loss": result.final_loss,
                    "eval_loss": eval_loss,
                    "eval_ppl": eval_ppl,
                },
            )
    accelerator.wait_for_everyone()
    return result


def _blocks(source: str, tok, spec: TrainSpec, max_blocks: int | None = None) -> torch.Tensor:
    """Packed blocks (N, T); with --loss-mask assistant, ids and mask stacked (N, 2, T) so they batch together."""
    if spec.loss_mask == "all":
        return pack(read_texts(source, tokenizer=tok), tok, spec.seq_len, max_blocks=max_blocks)
    docs = read_texts(source, tokenizer=tok, keep_messages=True)
    ids, mask = pack_masked(docs, tok, spec.seq_len, max_blocks=max_blocks)  # (N, T) each
    return torch.stack([ids, mask.long()], 1)  # (N, 2, T)


def blocks_digest(blocks: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of token blocks' ids as int64, in order: equal digests = the same data."""
    return hashlib.sha256(blocks.long().contiguous().numpy().tobytes()).hexdigest()[:16]


def _write_spec(
    path: Path, moe_dir: Path, spec: TrainSpec, resolved: dict, result: dict | None = None
) -> None:
    doc = {
        "moegraft_version": __version__,
        "moe_dir": str(moe_dir),
        "spec": spec.model_dump(),
        "resolved": resolved,
    }
    if result is not None:
        doc["result"] = result
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
