"""Demo step 10: lenses compared on SmolLM2, through ``fflayers lenses``: a tuned lens and the hybrid
(starting at step 7's shortcut maps) trained on a small token budget, then the logit lens, mat, tuned, hybrid
and the token-identity Patchscope on the same held-out tokens, every fifth layer."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

LAYERS = ["0", "5", "10", "15", "20", "25"]


def _fflayers(*args: str) -> None:
    print("$ " + " ".join(["fflayers", *args]), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "fflayers", *args], check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def run_lenses(out: Path, train: Path, valid: Path, smollm2_dir: Path, maps: Path) -> None:
    model = ["--hf_model", str(smollm2_dir)]
    budget = ["--steps", "10", "--tokens_per_step", "256", "--batch_tokens", "512", "--max_sentences", "300",
              "--layers", *LAYERS, "--quiet"]
    for kind in ("tuned", "hybrid"):
        folder = out / kind
        if not (folder / "params.pt").is_file():
            extra = ["--shortcuts", str(maps)] if kind == "hybrid" else []
            _fflayers("lenses", "train", *model, "--data_file", str(train), "--kind", kind, *extra, *budget,
                      "--output_dir", str(folder))
    table_path = out / "lenses.csv"
    if not table_path.is_file():
        _fflayers("lenses", "compare", *model, "--data_file", str(valid), "--tuned", str(out / "tuned"),
                  "--hybrid", str(out / "hybrid"), "--shortcuts", str(maps), "--max_sentences", "40",
                  "--positions", "random", "--layers", *LAYERS, "30", "--output", str(table_path),
                  "--figure", str(out / "lenses"), "--quiet")
    table = pd.read_csv(table_path)
    order = [x for x in ("logit", "mat", "tuned", "hybrid", "patchscope") if x in set(table["lens"])]
    for metric, what in (("kl_bits", "KL(final || lens), bits"), ("top1_agreement", "top-1 agreement")):
        grid = table.pivot(index="layer", columns="lens", values=metric)[order]
        print(f"\nSmolLM2-135M, {what}, one random position of each of 40 validation sentences")
        print("  layer " + " ".join(f"{name:>10s}" for name in order))
        for layer, row in grid.iterrows():
            print(f"  {layer:5d} " + " ".join(f"{x:10.2f}" for x in row))
    print(f"figure and table in {out}/ (lenses.png, lenses.csv)")
