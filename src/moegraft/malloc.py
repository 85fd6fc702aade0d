"""glibc's malloc told to give freed large buffers back to the OS, for a process that streams a model layer by layer.

glibc serves an allocation above its mmap threshold with a mapping of its own, unmapped on free. The threshold
starts at 128 KiB but rises to the size of every such buffer freed (up to 32 MiB), and from then on buffers of a
layer's size come from the heap, whose freed holes fragment and stay resident. Streaming a carve layer by layer,
the peak RSS then grows with the model's depth though no layer's memory is kept (SmolLM2-135M and a copy twice as
deep: benchmarks/bench_carve_recovery.py --rss). A fixed threshold, what `MALLOC_MMAP_THRESHOLD_` sets, keeps it
flat. No library exposes mallopt; ctypes does.

Only the `convert` command sets it, for its own process: training allocates the same buffers every step, which
the heap serves better than fresh mappings.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 128 * 1024  # glibc's own starting value, held fixed


def fix_mmap_threshold(nbytes: int = THRESHOLD) -> bool:
    """Hold glibc's mmap threshold at `nbytes` for this process; False where there is no glibc (macOS, musl) or
    the user set MALLOC_MMAP_THRESHOLD_ (theirs wins)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, nbytes) == 1
