"""steady_heap: the heap returns large freed buffers at once (resident size flat over a chunked loop)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

LOOP = textwrap.dedent("""
    import sys
    import torch
    from fflayers.allocator import steady_heap

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    if sys.argv[1] == "steady":
        assert steady_heap()
    keep = []
    torch.set_num_threads(1)
    start = rss_mb()
    for i in range(120):  # buffers of 2-20 MB with a small survivor between them, as a chunked \
projection makes
        a = torch.ones(int(5e5 + (i % 9) * 5e5))
        b = torch.ones(int(2.5e6 + (i % 7) * 2e5))
        keep.append(torch.ones(64))
        del a, b
    print(rss_mb() - start)
""")


def growth_mb(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, env=env,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steady_heap_keeps_resident_size_flat():
    steady = growth_mb("steady")
    assert steady < 40, f"resident size grew by {steady:.0f} MB with steady_heap"


def test_user_setting_wins(monkeypatch):
    import fflayers.allocator as allocator

    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert allocator.steady_heap() is False
