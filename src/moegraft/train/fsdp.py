"""The accelerator of a training run, FSDP2 included, and the full state dict that the final model is saved from.

In: the run's spec (device, gradient accumulation, resolved precision) and accelerate's launch environment
(`accelerate launch --config_file examples/accelerate/fsdp.yaml ...`). Out: an Accelerator, and at the end the full
(unsharded) state dict on the main process.

accelerate 1.15 turns FSDP on only for GPU-like devices: on CPU processes (gloo) it silently falls back to plain
data parallelism. torch's `fully_shard` works on CPU, so when the launcher asked for FSDP and the processes are CPU
ones, `make_accelerator` gives accelerate's state the FSDP plugin the launcher described: the same code path as on
GPUs (sharded prepare, collective state dicts, FSDP checkpoints), which is what lets the CPU test suite cover it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    DynamoBackend,
    FullyShardedDataParallelPlugin,
    TorchDynamoPlugin,
    parse_flag_from_env,
)

from moegraft.errors import SpecError
from moegraft.train.precision import MIXED, Resolved


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (`distributed_type: FSDP` in the accelerate config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def cpu_processes(device: str) -> bool:
    """Whether the run's processes are CPU ones: `--device cpu`, or `auto` on a machine with no accelerator.

    This must be known before the process group forms (`staged_run` builds accelerate's PartialState first, and
    the Accelerator reuses it). Under an FSDP launch accelerate does not pass the config's `use_cpu` on (it sets
    ACCELERATE_USE_CPU only for its other launchers), so `--device auto` on CPUs once gave every process a state
    of its own: each trained alone, believed it was the main one, and wrote OUT."""
    if device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    return device == "auto" and not torch.accelerator.is_available()


def dynamo_plugin(compile: bool) -> TorchDynamoPlugin:
    """`--compile`: inductor over each decoder layer, compiled once and reused by every layer (accelerate's regional
    compilation; the whole model at once would trace every layer anew and take ~L times as long to compile). Without
    it, what the launcher configured (`accelerate launch --dynamo_backend ...`), by default nothing."""
    if compile:
        return TorchDynamoPlugin(backend=DynamoBackend.INDUCTOR, use_regional_compilation=True)
    return TorchDynamoPlugin()


def make_accelerator(
    *, grad_accum: int, device: str, precision: Resolved, compile: bool = False
) -> Accelerator:
    """The run's Accelerator: mixed precision as resolved, DDP or FSDP as launched (FSDP2 also on CPU), the model
    compiled by `prepare` with `compile`.

    Raises:
        SpecError: FSDP version 1 was asked for (moegraft runs FSDP2 only: fully_shard, per-parameter sharding),
            or the launched processes did not join one process group.
    """
    mixed = MIXED[precision]
    dynamo = dynamo_plugin(compile)
    live = AcceleratorState._shared_state
    if (
        live.get("_mixed_precision", mixed) != mixed
        or live.get("dynamo_plugin", dynamo).backend != dynamo.backend
    ):
        # one process may run several trainings (compare, notebooks, tests) at different precisions or with and
        # without --compile; accelerate refuses to change precision on a live state, and keeps the first state's
        # dynamo plugin. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=grad_accum,
        cpu=cpu_processes(device),
        mixed_precision=mixed,
        dynamo_plugin=dynamo,
        # experts that no token picked in a micro-batch get no gradient; DDP must not wait for them
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        # processes that each think they are alone all train the whole model and all write OUT
        raise SpecError(
            f"launched {launched} processes but they did not form one process group; for CPU processes pass "
            "--device cpu"
        )
    if not fsdp_requested():
        return accelerator
    state = accelerator.state
    if state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP) and not state.__dict__.get(
        "fsdp_plugin"
    ):
        plugin = FullyShardedDataParallelPlugin()  # read from the launcher's FSDP_* environment
        if mixed != "no":
            plugin.set_mixed_precision(mixed)
        # AcceleratorState re-reads PartialState's shared dict whenever it is built again: set both
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise SpecError("FSDP version 1 is not supported; set fsdp_version: 2 in the accelerate config")
    return accelerator


def is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of `model` (RunState.core: uncompiled, so under its own names), on the main process
    (empty elsewhere under FSDP). Call on every process: under FSDP it is a collective (each parameter gathered to
    rank 0 and moved to CPU one at a time)."""
    state_dict = accelerator.get_state_dict(model)
    # a tied parameter (lm_head = embed_tokens) comes back under both names, as separate copies under FSDP, where
    # save_pretrained no longer sees the tie and writes both; keep the first name, as one process saves it
    seen: set[int] = set()
    for name, p in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(p) in seen:
            state_dict.pop(name, None)
        seen.add(id(p))
    return state_dict


@contextmanager
def every_rank_loads() -> Iterator[None]:
    """Load a model fully on every process, also under `fsdp_cpu_ram_efficient_loading` (with which transformers
    may read the weights on rank 0 only, for FSDP to broadcast): for models FSDP does not shard, like the teacher."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    old = os.environ.pop(key, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[key] = old
