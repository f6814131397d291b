"""The README's table of supported families against the architecture table in the code: every model_type
listed once, with its block layout, MLP kind and whether q/k/v are one fused projection."""

from __future__ import annotations

import re
from pathlib import Path

from fflayers.backends.hf_arch import ARCHITECTURES

README = Path(__file__).resolve().parents[1] / "README.md"


def table_rows() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    body = re.search(r"<!-- families: begin -->\n(.*?)<!-- families: end -->", text, re.S)
    assert body, "the README has no families table between its markers"
    lines = [line for line in body.group(1).splitlines()[2:] if line.startswith("| `")]  # after the header
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_readme_families_match_the_architecture_table():
    seen: list[str] = []
    for types, block, mlp, qkv, _ in table_rows():
        for model_type in re.findall(r"`([^`]+)`", types):
            spec = ARCHITECTURES[model_type]  # a KeyError names a family the code does not have
            assert (spec.block_layout, spec.mlp) == (block, mlp), model_type
            assert (len(spec.attn_proj) == 1) == qkv.startswith("fused"), model_type
            seen.append(model_type)
    assert sorted(seen) == sorted(ARCHITECTURES), "every model_type once"
