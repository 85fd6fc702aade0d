"""Dense checkpoint → native MoE checkpoint, streamed, in five steps that read top to bottom in `convert`:
open the source → resolve the format and the spec → calibrate (when the spec asks: a carve, a k-means router,
experts from dense neurons) → plan every output tensor with its recipe → write.

In: SRC (dir, hub id or .gguf) and a GraftSpec. Out: a directory with safetensors shards, config.json,
tokenizer files and `moegraft.json`, renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from moegraft import __version__
from moegraft.config import GraftSpec, parse_layers
from moegraft.device import resolve_device
from moegraft.errors import MissingTokenizerError, SourceError, SpecError
from moegraft.formats import OutputFormat, OutTensor, resolve_format
from moegraft.formats.base import SourceCache, dense_ffn_layers
from moegraft.init.carve import CarvedLayer, CarveInit, read_spilled, refits_down
from moegraft.init.experts import DenseFFN, ExpertInit, LayerCalibration, default_init_std
from moegraft.io.atomic import staging_dir
from moegraft.io.fused import unfuse
from moegraft.io.source import Source, open_source, storage_dtype
from moegraft.io.space import check_free
from moegraft.io.writer import ShardedWriter, atomic_output_dir, check_output, parse_size
from moegraft.progress import Progress


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    format: str
    moe_layers: list[int]
    tensors: int
    bytes_written: int
    seconds: float


def convert(
    src: str,
    out: str | Path,
    spec: GraftSpec,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    trust_remote_code: bool = False,
    progress: bool = True,
    calib_blocks: torch.Tensor | None = None,
    carved: dict[int, CarvedLayer] | None = None,
    device: str | torch.device = "auto",
) -> ConvertResult:
    """Graft routed experts onto every selected dense FFN of SRC and write a native MoE checkpoint.

    Args:
        src: a local HF directory, a hub id, or a .gguf file.
        out: output directory; must not exist unless `overwrite`.
        spec: the graft spec.
        max_shard_size: largest safetensors shard, e.g. "2GB"; also bounds nothing in memory (tensors
            are streamed one at a time).
        progress: show a progress bar.
        calib_blocks: calibration token ids (N, T) instead of reading spec.calib_data (kmeans router,
            init neurons, carve).
        carved: carve only: layer -> CarvedLayer computed beforehand (e.g. by carve_model for several
            specs at once); skips calibration.
        device: where calibration runs: auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda,
            cuda:N. It computes in fp32 there as on the CPU; only the layer being calibrated is on the device.

    Returns:
        What was written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    device = resolve_device(device)
    check_output(out, overwrite)  # fail before reading any weight
    stored = open_source(src, trust_remote_code=trust_remote_code)
    source = unfuse(stored)  # Phi-3's fused qkv_proj / gate_up_proj split, so every format reads Llama's keys
    with ExitStack() as scratch:
        scratch.callback(source.close)
        # 1. the format and every spec check, before any weight is read
        plan = resolve(source.config, spec)
        fmt, router_init = plan.fmt, plan.router_init
        dtype = _out_dtype(fmt.spec, source)
        # 2. a disk too small is refused before calibrating (plan's count; the writer checks the exact bytes)
        spill_bytes = _spill_bytes(plan) if carved is None else 0
        check_free(out, _planned_bytes(fmt, dtype) + spill_bytes)
        # 3. calibration, when the spec asks for it: how each layer's experts and router start. A carve's refitted
        # down projections wait on disk beside the output until they are written, not in memory
        spill = None
        if spill_bytes:
            spill = scratch.enter_context(staging_dir(out.parent / f"{out.name}.carve", need=spill_bytes))
            scratch.callback(read_spilled.cache_clear)
        inits = calibrate(src, stored, plan, calib_blocks, carved, progress, trust_remote_code, spill, device)
        # 4. every output tensor, each with its recipe
        outputs, moe_layers = plan_outputs(source, plan, inits)
        # 5. write, renamed into place only when complete
        record = {
            "moegraft_version": __version__,
            "source": source.origin,
            "format": fmt.name,
            "moe_layers": moe_layers,
            "spec": fmt.spec.model_dump(),
            "router_init": router_init,
            "dtype": str(dtype).removeprefix("torch."),
            **inits.record(),
            # numbers computed on a GPU differ from the CPU's in the last bits (other kernels, summation orders)
            **({"calibration_device": str(device)} if inits.calibrated else {}),
        }
        # a source without a tokenizer gets the one it was calibrated with, which train and eval need too
        tok = calibration_tokenizer(src, fmt.spec, trust_remote_code) if fmt.spec.calib_tokenizer else None
        total = _write(out, overwrite, source, fmt, fmt.moe_config(moe_layers, dtype), outputs, record,
                       max_shard_size, progress, tok)  # fmt: skip
        return ConvertResult(out, fmt.name, moe_layers, len(outputs), total, time.perf_counter() - t0)


@dataclass(frozen=True)
class Resolved:
    """The spec resolved against the source's config, once per convert: every later step reads it.

    fmt: the output format, holding the resolved spec. router_init: the router the graft starts with.
    layers: the MoE layer indices. num_layers: the source's depth.
    """

    fmt: OutputFormat
    router_init: str
    layers: tuple[int, ...]
    num_layers: int


def resolve(config: dict, spec: GraftSpec) -> Resolved:
    """The output format, the router init and the MoE layers: every spec error, before any weight.

    Raises:
        UnsupportedModelError: no exact format for this model, or one that cannot hold a carve.
        SpecError: layers, sizes or router init the format cannot take.
    """
    fmt = resolve_format(config, spec)
    check_expert_size(fmt.spec, int(fmt.text_config["intermediate_size"]))
    router_init = resolve_router_init(fmt.spec, fmt)
    num_layers = int(fmt.text_config["num_hidden_layers"])
    layers = tuple(parse_layers(fmt.spec.layers, num_layers))
    return Resolved(fmt, router_init, layers, num_layers)


def _spill_bytes(plan: Resolved) -> int:
    """Bytes a carve's refitted down projections (fp32 (H, I) per MoE layer) take on disk while converting."""
    spec, c = plan.fmt.spec, plan.fmt.text_config
    if spec.init != "carve" or not refits_down(spec):
        return 0
    return len(plan.layers) * int(c["hidden_size"]) * int(c["intermediate_size"]) * 4


# what marks a saved tokenizer (transformers writes tokenizer_config.json beside whichever of the others it has)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def _planned_bytes(fmt: OutputFormat, dtype: torch.dtype) -> int:
    """Bytes of the MoE's text model at `dtype`, from plan's count of the model the format's config describes."""
    from moegraft.plan import graft_arch
    from moegraft.plan.cost import cost

    arch, _, _ = graft_arch(fmt.config, fmt.spec)
    return cost(arch, 1, 1, None).total_params * dtype.itemsize


def _write(
    out: Path,
    overwrite: bool,
    source: Source,
    fmt: OutputFormat,
    config: dict,
    outputs: list[OutTensor],
    record: dict,
    max_shard_size: str | int,
    progress: bool,
    tokenizer=None,
) -> int:
    """Tokenizer, the format's extra files, shards, config.json and moegraft.json into a temporary directory
    renamed to `out`; the bytes. `tokenizer` is saved there when the source brought none."""
    total = sum(o.spec.nbytes for o in outputs)
    with atomic_output_dir(out, overwrite, need=total) as tmp:
        # the tokenizer first: a source whose tokenizer cannot be rebuilt (GGUF) fails before any weight is written
        source.copy_aux(tmp)
        if tokenizer is not None and not any((tmp / f).is_file() for f in TOKENIZER_FILES):
            tokenizer.save_pretrained(tmp)
        for name, path in fmt.extra_files().items():  # e.g. the modeling file a remote-code class needs
            shutil.copy2(path, tmp / name)
        writer = ShardedWriter(tmp, [o.spec for o in outputs], parse_size(max_shard_size))
        with Progress(total, "convert", enabled=progress, unit="B") as bar:
            for o in outputs:
                writer.write(o.spec.name, o.make())
                bar.advance(o.spec.nbytes)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "moegraft.json").write_text(json.dumps(record, indent=2) + "\n")
    return total


def _out_dtype(spec: GraftSpec, source: Source) -> torch.dtype:
    """The output's floating dtype: --dtype, else the one the source's tensors are stored in (not config.json's
    `torch_dtype`, which may be missing or say another dtype than the tensors have)."""
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return storage_dtype(source)


def check_expert_size(spec: GraftSpec, intermediate_size: int) -> None:
    """Raise SpecError if the init takes dense neurons (upcycle, neurons) and I_e exceeds the dense I."""
    I = intermediate_size
    if spec.init in ("upcycle", "neurons") and spec.expert_size > I:
        raise SpecError(
            f"--expert-size {spec.expert_size} > the dense FFN's {I} neurons; --init {spec.init} takes "
            f"dense neurons, so use --expert-size <= {I}, or --init zero"
        )


def resolve_router_init(spec: GraftSpec, fmt: OutputFormat) -> str:
    """The router the graft starts with: 'kmeans' (fitted to calibration text), 'random', 'zero' or 'carve'.

    'auto' means kmeans, except where the init fixes the router: upcycled copies in a format that does not
    renormalise are exact only under a zero router (every chosen weight w0), and carve fits its own.

    Raises:
        SpecError: --router-init kmeans with upcycled copies in a non-renormalising format.
    """
    if spec.init == "carve":
        return "carve"
    I = int(fmt.text_config["intermediate_size"])
    if spec.init == "upcycle" and spec.expert_size == I and not fmt.renormalises():
        if spec.router_init == "kmeans":
            raise SpecError(
                f"--router-init kmeans: upcycled copies in {fmt.name} without renormalisation are exact only "
                "under a zero router; use --router-init auto, --norm-topk-prob, or --init neurons"
            )
        return "zero"
    return "kmeans" if spec.router_init == "auto" else spec.router_init


@dataclass
class LayerInits:
    """How each MoE layer starts: a graft (ExpertInit, with its layer's calibration if any) or a carve (CarveInit
    of its CarvedLayer). A format gets one of these per layer and asks it for tensors, never which one it is."""

    fmt: OutputFormat
    calib: dict[int, LayerCalibration] | None = None
    carved: dict[int, CarvedLayer] | None = None
    calibrated: bool = (
        False  # this convert ran the model on calibration text (not given a carve, none needed)
    )

    def __call__(self, ffn: DenseFFN) -> ExpertInit | CarveInit:
        fmt = self.fmt
        if self.carved is not None:
            return CarveInit(ffn, fmt.spec, self.carved[ffn.layer], fmt.zero_router_weight())
        return ExpertInit(
            ffn,
            fmt.spec,
            fmt.zero_router_weight(),
            fmt.renormalises(),
            default_init_std(fmt.text_config),
            fmt.zero_down,
            calib=(self.calib or {}).get(ffn.layer),
        )

    def record(self) -> dict:
        """What calibration decided, for moegraft.json."""
        out: dict = {}
        if self.calib:
            out["calibration"] = {str(i): c.stats for i, c in sorted(self.calib.items()) if c.stats}
        if self.carved:
            out["carve"] = {str(i): c.record() for i, c in sorted(self.carved.items())}
        return out


def calibrate(
    src: str,
    stored: Source,
    plan: Resolved,
    blocks: torch.Tensor | None,
    carved: dict[int, CarvedLayer] | None,
    progress: bool,
    trust_remote_code: bool,
    spill: Path | None = None,
    device: torch.device | None = None,
) -> LayerInits:
    """Run the dense model on calibration text when the spec needs it (a carve, a k-means router, experts from
    dense neurons) and say how each layer starts. `carved` (computed beforehand) skips a carve's calibration.

    The Llama family (LAYERWISE_TYPES) is calibrated on a skeleton filled from `stored` (the source as stored,
    Phi-3's projections fused, as its model class names them) one layer at a time (`moegraft.streamed`): the
    peak memory is a layer's, not the model's. The other families run their whole loaded model. `spill`: where
    a carve's refitted down projections wait (carve_model's). `device`: where the model's layers and every fit
    run (None: the CPU); what it decides comes back in host memory.
    """
    fmt, router_init = plan.fmt, plan.router_init
    spec = fmt.spec
    needs = (spec.init == "carve" and carved is None) or router_init == "kmeans" or spec.init == "neurons"
    if not needs:
        return LayerInits(fmt, carved=carved)
    from moegraft.calibrate import LAYERWISE_TYPES, calibration_blocks
    from moegraft.models import load_causal_lm
    from moegraft.streamed import StreamedWeights, skeleton

    layers = list(plan.layers)
    dtype = _out_dtype(spec, stored)
    device = device or torch.device("cpu")
    # the tokenizer first: a source without one fails before any weight is read
    tok = calibration_tokenizer(src, spec, trust_remote_code) if blocks is None else None
    weights = None
    if stored.config.get("model_type") in LAYERWISE_TYPES:
        model = skeleton(stored.config, dtype, device)
        weights = StreamedWeights(model, stored, device)
    else:
        model, _ = load_causal_lm(
            src, dtype=dtype, device=str(device), trust_remote_code=trust_remote_code, with_tokenizer=False
        )
    try:
        if blocks is None:
            blocks = calibration_blocks(spec.calib_data, tok, spec.calib_tokens)
        if spec.init == "carve":
            from moegraft.init.carve import carve_model

            w0 = fmt.zero_router_weight()
            (carve,) = carve_model(
                model, blocks, [spec], layers, [w0], progress=progress, weights=weights, spill=spill
            )
            return LayerInits(fmt, carved=carve, calibrated=True)
        from moegraft.init.calibrated import calibrate_graft

        calib = calibrate_graft(
            model,
            blocks,
            spec,
            layers,
            router_init=router_init,
            score=fmt.router_score,
            router_reads_residual=fmt.router_reads_residual,
            progress=progress,
            weights=weights,
        )
        return LayerInits(fmt, calib=calib, calibrated=True)
    finally:
        del model


def calibration_tokenizer(src: str, spec: GraftSpec, trust_remote_code: bool = False):
    """The tokenizer calibration reads --calib-data with: --calib-tokenizer's, else the source's.

    Raises:
        MissingTokenizerError: none loads; the message says why calibration needs one and how to do without.
    """
    from moegraft.models import load_tokenizer

    where = spec.calib_tokenizer or src
    try:
        return load_tokenizer(where, trust_remote_code=trust_remote_code)
    except SourceError as load_error:
        e = load_error
        folder = Path(where).expanduser()
        if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            e = SourceError(f"{where}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)})")
        if spec.calib_tokenizer:
            raise MissingTokenizerError(f"--calib-tokenizer {e}") from None
        fixes = (
            "pass --calib-tokenizer PATH (the model's tokenizer: a directory, hub id or .gguf)"
            if spec.init == "carve"
            else "pass --calib-tokenizer PATH (the model's tokenizer: a directory, hub id or .gguf), or convert "
            "without calibration: --router-init random --init zero"
        )
        raise MissingTokenizerError(
            f"{e}; calibration (the default kmeans router and --init neurons, or a carve) tokenizes "
            f"--calib-data with the model's tokenizer: {fixes}"
        ) from None


def plan_outputs(source: Source, plan: Resolved, inits: LayerInits) -> tuple[list[OutTensor], list[int]]:
    """Every output tensor, in write order, each with its recipe; and the MoE layer indices.

    Source tensors keep their order; a MoE layer's new tensors take the place of its dense FFN, made by the
    format from the layer's init (`inits`: a graft or a carve, calibrated or not).
    """
    fmt = plan.fmt
    spec = fmt.spec
    ffn_layers = dense_ffn_layers(source)
    num_layers = plan.num_layers
    if sorted(ffn_layers) != list(range(num_layers)):
        raise SourceError(
            f"{source.origin}: found dense FFN weights for {len(ffn_layers)} of {num_layers} layers; "
            "the checkpoint is incomplete or not a dense model"
        )
    moe_layers = list(plan.layers)
    dtype = _out_dtype(spec, source)
    read = SourceCache(source)
    ffn_keys = {}
    for i in moe_layers:
        for proj in ("gate", "up", "down"):
            ffn_keys[f"{ffn_layers[i]}mlp.{proj}_proj.weight"] = i
    outputs: list[OutTensor] = []
    done: set[int] = set()
    for name in source.tensor_names():
        layer = ffn_keys.get(name)
        if layer is None:
            src_dtype = source.dtype(name)
            # --dtype auto copies every tensor in its own dtype (a float32 norm in a bf16 checkpoint stays float32)
            out_dtype = dtype if src_dtype.is_floating_point and spec.dtype != "auto" else src_dtype
            outputs += fmt.passthrough(name, source.shape(name), out_dtype, _reader(source, name))
            continue
        if layer in done:
            continue
        done.add(layer)
        prefix = ffn_layers[layer]
        I, H = source.shape(f"{prefix}mlp.gate_proj.weight")
        ffn = DenseFFN(
            layer,
            I,
            H,
            *(_cached(read, f"{prefix}mlp.{p}_proj.weight") for p in ("gate", "up", "down")),
            read=lambda n: source.get(n).float(),
        )
        outputs += fmt.moe_layer_tensors(prefix, inits(ffn), dtype)
    return outputs, moe_layers


def _reader(source: Source, name: str):
    return lambda: source.get(name)


def _cached(read: SourceCache, name: str):
    return lambda: read(name)
