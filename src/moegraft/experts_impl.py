"""moegraft's experts forward for transformers' native MoE layers, registered as `experts_implementation="moegraft"`.

In: an experts module (fused `gate_up_proj (E, 2I, H)`, `down_proj (E, H, I)`), hidden states (T, H), the
router's choice (T, K) and weights (T, K). Out: Σ_k w_k · down_e(act(gate_e(x)) · up_e(x)) per token, (T, H).

Three paths, picked by shape (the checkpoint stays plain native; only this forward is ours):
- few picks (decode): each selected (token, expert) pair is two matmuls on views of the expert's weights,
  nothing else. Gathering the selected weights for one `bmm` (transformers' `batched_mm`) copies them first,
  which on a memory-bound decode step costs more than the matmuls; the sort of the grouped path and the
  kernel's own overhead cost more than a handful of picks.
- many picks with gradients (training), or a mid-sized batch: one sort of the (token, k) pairs by expert, one
  gather of the rows, one grouped matmul per projection over contiguous slices, one gather back and one `bmm`
  that weights and sums the K outputs of each token (fewer ops than transformers' `grouped_mm`).
- many picks without gradients (prefill, eval): the same sort, then expert by expert, so that each expert's
  rows stay in cache from their gather to their scatter-add.
All work with autograd (routing weights, inputs, expert weights), in fp32 and bf16, and under autocast in its
dtype (fp32 master weights included: `_InDtype` says why that needs moegraft's help). Off CPU, for expert
parallelism, under `torch.compile`, and for expert layouts other than the three native formats' (biases,
transposed weights, post-expert norms) the forward defers to transformers' `grouped_mm`, which is written
for GPUs (no host synchronisation; the picks path reads the chosen experts back to Python). `torch.compile`
of either path did not help on CPU (torch 2.13, one layer at SmolLM2 graft shapes): the picks path ran 1.5x slower
(guards cost more than its few ops), inductor refuses fp32 grouped matmuls, and a per-expert loop compiled
with recompiles ran 3x slower forward and 10% slower forward + backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward
from transformers.utils.import_utils import is_torch_greater_or_equal, is_torchdynamo_compiling

NAME = "moegraft"


def max_decode_picks(num_experts: int, top_k: int) -> int:
    """Largest T·K that takes the picks path: a batch-1 decode step always; up to two tokens while their picks
    mostly hit distinct experts (T·K ≤ E/2), else the grouped path reads each expert once. Measured on one core
    (8 experts of 128, top-2, H 576, per layer): 1 token 0.21 ms vs 0.52 grouped; 2 tokens even; 4 tokens
    1.21 ms vs 0.81."""
    return max(top_k, min(num_experts // 2, 2 * top_k))


# per_expert_forward from this many (token, k) pairs per expert on average: measured on one core (SmolLM2 graft,
# 8 × 128, per layer, no grad) it ties the grouped path at 64-128 and is 15-30% faster at 256-512
MIN_ROWS_PER_EXPERT = 128

# dtypes torch's grouped matmul kernel takes; on CPU before torch 2.11 it also needs 16-byte aligned operands
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_ALIGNED_ONLY = not is_torch_greater_or_equal("2.11", accept_dev=True)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(S, in) rows grouped by `offs` (cumulative counts, int32) times w (E, in, out): (S, out).

    torch's kernel where it can run, else one mm per non-empty group on views of `w` (float64, old torch).
    """
    if w.dtype != x.dtype:  # autocast leaves grouped_mm out: fp32 master weights meet bf16 activations
        w = w.to(x.dtype)
    aligned = not _ALIGNED_ONLY or (x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)
    if _KERNEL is not None and x.dtype in _KERNEL_DTYPES and aligned:
        return _KERNEL(x, w, offs=offs)
    ends = offs.tolist()
    ws = w.unbind(0)  # views; unbind's backward stacks the per-expert gradients into one (E, in, out)
    outs = [x[a:b] @ ws[e] for e, (a, b) in enumerate(zip([0, *ends], ends, strict=False)) if b > a]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


def _plain_layout(experts: nn.Module) -> bool:
    """The layout of Qwen2-MoE, GLM-4.5 MoE and Gemma 4 experts: fused gate_up, no biases, not transposed."""
    return (
        getattr(experts, "has_gate", False)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "is_transposed", True)
        and not getattr(experts, "has_post_expert_norm", True)
        and not getattr(experts, "_is_expert_parallel", True)
    )


def picks_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The decode path: two matmuls per (token, k) pick on views of the chosen expert's weights, no copies.

    Every op here is paid per layer and per step, so there are few: the routing weight scales the
    activation (I values rather than H) as a Python float when no gradient needs it, and each further pick
    of a token adds its `down` output as the `bias` of its linear (one addmm instead of mm + add).
    """
    T = top_k_index.shape[0]
    needs_grad = torch.is_grad_enabled() and top_k_weights.requires_grad
    w = top_k_weights.to(hidden_states.dtype) if needs_grad else top_k_weights.tolist()  # (T, K)
    # read once: under PEFT's parameter wrappers every attribute access rebuilds the whole (E, ., .) tensor
    gate_up_proj, down_proj = experts.gate_up_proj, experts.down_proj
    rows = []
    for t, chosen in enumerate(top_k_index.tolist()):
        x = hidden_states if T == 1 else hidden_states[t : t + 1]  # (1, H)
        acc = None
        for k, e in enumerate(chosen):
            h = experts._apply_gate(F.linear(x, gate_up_proj[e])) * w[t][k]  # (1, I)
            acc = F.linear(h, down_proj[e], acc)  # (1, H), + acc
        rows.append(acc)
    return rows[0] if T == 1 else torch.cat(rows)  # (T, H)


def _sort_pairs(
    top_k_index: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, token, counts): the (token, k) pairs sorted by expert (stable, so tokens stay in order within an
    expert), the token of each sorted pair, and pairs per expert (E,)."""
    K = top_k_index.shape[1]
    expert_sorted, perm = torch.sort(top_k_index.reshape(-1), stable=True)  # (S,), pair s = (s // K, s % K)
    return perm, perm // K, torch.bincount(expert_sorted, minlength=num_experts)


def grouped_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The training path (and mid-sized batches): one gather, one grouped matmul per projection.

    Experts no token picks get an empty slice (no work, zero gradient); each projection's backward is one op.
    The pairs go back to token order with one gather, and one `bmm` with the routing weights both weights and
    sums the K outputs of every token: no scatter-add (`index_add_` is parallelised even for a few rows, and
    two contended cores make that milliseconds).
    """
    T, K = top_k_index.shape
    perm, token, counts = _sort_pairs(top_k_index, experts.num_experts)
    offs = counts.cumsum(0, dtype=torch.int32)  # (E,)
    # index_select rather than x[idx]: a row gather, several times faster on CPU (and so is its backward)
    x = hidden_states.index_select(0, token)  # (S, H), grouped by expert
    h = experts._apply_gate(_grouped_mm(x, experts.gate_up_proj.transpose(-2, -1), offs))  # (S, I)
    y = _grouped_mm(h, experts.down_proj.transpose(-2, -1), offs)  # (S, H), grouped by expert
    y = y.index_select(0, perm.argsort()).view(T, K, -1)  # (T, K, H), pair order
    w = top_k_weights.to(hidden_states.dtype).unsqueeze(1)  # (T, 1, K)
    return torch.bmm(w, y).squeeze(1)  # (T, H)


def per_expert_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The prefill path (no gradient, many tokens): expert by expert, gather its rows, two matmuls, add back.

    Each expert's rows stay in cache from the gather to the add; the grouped path streams all T·K rows
    through memory at every step, and at 512 rows per expert that costs 15-30% more. Its backward would
    allocate a (T, H) gradient per expert, so training takes the grouped path.
    """
    perm, token, counts = _sort_pairs(top_k_index, experts.num_experts)
    w = top_k_weights.reshape(-1).index_select(0, perm).to(hidden_states.dtype).unsqueeze(-1)  # (S, 1) sorted
    gate_up_proj, down_proj = experts.gate_up_proj.unbind(0), experts.down_proj.unbind(0)  # views
    out = hidden_states.new_zeros(hidden_states.shape)  # (T, H)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            rows = token[start : start + n]  # (n,) tokens of expert e, ascending
            x = hidden_states.index_select(0, rows)  # (n, H)
            h = experts._apply_gate(F.linear(x, gate_up_proj[e])) * w[start : start + n]  # (n, I)
            out.index_add_(0, rows, F.linear(h, down_proj[e]))
            start += n
    return out


class _InDtype:
    """An experts module as transformers' `grouped_mm_experts_forward` reads it, its expert weights cast to `dtype`.

    Under autocast, training holds the trainable experts as fp32 master weights (train.precision). torch's grouped
    matmul is not an autocast op (pytorch/pytorch#174763), and transformers' `_grouped_mm` casts the *input* to the
    *weight's* dtype, so with fp32 masters every expert matmul ran in fp32, forward and backward, at a fraction of
    the bf16 tensor-core rate (read in transformers 5.25 `integrations/moe.py` and torch 2.13; no GPU here to time
    it). Casting the weights to the autocast dtype, as autocast does for `F.linear`, makes the grouped matmuls bf16;
    `.to` is differentiable, so the fp32 master weights still get their (fp32) gradients.
    """

    _WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")

    def __init__(self, experts: nn.Module, dtype: torch.dtype):
        self._experts = experts
        for name in self._WEIGHTS:
            w = getattr(experts, name, None)  # read once: PEFT's wrappers rebuild the tensor on every access
            if isinstance(w, torch.Tensor):
                setattr(self, name, w.to(dtype))

    def __getattr__(self, name: str):
        return getattr(
            self._experts, name
        )  # everything else (_apply_gate, biases, flags) as the module has it


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `t`'s device, or None when autocast is off there."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _needs_grad(experts: nn.Module, *tensors: torch.Tensor) -> bool:
    params = (experts.gate_up_proj, experts.down_proj)
    return torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *params))


def moegraft_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The registered forward: picks for a few picks, per expert for a big no-grad batch, else grouped.

    Under autocast every path computes in the autocast dtype (_InDtype says why transformers' path did not).
    """
    cast = _autocast_dtype(hidden_states)
    if cast is not None and hidden_states.is_floating_point():
        hidden_states = hidden_states.to(cast)  # the paths below cast the weights to the input's dtype
    if hidden_states.device.type != "cpu" or is_torchdynamo_compiling() or not _plain_layout(self):
        experts = self if cast is None else _InDtype(self, cast)
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    pairs, K = top_k_index.numel(), top_k_index.shape[1]  # T·K, K
    if pairs <= max_decode_picks(self.num_experts, K):
        return picks_forward(self, hidden_states, top_k_index, top_k_weights)
    if pairs >= MIN_ROWS_PER_EXPERT * self.num_experts and not _needs_grad(
        self, hidden_states, top_k_weights
    ):
        return per_expert_forward(self, hidden_states, top_k_index, top_k_weights)
    return grouped_forward(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(NAME, moegraft_experts_forward)
