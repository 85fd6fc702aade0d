"""How routed experts start, so that the grafted model computes the dense function until trained.

In: a layer's dense FFN (gate/up (I, H), down (H, I)), the spec, and the format's zero-router weight.
Out: per expert e, gate_e/up_e (I_e, H), down_e (H, I_e), and the scale left on the dense path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from moegraft.config import GraftSpec

# Share of the dense FFN's output that upcycled copies take over at init; the dense path keeps the rest.
UPCYCLE_SHARE = 0.5


@dataclass(frozen=True)
class LayerCalibration:
    """What calibration decided for one MoE layer (init.calibrated fits it; ExpertInit reads it)."""

    layer: int
    router: torch.Tensor  # (E, H) router weight, in the format's router space
    neurons: torch.Tensor | None  # (E, I_e) dense neuron indices each expert copies (init neurons)
    stats: dict = field(default_factory=dict)  # held-out routing statistics (moegraft.json)


@dataclass
class DenseFFN:
    """One layer's dense SwiGLU/GeGLU FFN, loaded on demand (fp32)."""

    layer: int
    intermediate_size: int  # I
    hidden_size: int  # H
    gate: Callable[[], torch.Tensor]  # () -> (I, H)
    up: Callable[[], torch.Tensor]  # () -> (I, H)
    down: Callable[[], torch.Tensor]  # () -> (H, I)
    read: Callable[[str], torch.Tensor] | None = None  # any other source tensor, by name (fp32)


def _generator(spec: GraftSpec, layer: int, *salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((spec.seed * 1_000_003 + layer * 10_007 + hash(salt)) % 2**63)
    return g


def random_router_weight(spec: GraftSpec, layer: int, num_experts: int, hidden_size: int) -> torch.Tensor:
    """The random router (E, H) of `--router-init random`: N(0, router_std²), deterministic in (seed, layer)."""
    return torch.randn(num_experts, hidden_size, generator=_generator(spec, layer, -1)) * spec.router_std


class ExpertInit:
    """Expert weights for one layer, deterministic in (seed, layer, expert).

    Args:
        ffn: the layer's dense FFN.
        spec: the graft spec (init, E, K, I_e, seed, noise, router_std).
        zero_router_weight: w0, the routing weight every chosen expert gets when the router is all
            zero (1/E for softmax top-k, 1/K when renormalised, 0.5 for sigmoid scores).
        renormalised: the format rescales chosen weights to sum to 1 (any router keeps Σw = 1).
        init_std: std of random expert inputs for `zero` init (the model's initializer_range).
        zero_down: the zero output path is the experts' down_proj (False where the format zeroes a
            norm weight after the experts instead, as Gemma 4 does: a zero down_proj there would
            leave both factors zero and give neither a gradient).
        calib: the layer's calibration (a data-set router; the neurons each expert copies for init neurons).
    """

    def __init__(
        self,
        ffn: DenseFFN,
        spec: GraftSpec,
        zero_router_weight: float,
        renormalised: bool,
        init_std: float,
        zero_down: bool = True,
        calib: LayerCalibration | None = None,
    ):
        self.ffn, self.spec, self.init_std, self.zero_down = ffn, spec, init_std, zero_down
        self.calib = calib
        self.copies = spec.init == "upcycle" and spec.expert_size == ffn.intermediate_size
        # Upcycled copies sum to K·w0·(down scale)·FFN(x): exact only while Σ of chosen weights is
        # fixed, i.e. a zero router (every weight w0) or a renormalising format.
        self.router_is_zero = self.copies and not renormalised
        w_sum = 1.0 if renormalised else spec.top_k * zero_router_weight
        self.down_scale = UPCYCLE_SHARE / w_sum if self.copies else 0.0

    @property
    def shared_size(self) -> int:
        """Neurons of the always-on (shared) path: the whole dense FFN."""
        return self.ffn.intermediate_size

    def shared_part(self, part: int) -> torch.Tensor:
        """Part 0/1/2 (gate (I, H), up (I, H), down (H, I)) of the always-on path, unscaled: the dense FFN."""
        return (self.ffn.gate, self.ffn.up, self.ffn.down)[part]()

    @property
    def dense_scale(self) -> float:
        """Factor on the always-on dense path so that dense + experts = the dense FFN."""
        return 1.0 - UPCYCLE_SHARE if self.copies else 1.0

    def _gen(self, *salt: int) -> torch.Generator:
        return _generator(self.spec, self.ffn.layer, *salt)

    def router(self, num_experts: int) -> torch.Tensor:
        """Router weight (E, H): calibrated, zero (upcycled copies), or random."""
        if self.calib is not None:
            return self.calib.router.clone()
        if self.router_is_zero:
            return torch.zeros(num_experts, self.ffn.hidden_size)
        return random_router_weight(self.spec, self.ffn.layer, num_experts, self.ffn.hidden_size)

    def _neurons(self, e: int) -> torch.Tensor:
        """Dense neuron indices that expert e copies: consecutive slices, wrapping around I."""
        I, I_e = self.ffn.intermediate_size, self.spec.expert_size
        return (torch.arange(I_e) + e * I_e) % I

    @lru_cache(maxsize=1)  # noqa: B019 (one instance per layer; the cache holds one expert)
    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate (I_e, H), up (I_e, H), down (H, I_e)) of expert e, fp32."""
        H, I_e = self.ffn.hidden_size, self.spec.expert_size
        if self.spec.init == "zero":
            g = self._gen(e)
            gate = torch.randn(I_e, H, generator=g) * self.init_std
            up = torch.randn(I_e, H, generator=g) * self.init_std
            down = torch.zeros(H, I_e) if self.zero_down else torch.randn(H, I_e, generator=g) * self.init_std
            return gate, up, down
        if self.spec.init == "neurons":
            if self.calib is None or self.calib.neurons is None:
                raise ValueError("init neurons needs the layer's calibration (calibrate_graft)")
            idx = self.calib.neurons[e]
        else:
            idx = self._neurons(e)
        gate, up = self.ffn.gate()[idx].clone(), self.ffn.up()[idx].clone()
        if self.spec.noise > 0:
            # relative noise, so experts drift apart and the router has something to choose between
            g = self._gen(e, 1)
            gate += torch.randn(gate.shape, generator=g) * self.spec.noise * gate.std()
            up += torch.randn(up.shape, generator=g) * self.spec.noise * up.std()
        if not self.copies:
            # a slice is not the dense function: keep the output path at zero so the graft is exact
            return gate, up, torch.zeros(H, I_e) if self.zero_down else self.ffn.down()[:, idx].clone()
        return gate, up, self.ffn.down()[:, idx] * self.down_scale


def default_init_std(config: dict) -> float:
    """Std for random expert inputs: the model's own initializer_range, else 1/sqrt(H)."""
    std = config.get("initializer_range")
    return float(std) if std else 1.0 / math.sqrt(config["hidden_size"])
