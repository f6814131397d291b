"""Keep the C heap from growing over long chunked loops.

glibc's ``malloc`` serves buffers above its mmap threshold with fresh mappings that return to the system when
freed, but it raises that threshold each time such a buffer is freed (up to 32 MB). A loop that allocates and
frees buffers of a few to tens of MB per chunk (full-vocabulary log-probs, their sort keys, histograms) then
carves them from the heap, where freed blocks of mixed sizes fragment and are never returned: the resident
size grows with every chunk (about 10 MB per chunk of the WikiText-103 agreement, 15.8 GB over 16 layers).
:func:`steady_heap` fixes the threshold, which turns the adjustment off, so those buffers go back at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["steady_heap", "MMAP_THRESHOLD"]

#: buffers of at least this many bytes are mapped and unmapped on their own (glibc's initial default is
#: 128 KiB)
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
_done = False


def steady_heap() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (once per process); True when it is in effect.

    A no-op elsewhere than on Linux with glibc, and when the user set ``MALLOC_MMAP_THRESHOLD_`` (their
    choice wins). Safe to call from any long loop: it changes where large buffers come from, not results.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no mallopt, nothing to fix
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _done
