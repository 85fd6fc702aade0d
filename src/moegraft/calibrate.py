"""Calibration for carving and for data-set routers: token blocks in, each layer's FFN inputs out.

In: a dense model and token blocks (N, T). Out: per layer l, the (N·T, H) inputs of its FFN. For the Llama family
(LAYERWISE_TYPES) they are computed by propagating the residual stream layer by layer, so only the residual
stream, one layer (in fp32 while it runs) and that layer's FFN inputs are in memory beside the model's weights;
with `moegraft.streamed` the model itself is a skeleton filled one layer at a time, so nothing else is. All of it
lives on the device the model's weights are held on (`convert --device`: a GPU holds one layer, not the model). Gemma 4
(per-layer inputs, shared KV layers) and Qwen3.5 run their own forward; their inputs are captured by hooks.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from moegraft.data import pack, read_texts
from moegraft.errors import MoegraftError
from moegraft.progress import Progress

CALIB_SEQ_LEN = 256  # tokens per calibration block: long enough for attention context, short enough to batch
# Decoder stacks that `ffn_inputs_by_layer` replays one layer at a time (Llama's layer call, one mask per layer
# type, the FFN output added straight to the residual); any other stack is calibrated by hooks in its own forward.
LAYERWISE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def calibration_blocks(data: str, tokenizer, tokens: int, seq_len: int = CALIB_SEQ_LEN) -> torch.Tensor:
    """Token blocks (N, T) of at most `tokens` tokens from `data` (what `read_texts` accepts).

    Raises:
        MoegraftError: no tokenizer, or the data gives less than one block.
    """
    if tokenizer is None:
        raise MoegraftError("carve calibration needs the source's tokenizer to read --calib-data")
    seq_len = min(seq_len, tokens)
    return pack(
        read_texts(data, tokenizer=tokenizer), tokenizer, seq_len, max_blocks=math.ceil(tokens / seq_len)
    )


# transformers renamed the mask builders' `past_key_values` argument to `cache` (5.17 has only the old name, 5.25
# both): pass the installed release's name, as models.cached_forward does for the forward
_MASK_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
)


def _masks(model, embeds: torch.Tensor, position_ids: torch.Tensor) -> list:
    """Per-layer attention mask for blocks shaped like `embeds` (B, T, H): full or sliding, as the model does."""
    cfg = model.config
    kw = dict(config=cfg, inputs_embeds=embeds, attention_mask=None, position_ids=position_ids)
    kw[_MASK_CACHE_ARG] = None
    types = getattr(cfg, "layer_types", None)
    L = cfg.num_hidden_layers
    if types is None:  # Mistral: one window for every layer, or none (Llama)
        sliding = [bool(getattr(cfg, "sliding_window", None))] * L
    else:
        sliding = [t == "sliding_attention" for t in types]
    full = create_causal_mask(**kw)
    window = create_sliding_window_causal_mask(**kw) if any(sliding) else None
    return [window if s else full for s in sliding]


class LoadedWeights:
    """Module weights of a model loaded whole: `held` has nothing to do, `running` upcasts a layer to fp32 for its
    forward (bf16 -> fp32 -> bf16 is lossless). `moegraft.streamed.StreamedWeights` holds a skeleton's module
    weights only from `held`'s start to its end, read from the source."""

    def held(self, module: nn.Module):
        """Context: the module's weights present, in the model's dtype (the caller may read them)."""
        return nullcontext()

    @contextmanager
    def running(self, module: nn.Module) -> Iterator[None]:
        """Context: a held layer in fp32 for its forward; each parameter gets its own dtype back after (under mixed
        precision a layer holds frozen bf16 weights beside fp32 trainable ones)."""
        dtypes = [(p, p.dtype) for p in module.parameters()]
        module.float()
        try:
            yield
        finally:
            for p, dtype in dtypes:
                p.data = p.data.to(dtype)


@torch.no_grad()
def ffn_inputs_by_layer(
    model,
    blocks: torch.Tensor,
    *,
    batch: int = 8,
    progress: bool = True,
    ffn_out: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    weights: LoadedWeights | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (layer, X) with X (N·T, H) the inputs of that layer's FFN, layer after layer.

    The residual stream of all blocks, (N, T, H), is the only state carried between layers; each layer's
    FFN inputs are captured by a pre-hook on its `mlp` and dropped once the caller moves on. The layer's weights
    are held (`weights.held`) until then, so the caller may read them from the model.

    Args:
        model: a dense LlamaForCausalLM-like model (`model.model.layers[i].mlp`), in eval mode.
        blocks: token ids (N, T).
        batch: blocks per forward through one layer.
        progress: one progress step per layer.
        ffn_out: sequential calibration: once the caller is done with (layer, X), `ffn_out(layer, X)` gives the
            (N·T, H) output that replaces the layer's FFN in the residual stream (e.g. the carved FFN, so the
            next layer sees what the converted model will feed it); None from it keeps the dense FFN.
        weights: when each module's weights are present and in fp32: LoadedWeights (the default) for a model
            loaded whole, `moegraft.streamed.StreamedWeights` for a skeleton read one module at a time.
    """
    weights = weights or LoadedWeights()
    inner = model.model
    T = blocks.shape[1]
    with weights.held(inner.embed_tokens):
        device = inner.embed_tokens.weight.device
        # the residual stream in fp32 whatever the model's dtype (bf16 keeps the loaded model half the size)
        hidden = [
            inner.embed_tokens(blocks[i : i + batch].to(device)).float() for i in range(0, len(blocks), batch)
        ]
    position_ids = torch.arange(T, device=device)[None]  # (1, T)
    pe = inner.rotary_emb(hidden[0], position_ids=position_ids)  # (cos, sin), each (1, T, hd)
    # keyed by batch size: the last batch may be shorter
    masks = {len(h): _masks(model, h, position_ids) for h in hidden}
    layers = inner.layers[: model.config.num_hidden_layers]
    with Progress(len(layers), "calibrate (layers)", enabled=progress) as bar:
        for i, layer in enumerate(layers):
            captured: list[torch.Tensor] = []

            def keep(_module, args, captured=captured):
                captured.append(args[0].reshape(-1, args[0].shape[-1]))  # (b·T, H)

            hooks = [layer.mlp.register_forward_pre_hook(keep)]
            dense_out: list[torch.Tensor] = []
            if ffn_out is not None:  # the FFN's output is kept aside and added back below, dense or replaced

                def aside(_module, _args, out, dense_out=dense_out):
                    dense_out.append(out)
                    return torch.zeros_like(out)

                hooks.append(layer.mlp.register_forward_hook(aside))
            with weights.held(layer):
                with weights.running(layer):
                    try:
                        for j, h in enumerate(hidden):
                            out = layer(
                                h,
                                attention_mask=masks[len(h)][i],
                                position_embeddings=pe,
                                position_ids=position_ids,
                            )
                            hidden[j] = out[0] if isinstance(out, tuple) else out
                    finally:
                        for hook in hooks:
                            hook.remove()
                X = torch.cat(captured).float()  # (N·T, H)
                captured.clear()
                yield i, X
                if ffn_out is not None:
                    Y = ffn_out(i, X)  # (N·T, H) or None
                    parts = dense_out if Y is None else Y.split([h.shape[0] * h.shape[1] for h in hidden])
                    for j, y in enumerate(
                        parts
                    ):  # the Llama family adds the FFN output straight to the residual
                        hidden[j] = hidden[j] + y.reshape(hidden[j].shape).to(hidden[j].dtype)
                del X
                dense_out.clear()
            bar.advance(1)


def dense_mlp_weights(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (I, H), up (I, H), down (H, I)) of a dense gated MLP, fp32; Phi-3 fuses gate and up (gate rows first)."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj.weight.float().chunk(2, dim=0)  # (I, H) each
    else:
        gate, up = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()
    return gate, up, mlp.down_proj.weight.float()


def mlp_act(mlp):
    """The MLP's activation function."""
    return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn  # Phi3MLP names it activation_fn


def decoder_layers(model) -> list:
    """The text decoder's layers of a causal LM (multimodal wrappers nest it under language_model)."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return list(inner.layers[: model.config.get_text_config().num_hidden_layers])


@torch.no_grad()
def residuals_by_layer(
    model, blocks: torch.Tensor, layers: list[int], *, batch: int = 8, progress: bool = True
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (layer, R) with R (N·T, H) the residual stream entering each of `layers`' FFN blocks (the input of
    Gemma's pre_feedforward_layernorm, which Gemma 4's router also reads), captured during the model's own forward.

    Holds every requested layer's R at once (N·T·H·len(layers) floats): the price of running the model's own
    forward, which Gemma 4's per-layer inputs and shared KV layers make hard to run one layer at a time.
    """
    yield from inputs_by_hooks(
        model, blocks, layers, "pre_feedforward_layernorm", batch=batch, progress=progress
    )


@torch.no_grad()
def mlp_inputs_by_layer(
    model, blocks: torch.Tensor, layers: list[int], *, batch: int = 8, progress: bool = True
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (layer, X) with X (N·T, H) the inputs of each of `layers`' `mlp`, captured during the model's own
    forward: for stacks that `ffn_inputs_by_layer` cannot replay one layer at a time (Qwen3.5's linear-attention
    layers take their own masks and multi-axis positions)."""
    yield from inputs_by_hooks(model, blocks, layers, "mlp", batch=batch, progress=progress)


def inputs_by_hooks(
    model, blocks: torch.Tensor, layers: list[int], module: str, *, batch: int = 8, progress: bool = True
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (layer, inputs (N·T, H) of that decoder layer's submodule `module`) for each of `layers`, all
    captured by pre-hooks during one pass of the model's own forward over `blocks`."""
    mods = decoder_layers(model)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = []
    for i in layers:

        def keep(_module, args, i=i):
            captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float())  # (b·T, H)

        hooks.append(getattr(mods[i], module).register_forward_pre_hook(keep))
    device = next(model.parameters()).device
    try:
        with Progress(len(blocks), "calibrate (blocks)", enabled=progress) as bar:
            for j in range(0, len(blocks), batch):
                model.model(input_ids=blocks[j : j + batch].to(device), use_cache=False)
                bar.advance(len(blocks[j : j + batch]))
    finally:
        for h in hooks:
            h.remove()
    for i in layers:
        R = torch.cat(captured.pop(i))
        yield i, R
        del R
