"""The HuggingFace path needs no fairseq: every module imports without importing it, and the
HuggingFace-only install (requirements-hf.lock) runs on numpy 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fflayers.core import fairseq_installed

IMPORT_ALL = """
import importlib, pkgutil, sys
import fflayers
names = [m.name for m in pkgutil.walk_packages(fflayers.__path__, "fflayers.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m == "fairseq" or m.startswith("fairseq."))
print(len(names), len(loaded))
"""


def test_no_module_imports_fairseq():
    """Importing every fflayers module leaves fairseq unimported (it loads only for a fairseq model)."""
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules, fairseq_modules = map(int, proc.stdout.split())
    assert modules > 50 and fairseq_modules == 0


@pytest.mark.skipif(fairseq_installed(), reason="checks the HuggingFace-only install")
def test_hf_only_install_runs_on_numpy_2():
    assert int(np.__version__.split(".")[0]) >= 2
