"""moegraft: graft routed experts onto a dense transformer after pre-training.

Dense Hugging Face checkpoint in, native Mixture-of-Experts checkpoint out.
"""

from moegraft.config import GraftSpec
from moegraft.errors import MoegraftError

__version__ = "0.1.0"
__all__ = ["GraftSpec", "MoegraftError", "__version__"]
