"""How a MoE layer starts, so that the converted model computes the dense function (or, carved, comes close).

- `experts`: a graft's routed experts (neurons copied from the dense FFN, zero, upcycle) beside the whole dense FFN;
- `carve`: the dense FFN itself split into a shared part and routed experts, the down projections refitted;
- `router`: routers fitted to calibration text (balanced k-means, entropy-targeted temperature);
- `calibrated`: a graft calibrated on text (its router, and the dense neurons each expert copies).

In: one layer's dense FFN weights, the spec, calibration. Out: what a format asks each layer for: the router, each
routed expert's (gate, up, down), the always-on part.
"""

from moegraft.init.experts import DenseFFN, ExpertInit

__all__ = ["DenseFFN", "ExpertInit"]
