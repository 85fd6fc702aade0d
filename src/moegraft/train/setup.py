"""The training recipe's setup steps, each a function of what the earlier ones returned.

In: MOE_DIR, a TrainSpec, a ModelPreparation, the run directory. Out: the pieces of `RunState`: the processes,
the prepared model, the data and step budget, the teacher, the FLOPs per token, the optimizer (checkpoint loaded).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import set_seed
from torch import nn

from moegraft.errors import MoegraftError, SourceError, SpecError
from moegraft.io.atomic import write_text_atomic
from moegraft.io.source import checkpoint_dtype
from moegraft.models import load_causal_lm
from moegraft.train.batches import BlockStream, blocks_digest, read_blocks, split_heldout
from moegraft.train.checkpoint import resume_point
from moegraft.train.fsdp import every_rank_loads, is_fsdp, make_accelerator
from moegraft.train.layerwise import distill_layers
from moegraft.train.losses import heldout_loss
from moegraft.train.precision import DTYPES, load_dtype, resolve_precision, upcast_trainable
from moegraft.train.schedule import cosine_lr
from moegraft.train.spec import TrainSpec, read_meta
from moegraft.train.state import Data, Position, Processes
from moegraft.train.strategies import ModelPreparation, Prepared

if TYPE_CHECKING:
    from moegraft.plan.training import TrainFlops

LAYERWISE_FILE = "layerwise.json"  # OUT/: the layer-wise phase's per-layer errors, before and after


def resolve_spec(moe_dir: Path, spec: TrainSpec, *, adapter: bool) -> tuple[TrainSpec, torch.dtype]:
    """The spec with its 'auto' fields (what trains, lr, teacher, CE weight) following from the checkpoint (a
    carve recovers, a graft learns), and the dtype OUT/model is written in (the checkpoint's own)."""
    spec = spec.for_checkpoint(read_meta(moe_dir), recovery=not adapter)
    cfg_path = moe_dir / "config.json"
    saved_dtype = torch.float32
    if cfg_path.is_file():
        spec.check_model(json.loads(cfg_path.read_text()))
        saved_dtype = checkpoint_dtype(moe_dir)  # from the tensors, as convert decides it
    elif not adapter:
        raise SourceError(f"{moe_dir}: no config.json; pass a directory written by `moegraft convert`")
    return spec, saved_dtype


def start_processes(spec: TrainSpec, run_dir: Path, *, resume: bool, overwrite: bool) -> Processes:
    """accelerate's processes, and the checkpoint a resumed run continues from; seeds every process."""
    precision = resolve_precision(spec.precision, spec.device)
    accelerator = make_accelerator(
        grad_accum=spec.grad_accum, device=spec.device, precision=precision, compile=spec.compile
    )
    main = accelerator.is_main_process
    # the main process checks OUT (and cleans a killed run's temporaries) before the others look for a checkpoint
    ckpt = resume_point(run_dir, spec, resume=resume, overwrite=overwrite) if main else None
    accelerator.wait_for_everyone()
    if resume and not main:
        ckpt = resume_point(run_dir, spec, resume=True, overwrite=False)
    set_seed(spec.seed)
    return Processes(accelerator, precision, main, accelerator.device, ckpt)


def load_model(
    moe_dir: Path, spec: TrainSpec, preparation: ModelPreparation, *, precision: str, saved_dtype: torch.dtype
) -> tuple[Prepared, object, int]:
    """The model prepared for training (fp32 master weights for what trains), its tokenizer, and how many
    parameters train."""
    model, tok = load_causal_lm(moe_dir, device="cpu", dtype=load_dtype(precision, saved_dtype))
    if tok is None:
        raise SourceError(f"{moe_dir}: no tokenizer; convert copies the source's tokenizer files")
    prepared = preparation.prepare(model, tok, moe_dir)
    model = prepared.model
    if precision != "fp32":
        upcast_trainable(model)  # fp32 master weights; the frozen rest keeps the checkpoint's dtype
    if spec.gradient_checkpointing:
        # non-reentrant: gradients reach the trainable layers even though the embeddings' output needs none
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not n_trainable:
        raise SpecError(f"--trainable {','.join(spec.trainable)} selects no parameter of this model")
    return prepared, tok, n_trainable


def load_data(spec: TrainSpec, tok, processes: int) -> Data:
    """The train stream and the held-out blocks; the step budget."""
    # (N, T), or (N, 2, T) with the loss mask
    blocks = read_blocks(spec.data, tok, seq_len=spec.seq_len, loss_mask=spec.loss_mask)
    if spec.eval_data is None:
        blocks, eval_blocks = split_heldout(blocks, spec.eval_fraction, spec.eval_blocks)
    else:
        eval_blocks = read_blocks(
            spec.eval_data, tok, seq_len=spec.seq_len, loss_mask=spec.loss_mask, max_blocks=spec.eval_blocks
        )
    stream = BlockStream(
        blocks, batch=spec.batch, grad_accum=spec.grad_accum, processes=processes, seed=spec.seed
    )
    tokens_per_step = stream.global_batch * spec.seq_len
    if spec.steps is not None:
        steps = spec.steps
    elif spec.tokens is not None:
        steps = math.ceil(spec.tokens / tokens_per_step)
    else:
        steps = max(1, len(blocks) // stream.global_batch)
    warmup = spec.warmup_steps if spec.warmup_steps is not None else steps // 20
    return Data(stream, eval_blocks, steps, warmup, tokens_per_step)


def resolved_record(data: Data, procs: Processes, n_trainable: int) -> dict:
    """What the spec resolved to, for moegraft-train.json: the budget, the processes, fingerprints of the data."""
    blocks, eval_blocks = data.stream.blocks, data.eval_blocks
    return {
        "steps": data.steps,
        "warmup_steps": data.warmup,
        "global_batch": data.stream.global_batch,
        "tokens_per_step": data.tokens_per_step,
        "processes": procs.accelerator.num_processes,
        "precision": procs.precision,
        "fsdp": is_fsdp(procs.accelerator),
        "trainable_params": n_trainable,
        "train_blocks": len(blocks),
        "eval_blocks": len(eval_blocks),
        # fingerprints of the token ids: two runs with equal ones (and seed, global batch) saw the same data
        "train_blocks_sha256": blocks_digest(blocks),
        "eval_blocks_sha256": blocks_digest(eval_blocks),
    }


def load_teacher(spec: TrainSpec, model: nn.Module, procs: Processes) -> nn.Module | None:
    """The frozen teacher of --distill on every process (not sharded), or None."""
    if spec.distill is None:
        return None
    try:
        with every_rank_loads():  # the teacher is not sharded: each process runs all of it
            teacher, _ = load_causal_lm(
                spec.distill, dtype=DTYPES[procs.precision], device=str(procs.device), with_tokenizer=False
            )
    except SourceError as e:  # e.g. a carve's recorded dense source that is not on this machine
        raise SourceError(f"teacher: {e}; pass --distill DENSE (the dense model) or --distill none") from None
    teacher.requires_grad_(False)
    if teacher.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
        raise SpecError(
            f"--distill {spec.distill}: its vocabulary differs from the MoE model's; "
            "the teacher must share the tokenizer"
        )
    return teacher


def count_flops(
    moe_dir: Path, spec: TrainSpec, model: nn.Module, teacher: nn.Module | None, procs: Processes
) -> tuple[TrainFlops | None, float | None]:
    """FLOPs per trained token (moegraft.plan.training.train_flops_per_token, from the model's config and what
    trains) and the peak of every process together, for MFU. A model plan cannot read gets neither (no MFU)."""
    from moegraft.device import peak_flops
    from moegraft.plan.training import train_flops_per_token

    cfg_path = moe_dir / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else model.config.to_dict()
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    teacher_config = None if teacher is None else teacher.config.to_dict()
    try:
        flops = train_flops_per_token(config, trainable, spec.seq_len, teacher_config=teacher_config)
    except (MoegraftError, KeyError, ValueError):  # e.g. a model type plan does not cost
        flops = None
    peak = peak_flops(procs.device, spec.peak_tflops)
    return flops, None if peak is None else peak * procs.accelerator.num_processes


def fit_layers(
    spec: TrainSpec,
    model: nn.Module,
    teacher: nn.Module | None,
    data: Data,
    procs: Processes,
    run_dir: Path,
    *,
    progress: bool,
) -> None:
    """A carve's layer-wise phase (moegraft.train.layerwise) before the end-to-end steps, on a fresh run only
    (a resumed run's checkpoint holds its result); OUT/layerwise.json records each layer's error. Every process
    runs it on the same blocks with the same seed (DDP then starts from rank 0's weights anyway)."""
    if not spec.layerwise_epochs or procs.ckpt is not None:  # the spec refused it without a teacher
        return
    blocks = data.stream.blocks
    if blocks.dim() == 3:  # (N, 2, T) with the loss mask: every token's FFN output counts here
        blocks = blocks[:, 0]
    budget = spec.layerwise_tokens or spec.tokens
    if budget:
        blocks = blocks[: math.ceil(budget / blocks.shape[1])]
    t0 = time.perf_counter()
    model.to(procs.device)  # beside the teacher
    fits = distill_layers(
        model,
        teacher,
        blocks,
        epochs=spec.layerwise_epochs,
        lr=spec.layerwise_lr,
        seed=spec.seed,
        progress=progress and procs.main,
    )
    seconds = time.perf_counter() - t0
    # what the phase alone bought, on the run's held-out blocks (the end-to-end steps start from here)
    eval_loss = heldout_loss(model, data.eval_blocks, spec.batch)
    if procs.main:
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
        write_text_atomic(run_dir / LAYERWISE_FILE, json.dumps(doc, indent=2) + "\n")


def prepare_optimizer(
    spec: TrainSpec, model: nn.Module, data: Data, procs: Processes
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Position]:
    """AdamW and the cosine schedule over what trains, the model prepared by accelerate, and the run's position
    (the checkpoint's state loaded into all of them on --resume)."""
    acc = procs.accelerator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lr(data.steps, data.warmup, spec.min_lr_ratio)
    )
    model.train()
    model, optimizer = acc.prepare(model, optimizer)
    # the scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per process
    position = Position()
    acc.register_for_checkpointing(scheduler, position)
    if procs.ckpt is not None:
        acc.load_state(str(procs.ckpt))
    return model, optimizer, scheduler, position
