"""moegraft: graft routed experts onto a dense transformer after pre-training.

Dense Hugging Face checkpoint in, native Mixture-of-Experts checkpoint out. Importing moegraft registers
its experts forward with transformers (`experts_implementation="moegraft"`, see moegraft.experts_impl) as
soon as transformers' MoE integration is loaded, without importing torch here (`moegraft --help` stays fast).
"""

from moegraft._register import register_experts_on_import
from moegraft.config import GraftSpec
from moegraft.errors import MoegraftError

__version__ = "0.1.0"
__all__ = ["GraftSpec", "MoegraftError", "__version__"]

register_experts_on_import()
