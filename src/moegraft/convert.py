"""Dense checkpoint → native MoE checkpoint, streamed: source → format → init → writer.

In: SRC (dir, hub id or .gguf) and a GraftSpec. Out: a directory with safetensors shards, config.json,
tokenizer files and `moegraft.json`, renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moegraft import __version__
from moegraft.config import GraftSpec, parse_layers
from moegraft.errors import SourceError, SpecError, UnsupportedModelError
from moegraft.formats import OutputFormat, OutTensor, pick_format
from moegraft.formats.base import SourceCache, dense_ffn_layers
from moegraft.init.calibrated import LayerCalibration
from moegraft.init.carve import CarvedLayer, CarveInit
from moegraft.init.experts import DenseFFN, ExpertInit, default_init_std
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

    Returns:
        What was written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite)  # fail before reading any weight
    # Phi-3's fused qkv_proj / gate_up_proj are split here, so every format reads Llama's keys
    source = unfuse(open_source(src, trust_remote_code=trust_remote_code))
    try:
        fmt_cls = pick_format(source.config, spec.format)
        if spec.init == "carve":
            spec, carved = _carve(
                src, source, fmt_cls, spec, calib_blocks, carved, progress, trust_remote_code
            )
        fmt = fmt_cls(source.config, spec)
        depth = int(fmt.text_config["num_hidden_layers"])
        fmt.check_layers(parse_layers(spec.layers, depth), depth)  # spec errors before any calibration
        check_expert_size(spec, int(fmt.text_config["intermediate_size"]))
        fmt.check_sizes(int(fmt.text_config["intermediate_size"]))
        router_init = resolve_router_init(spec, fmt)
        # every output shape is known now (the recipes are lazy): refuse a disk too small before calibrating
        total = sum(o.spec.nbytes for o in plan_outputs(source, fmt, carved)[0])
        check_free(out, total)
        calib = None
        if router_init == "kmeans" or spec.init == "neurons":
            calib = _calibrate(src, source, fmt, router_init, calib_blocks, progress, trust_remote_code)
        outputs, moe_layers = plan_outputs(source, fmt, carved, calib)
        dtype = _out_dtype(spec, source)
        config = fmt.moe_config(moe_layers, dtype)
        plan = [o.spec for o in outputs]
        with atomic_output_dir(out, overwrite, need=total) as tmp:
            # the tokenizer first: a source whose tokenizer cannot be rebuilt (GGUF) fails before any weight is written
            source.copy_aux(tmp)
            for name, path in fmt.extra_files().items():  # e.g. the modeling file a remote-code class needs
                shutil.copy2(path, tmp / name)
            writer = ShardedWriter(tmp, plan, parse_size(max_shard_size))
            with Progress(total, "convert", enabled=progress, unit="B") as bar:
                for o in outputs:
                    writer.write(o.spec.name, o.make())
                    bar.advance(o.spec.nbytes)
            writer.finish()
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            resolved = {
                "moegraft_version": __version__,
                "source": source.origin,
                "format": fmt.name,
                "moe_layers": moe_layers,
                "spec": spec.model_dump(),
                "router_init": router_init,
                "dtype": str(dtype).removeprefix("torch."),
            }
            if calib:
                resolved["calibration"] = {str(i): c.stats for i, c in sorted(calib.items()) if c.stats}
            if carved:
                resolved["carve"] = {
                    str(i): {
                        "router_temperature": c.temperature,
                        "calib_hit_rate": round(c.calib_hit_rate, 4),
                        "calib_rel_error": round(c.calib_rel_error, 5),
                        **(
                            {"calib_rel_error_dense_down": round(c.calib_rel_error_dense_down, 5)}
                            if c.calib_rel_error_dense_down is not None
                            else {}
                        ),
                    }
                    for i, c in sorted(carved.items())
                }
            (tmp / "moegraft.json").write_text(json.dumps(resolved, indent=2) + "\n")
        return ConvertResult(out, fmt.name, moe_layers, len(plan), total, time.perf_counter() - t0)
    finally:
        source.close()


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


def _calibration_model(src, source, spec, blocks, trust_remote_code):
    """(the dense model in the output dtype, calibration blocks (N, T): `blocks`, or read from calib_data)."""
    from moegraft.calibrate import calibration_blocks
    from moegraft.models import load_causal_lm

    model, tok = load_causal_lm(
        src,
        dtype=_out_dtype(spec, source),
        trust_remote_code=trust_remote_code,
        with_tokenizer=blocks is None,
    )
    if blocks is None:
        blocks = calibration_blocks(spec.calib_data, tok, spec.calib_tokens)
    return model, blocks


def _calibrate(src, source, fmt, router_init, blocks, progress, trust_remote_code):
    """layer -> LayerCalibration for every MoE layer, from the dense model run on calibration text."""
    from moegraft.init.calibrated import calibrate_graft

    spec, text = fmt.spec, fmt.text_config
    layers = parse_layers(spec.layers, int(text["num_hidden_layers"]))
    model, blocks = _calibration_model(src, source, spec, blocks, trust_remote_code)
    try:
        return calibrate_graft(
            model,
            blocks,
            spec,
            layers,
            router_init=router_init,
            score=fmt.router_score,
            gemma4=fmt.router_reads_residual,
            progress=progress,
        )
    finally:
        del model


def _carve(src, source, fmt_cls, spec, blocks, carved, progress, trust_remote_code):
    """(resolved spec, layer -> CarvedLayer): the expert size from I, then calibration unless given."""
    from moegraft.init.carve import carve_model, resolve_carve_spec

    if fmt_cls.name != "qwen2_moe":
        why = {
            "gemma4": "Gemma 4 keeps its dense MLP beside the experts and normalises the expert output, so the "
            "experts cannot carry the dense neurons exactly",
        }.get(fmt_cls.name, f"carve is implemented for qwen2_moe only, not {fmt_cls.name}")
        raise UnsupportedModelError(
            f"--init carve: {why}; carve needs a Llama-family model and --format qwen2_moe"
        )
    text = source.config.get("text_config") or source.config
    spec = resolve_carve_spec(spec, int(text["intermediate_size"]))
    if carved is not None:
        return spec, carved
    layers = parse_layers(spec.layers, int(text["num_hidden_layers"]))
    model, blocks = _calibration_model(src, source, spec, blocks, trust_remote_code)
    w0 = fmt_cls(source.config, spec).zero_router_weight()
    carved = carve_model(model, blocks, [spec], layers, [w0], progress=progress)[0]
    return spec, carved


def plan_outputs(
    source: Source,
    fmt: OutputFormat,
    carved: dict[int, CarvedLayer] | None = None,
    calib: dict[int, LayerCalibration] | None = None,
) -> tuple[list[OutTensor], list[int]]:
    """Every output tensor, in write order, each with its recipe; and the MoE layer indices.

    Source tensors keep their order; a MoE layer's new tensors take the place of its dense FFN.
    With `carved`, each MoE layer's FFN is split (CarveInit) instead of grafted onto (ExpertInit); with
    `calib`, grafted layers take their router (and, for init neurons, their experts' neurons) from it.
    """
    spec = fmt.spec
    ffn_layers = dense_ffn_layers(source)
    num_layers = int(fmt.text_config["num_hidden_layers"])
    if sorted(ffn_layers) != list(range(num_layers)):
        raise SourceError(
            f"{source.origin}: found dense FFN weights for {len(ffn_layers)} of {num_layers} layers; "
            "the checkpoint is incomplete or not a dense model"
        )
    moe_layers = parse_layers(spec.layers, num_layers)
    fmt.check_layers(moe_layers, num_layers)
    dtype = _out_dtype(spec, source)
    read = SourceCache(source)
    std = default_init_std(fmt.text_config)
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
        if carved is not None:
            init = CarveInit(ffn, spec, carved[layer], fmt.zero_router_weight())
        else:
            init = ExpertInit(
                ffn,
                spec,
                fmt.zero_router_weight(),
                fmt.renormalises(),
                std,
                fmt.zero_down,
                calib=(calib or {}).get(layer),
            )
        outputs += fmt.moe_layer_tensors(prefix, init, dtype)
    return outputs, moe_layers


def _reader(source: Source, name: str):
    return lambda: source.get(name)


def _cached(read: SourceCache, name: str):
    return lambda: read(name)
