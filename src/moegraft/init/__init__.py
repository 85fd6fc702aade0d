"""Expert initialisation: zero (random inputs, zero output) and upcycle (copies or slices of the dense FFN).

In: one layer's dense FFN weights and the spec. Out: each routed expert's (gate, up, down) weights.
"""

from moegraft.init.experts import DenseFFN, ExpertInit

__all__ = ["DenseFFN", "ExpertInit"]
