"""`plan --train`: the training memory per GPU of a MoE (or the graft a spec describes), from config.json alone.

In: a config.json dict, an optional GraftSpec, the trainable pathways, precision, sequence length and micro-batch,
GPU memory. Out: a TrainPlan: parameters per pathway, bytes of weights / gradients / AdamW states, activations with
and without gradient checkpointing, and the number of GPUs at which the run fits under FSDP full sharding.

Conventions (what `moegraft train` does):
- under bf16/fp16, frozen weights are held at that dtype and trainable ones as fp32 master weights (accelerate's
  FSDP2 preparation upcasts them too); under fp32 everything is fp32;
- gradients exist for trainable parameters only, in fp32 (the master weights' dtype), and AdamW keeps two fp32
  moments for each: a trainable parameter costs 4 + 4 + 8 = 16 bytes, a frozen one 2 (bf16): the frozen dense
  path costs memory but no optimizer state;
- FSDP full sharding divides weights, gradients and optimizer states by the GPU count; each GPU also holds the
  unsharded working set: the embedding (its FSDP unit stays gathered) and two decoder layers (the one computing
  and the one prefetched) at the training dtype, and one layer's trainable gradients in fp32 before the
  reduce-scatter;
- activations are an estimate of what backward keeps per token, at the training dtype: each layer's norm inputs
  (4·H), attention q/k/v and output, the dense FFN's input, gate, up and product (H + 3·I), and for each of the
  top-K experts the same at I_e; with checkpointing only each layer's input (H) stays, plus one layer recomputed
  at a time. The logits add 2 fp32 copies of V per token (the logits and their gradient) either way. Attention
  scores are not kept (fused SDPA kernels).
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from moegraft.config import GraftSpec
from moegraft.errors import SpecError
from moegraft.formats import PATHWAYS, TOWERS, format_of_moe
from moegraft.models import pathway_of
from moegraft.plan.cost import GIB, cost
from moegraft.plan.shapes import _LAYER, Arch, graft_config, meta_model, read_arch, read_model

TRAIN_BYTES = {
    "fp32": 4,
    "bf16": 2,
    "fp16": 2,
}  # bytes of a frozen (or gathered) weight at the training dtype
MASTER, GRAD, ADAM = 4, 4, 8  # fp32 master weight, fp32 gradient, two fp32 AdamW moments
LOGIT_COPIES = 2  # fp32 logits and their gradient


class TrainPlan(BaseModel):
    """Training memory of one run configuration, per GPU, and the GPU count at which it fits under FSDP."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    trainable: tuple[str, ...]
    precision: str
    seq_len: int
    batch: int  # sequences per GPU per micro-batch
    gpu_memory_gb: float
    params: dict[str, int]  # pathway -> parameters (every parameter of the model in exactly one)
    trainable_params: int
    frozen_params: int
    weight_bytes: int  # frozen at the training dtype + trainable fp32 masters
    grad_bytes: int  # trainable only, fp32
    optimizer_bytes: int  # AdamW: two fp32 moments per trainable parameter
    sharded_bytes: int  # weights + grads + optimizer states: what FSDP divides by the GPU count
    gathered_bytes: int  # unsharded working set per GPU under FSDP
    activation_bytes: int  # without gradient checkpointing
    activation_bytes_checkpointed: int
    gpus_needed: int | None  # FSDP full sharding, gradient checkpointing on; None: never fits
    gpus_needed_no_checkpointing: int | None

    def per_gpu_bytes(self, gpus: int, checkpointing: bool = True) -> int:
        act = self.activation_bytes_checkpointed if checkpointing else self.activation_bytes
        return math.ceil(self.sharded_bytes / gpus) + (self.gathered_bytes if gpus > 1 else 0) + act

    def render(self, console: Console) -> None:
        g = self.gpus_needed
        table = Table(
            title=f"moegraft plan --train — {self.architecture}, train {','.join(self.trainable)}, "
            f"{self.precision}, {self.batch} x {self.seq_len} tokens per GPU",
            title_justify="left",
        )
        table.add_column("")
        table.add_column("total", justify="right")
        table.add_column(f"per GPU @ {g} (FSDP)" if g else "per GPU", justify="right")
        n = g or 1

        def row(label: str, total: int, sharded: bool = True) -> None:
            table.add_row(label, _gib(total), _gib(math.ceil(total / n) if sharded else total))

        for p in (*PATHWAYS, TOWERS):
            if self.params.get(p):
                kind = "trainable" if p in self.trainable else "frozen"
                table.add_row(f"  {p} ({kind})", f"{self.params[p] / 1e9:.2f}B params", "")
        frozen_b = self.frozen_params * TRAIN_BYTES[self.precision]
        row(f"frozen weights ({self.precision}, no grad, no optimizer state)", frozen_b)
        row("trainable weights (fp32 masters)", self.weight_bytes - frozen_b)
        row("gradients (fp32, trainable only)", self.grad_bytes)
        row("AdamW moments (2 x fp32, trainable only)", self.optimizer_bytes)
        row("gathered working set (FSDP)", self.gathered_bytes if g and g > 1 else 0, sharded=False)
        row("activations, no checkpointing", self.activation_bytes, sharded=False)
        row("activations, gradient checkpointing", self.activation_bytes_checkpointed, sharded=False)
        table.add_row(
            "total (checkpointing)",
            _gib(self.sharded_bytes + self.activation_bytes_checkpointed),
            _gib(self.per_gpu_bytes(n)),
        )
        console.print(table)
        console.print(self.headline())
        for note in self.notes():
            console.print(f"- {note}", highlight=False)

    def notes(self) -> list[str]:
        b = TRAIN_BYTES[self.precision]
        return [
            f"frozen pathways cost memory but no optimizer state: {b} bytes a parameter ({self.precision}), no "
            "gradient, no AdamW moments; trainable ones 16 (fp32 master 4 + fp32 gradient 4 + two fp32 moments 8)",
            "FSDP full sharding divides weights, gradients and optimizer states by the GPU count; each GPU also "
            "holds the gathered embedding, two decoder layers and one layer's fp32 gradients",
            f"activations are an estimate for {self.batch} x {self.seq_len} tokens per GPU (norm inputs, q/k/v, "
            "FFN and top-K expert intermediates; checkpointing keeps each layer's input and recomputes one "
            "layer at a time) plus fp32 logits and their gradient; runtime buffers are not counted",
        ]

    def headline(self) -> str:
        fits = (
            f"fits {self.gpu_memory_gb:g} GiB GPUs from {self.gpus_needed} under FSDP full sharding with gradient "
            f"checkpointing ({_gib(self.per_gpu_bytes(self.gpus_needed))} each)"
            if self.gpus_needed
            else f"does not fit {self.gpu_memory_gb:g} GiB GPUs at any count (activations and working set alone)"
        )
        no_ckpt = (
            f"{self.gpus_needed_no_checkpointing} without checkpointing"
            if self.gpus_needed_no_checkpointing
            else "never without checkpointing"
        )
        return (
            f"Training {self.trainable_params / 1e9:.2f}B of {(self.trainable_params + self.frozen_params) / 1e9:.2f}B "
            f"parameters: {fits}; {no_ckpt}."
        )


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def pathway_params(config: dict) -> dict[str, int]:
    """Pathway -> parameter count of the MoE model with this config.json, from transformers' own class built on
    the meta device (no memory) and the format's pathway map (the same one `train` freezes by)."""
    model = meta_model(config)
    patterns = format_of_moe(config).pathways()
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        pathway = pathway_of(name, patterns) or "other"
        out[pathway] = out.get(pathway, 0) + p.numel()
    return out


def _moe_config(config: dict, spec: GraftSpec | None) -> tuple[dict, Arch]:
    """The MoE's config.json (the graft the spec describes, or the config itself) and its plan shapes."""
    if spec is None:
        arch, _ = read_model(config)
        if not arch.is_moe:
            raise SpecError("plan --train needs a MoE: pass a MoE config.json, or a graft (--experts ...)")
        return config, arch
    fmt_cls, _, moe_config = graft_config(config, spec)
    return moe_config, read_arch(moe_config, fmt_cls)


def _activations_per_token(arch: Arch) -> tuple[int, int]:
    """(elements every layer keeps summed over layers, elements of the largest layer) per token."""
    H, I = arch.hidden_size, arch.intermediate_size  # noqa: E741 (HF name)
    per_layer = []
    for lay in arch.layers:
        attn = (
            H + 2 * lay.q_heads * lay.head_dim + 2 * lay.kv_heads * lay.head_dim
        )  # normed input, q, out; k, v
        ffn = H + 3 * I
        experts = lay.top_k * (H + 3 * (arch.expert_size or 0)) if lay.num_experts else 0
        per_layer.append(4 * H + attn + ffn + experts)
    return sum(per_layer), max(per_layer)


def _gpus(sharded: int, fixed: int, budget: float) -> int | None:
    """Smallest N with sharded / N + fixed <= budget (N = 1 pays no gathered set: `fixed` excludes it then)."""
    if budget - fixed <= 0:
        return None
    return max(1, math.ceil(sharded / (budget - fixed)))


def plan_train(
    config: dict,
    spec: GraftSpec | None = None,
    *,
    trainable: tuple[str, ...] = ("router", "experts"),
    precision: str = "bf16",
    seq_len: int = 4096,
    batch: int = 1,
    gpu_memory_gb: float = 80.0,
) -> TrainPlan:
    """Training memory per GPU of the MoE in `config` (or of the graft `spec` makes of it).

    Raises:
        SpecError: unknown pathway or precision, bad sizes, a dense model without a spec.
    """
    bad = [t for t in trainable if t not in PATHWAYS]
    if bad or not trainable:
        raise SpecError(f"--trainable {','.join(bad) or '(empty)'}: choose from {','.join(PATHWAYS)}")
    if precision not in TRAIN_BYTES:
        raise SpecError(f"--precision {precision}: choose fp32, bf16 or fp16")
    if seq_len < 1 or batch < 1 or gpu_memory_gb <= 0:
        raise SpecError("--seq-len and --batch must be >= 1 and --gpu-memory > 0")
    moe_config, arch = _moe_config(config, spec)
    params = pathway_params(moe_config)
    n_train = sum(params.get(p, 0) for p in trainable)
    n_frozen = sum(params.values()) - n_train
    b = TRAIN_BYTES[precision]
    weights = n_frozen * b + n_train * MASTER
    grads, adam = n_train * GRAD, n_train * ADAM
    sharded = weights + grads + adam
    # the largest decoder layer, and its trainable part, from the shapes plan already has
    H, V = arch.hidden_size, arch.vocab_size
    layer_params = max(lay.matmul + lay.other + lay.num_experts * lay.expert for lay in arch.layers)
    layer_train = math.ceil(n_train / len(arch.layers))  # trainable pathways live in the layers
    gathered = (V * H + 2 * layer_params) * b + layer_train * GRAD
    tokens = seq_len * batch
    all_layers, largest = _activations_per_token(arch)
    logits = tokens * V * 4 * LOGIT_COPIES
    act = tokens * all_layers * b + logits
    act_ckpt = tokens * (len(arch.layers) * H + largest) * b + logits
    budget = gpu_memory_gb * GIB

    def needed(activations: int) -> int | None:
        if sharded + activations <= budget:
            return 1
        n = _gpus(sharded, gathered + activations, budget)
        return None if n is None else max(2, n)

    return TrainPlan(
        architecture=arch.architecture,
        trainable=tuple(trainable),
        precision=precision,
        seq_len=seq_len,
        batch=batch,
        gpu_memory_gb=gpu_memory_gb,
        params=params,
        trainable_params=n_train,
        frozen_params=n_frozen,
        weight_bytes=weights,
        grad_bytes=grads,
        optimizer_bytes=adam,
        sharded_bytes=sharded,
        gathered_bytes=gathered,
        activation_bytes=act,
        activation_bytes_checkpointed=act_ckpt,
        gpus_needed=needed(act_ckpt),
        gpus_needed_no_checkpointing=needed(act),
    )


# -- FLOPs of a training step ------------------------------------------------------------------------------------


class TrainFlops(BaseModel):
    """Model FLOPs per trained token of one training step (forward + backward), what MFU divides by.

    Conventions (PaLM's "model FLOPs"): a matmul of weight (m, n) on one token is 2·m·n FLOPs forward; backward,
    the gradient of its input (activation gradient) is another 2·m·n wherever anything trainable lies below it,
    and the gradient of its weight 2·m·n more if the weight trains. The frozen dense path above the first
    trainable layer so costs 2x its forward, a trainable matmul 3x, the layers below the first trainable one only
    their forward. Attention scores (QK^T, AV) are 4·heads·head_dim FLOPs per key forward, twice that backward,
    at the causal mean of keys per token ((T+1)/2 for full attention, fewer under a sliding window). Recomputed
    forwards (gradient checkpointing) and elementwise work are not counted; a distillation teacher's forward is
    (`teacher_forward`), since the step needs it.
    """

    model_config = ConfigDict(frozen=True)

    seq_len: int
    attention_keys: float  # mean keys per token over the model's full-attention layers at seq_len
    forward_matmul: int  # per token
    forward_attention: float
    backward_activation: float  # input gradients of the matmuls above the first trainable weight
    backward_attention: float  # gradients through the attention scores above it
    backward_weight: int  # weight gradients of the trainable matmuls (routed experts: the K each token runs)
    teacher_forward: float = 0.0

    @property
    def forward(self) -> float:
        return self.forward_matmul + self.forward_attention

    @property
    def per_token(self) -> float:
        backward = self.backward_activation + self.backward_attention + self.backward_weight
        return self.forward + backward + self.teacher_forward


def causal_keys(seq_len: int, window: int | None) -> float:
    """Mean keys a token attends to in a causal block of `seq_len` tokens: min(t, window) for t = 1..T."""
    T = seq_len
    W = T if window is None else min(window, T)
    return (W * (W + 1) / 2 + (T - W) * W) / T


def _first_layer_input_grads(
    i: int, names: list[str], shapes: dict[str, tuple[int, ...]], lay
) -> tuple[float, bool]:
    """(matmul parameters per token that take an input gradient, whether the attention scores do) in the first
    trainable layer, whose input needs no gradient: only the matmuls between a trainable parameter and the layer's
    output do. A trainable norm or scale counts as well: the gradient has to pass the matmuls after it to reach it
    (Gemma 4's experts pathway holds the norm before the experts, its router pathway the router's input scale).

    Args:
        names: the layer's trainable parameters (norms and scales too), named from `layers.i.` on.
        shapes: every parameter of the model, named from `layers.` on.
    """
    layer = {k: v for k, v in shapes.items() if k.startswith(f"layers.{i}.") and len(v) >= 2}  # its matmuls

    def has(rx: str) -> bool:
        return any(re.search(rx, n) for n in names)

    def under(*prefixes: str) -> set[str]:
        return {k for k in layer if any(f".{p}" in k for p in prefixes)}

    scores = False
    if has(r"\.input_layernorm\."):  # the layer's input norm: every matmul of the layer
        need, scores = set(layer), True
    elif has(r"\.self_attn\.(?!o_proj)"):  # q/k/v (or their norms): everything after them
        need, scores = set(layer) - under("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True
        need -= under("self_attn.q_norm", "self_attn.k_norm")
    elif has(r"\.post_attention_layernorm\."):  # the Llama family's FFN block input: the whole block
        need = set(layer) - under("self_attn.")
    else:
        need = set()
        if has(r"\.pre_feedforward_layernorm\."):  # Gemma's dense MLP input
            need |= under("mlp.")
        if has(r"\.pre_feedforward_layernorm_2\."):  # Gemma 4's experts input
            need |= under("experts.")
        if has(r"\.router\.scale$"):  # Gemma 4's router input scale
            need |= under("router.proj")
        # a trainable gate/up projection: its output's gradient comes through its MLP's down projection
        for n in names:
            m = re.search(r"^(.*\.)(gate_up_proj|gate_proj|up_proj)(\.|$)", n)
            if m is not None:
                need |= {k for k in (m.group(1) + "down_proj.weight", m.group(1) + "down_proj") if k in layer}
    total = 0.0
    for k in need:
        shape = layer[k]
        total += lay.top_k * math.prod(shape[1:]) if len(shape) == 3 else math.prod(shape)  # experts: K of E
    return total, scores


def _from_layers(name: str) -> str | None:
    """`name` from its `layers.N.` on (what a PEFT wrapper or a multimodal model puts before it dropped)."""
    m = _LAYER.search(name)
    return None if m is None else name[m.start() + (name[m.start()] == ".") :]


def train_flops_per_token(
    config: dict,
    trainable: dict[str, tuple[int, ...]],
    seq_len: int,
    *,
    teacher_config: dict | None = None,
) -> TrainFlops:
    """Training FLOPs per token of the model `config` (a config.json dict) whose trainable parameters are
    `trainable` (name -> shape, as named_parameters gives them; LoRA factors too), at `seq_len` tokens per block.

    Which layer each trainable parameter is in comes from its name (`layers.N.`); a 3-D one is a routed experts
    tensor (E, ., .): each token runs K of its E experts. Layers above the first trainable one take every input
    gradient; inside the first, only the matmuls above a trainable weight do (e.g. the experts' down projections
    when their gate/up train, o_proj and the scores when q/k/v do).

    Raises:
        SpecError: seq_len < 1; UnsupportedModelError / SourceError: a config plan cannot read.
    """
    if seq_len < 1:
        raise SpecError(f"seq_len {seq_len}: must be >= 1")
    arch, _ = read_model(config)
    H, V = arch.hidden_size, arch.vocab_size
    shapes = {k: tuple(p.shape) for n, p in meta_model(config).named_parameters() if (k := _from_layers(n))}
    per_layer_weight = [0.0] * len(arch.layers)  # trainable active matmul parameters per token
    by_layer: dict[int, list[str]] = {}
    first, head_trains = len(arch.layers), False  # the first layer with a trainable parameter
    for name, shape in trainable.items():
        key = _from_layers(name)
        if key is None:
            if "embed_tokens" in name or "lm_head" in name:
                head_trains, first = True, -1  # the lookup's gradient needs every layer's input gradient
            continue
        i = int(_LAYER.search(name).group(1))
        if i >= len(arch.layers):  # a tower's layer
            continue
        first = min(first, i)
        by_layer.setdefault(i, []).append(key)
        if len(shape) < 2:  # a norm, scale or bias: its own gradient is elementwise work
            continue
        lay = arch.layers[i]
        if len(shape) == 3 and lay.num_experts:  # (E, out, in): each token runs top_k of the E experts
            per_layer_weight[i] += math.prod(shape) * lay.top_k / shape[0]
        else:
            per_layer_weight[i] += math.prod(shape)
    fwd_attn, bwd_act, bwd_attn = 0.0, 0.0, 0.0
    full_keys = [causal_keys(seq_len, lay.window) for lay in arch.layers]
    for i, lay in enumerate(arch.layers):
        attn = 4 * lay.q_heads * lay.head_dim * full_keys[i]
        fwd_attn += attn
        if i > first:
            bwd_act += 2 * (lay.matmul + lay.top_k * lay.expert)
            bwd_attn += 2 * attn
        elif i == first:
            grads, scores = _first_layer_input_grads(i, by_layer[i], shapes, lay)
            bwd_act += 2 * grads
            bwd_attn += 2 * attn if scores else 0.0
    if first < len(arch.layers):  # the logits' gradient reaches the last hidden state through the lm_head
        bwd_act += 2 * V * H
    weight = 2 * sum(per_layer_weight) + (2 * V * H if head_trains else 0)
    teacher = 0.0 if teacher_config is None else train_flops_per_token(teacher_config, {}, seq_len).forward
    keys = [k for k, lay in zip(full_keys, arch.layers, strict=True) if lay.window is None and lay.q_heads]
    return TrainFlops(
        seq_len=seq_len,
        attention_keys=keys[0] if keys else causal_keys(seq_len, None),
        forward_matmul=cost(arch, seq_len, 1, None).matmul_flops_per_token,
        forward_attention=fwd_attn,
        backward_activation=bwd_act,
        backward_attention=bwd_attn,
        backward_weight=round(weight),
        teacher_forward=teacher,
    )
