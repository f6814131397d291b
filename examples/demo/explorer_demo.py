"""Demo: the explorer page (``fflayers explore``) as a screenshot. SmolLM2 is served in a thread with the
demo's trigger examples, agreement, values export, shortcut maps and knowledge neurons; a permalink of the
France/Paris prompt with one intervention (the value of the largest contribution to " Paris" at the last
position switched off) is opened in headless chromium and the page is saved as a full-page PNG.

    python examples/demo/explorer_demo.py --hf_model runs/demo/smollm2 --demo runs/demo

Needs playwright (the dev extra) and a chromium (Debian: ``apt-get install chromium``); without them the
screenshot step says so in one line and the demo goes on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from urllib.parse import quote

PROMPT = "The capital of France is the city of"
TARGET = " Paris"


def permalink(base_url: str, state: dict) -> str:
    """The page's URL for ``state`` (prompt, position, lens, target, k, interventions, value)."""
    return f"{base_url.rstrip('/')}/#state=" + quote(json.dumps(state), safe="")


def demo_inputs(demo: Path) -> dict[str, Path]:
    """The outputs of the demo's earlier steps the explorer reads (those that exist)."""
    paths = {"memories": demo / "memories_smollm2" / "trigger_examples",
             "agreement": demo / "memories_smollm2" / "agreement.tsv",
             "values": demo / "embedding_space" / "smollm2_values.parquet",
             "shortcuts": demo / "shortcuts" / "smollm2" / "maps.safetensors",
             "neurons": demo / "neurons" / "results.json"}
    return {name: path for name, path in paths.items() if path.exists()}


def strongest_value(explorer, prompt: str, target: str) -> tuple[int, int, float]:
    """(layer, dim, contribution) of the value of the largest ``m_i v_i . e_target`` at the last position."""
    best = (0, 0, float("-inf"))
    for layer in range(explorer.adapter.n_layers):
        top = explorer.subupdates(prompt, layer=layer, target=target, n=1)["by_target"][0]
        if top["contribution"] > best[2]:
            best = (layer, top["dim"], top["contribution"])
    return best


def run_explorer(out: Path, adapter, demo: Path, name: str = "SmolLM2-135M", prompt: str = PROMPT,
                 target: str = TARGET) -> Path | None:
    """Serves ``adapter`` with the demo's outputs and saves ``out/explorer.png`` of a permalink with one value
    switched off; None (and one line saying why) when no browser can be driven."""
    from fflayers.cli.explore import build_explorer
    from fflayers.explore import serve_in_thread
    from fflayers.explore.browser import browser_missing, screenshot

    out.mkdir(parents=True, exist_ok=True)
    inputs = demo_inputs(demo)
    explorer = build_explorer(adapter, notes=out / "explorer_notes.sqlite", name=name, **inputs)
    print(f"  explorer of {name} with {', '.join(inputs) or 'no earlier outputs'}")
    layer, dim, contribution = strongest_value(explorer, prompt, target)
    off = {"kind": "value", "layer": layer, "dim": dim, "op": "off"}
    trace = explorer.trace(prompt, target=target, k=5, interventions=[off])
    before, after = trace["original"], trace["edited"]
    p0, p1 = before["layers"][-1]["target"]["mlp"]["prob"], after["layers"][-1]["target"]["mlp"]["prob"]
    show = lambda run: ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in run["prediction"][:3])  # noqa: E731
    print(f"  {prompt!r}: value L{layer}.{dim} gives {target!r} the largest logit contribution "
          f"({contribution:.2f}); switched off, p({target!r}) {p0:.3f} -> {p1:.3f}")
    print(f"    unedited: {show(before)}\n    edited:   {show(after)}")
    why = browser_missing()
    if why:
        print(f"  no screenshot: {why}")
        return None
    state = {"prompt": prompt, "position": -1, "lens": "logit", "target": target, "k": 3,
             "interventions": [off], "value": {"layer": layer, "dim": dim}}
    with serve_in_thread(explorer) as base:
        path = screenshot(permalink(base, state), out / "explorer.png", wait_state="traced")
    print(f"  screenshot of the permalink (prompt, target, L{layer}.{dim} off, its value page): {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf_model", required=True, help="a HuggingFace model folder")
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="the demo's output folder")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--target", default=TARGET, help="one token, with its leading space")
    args = parser.parse_args()

    from fflayers.backends.hf import load_hf_lm

    adapter = load_hf_lm(args.hf_model, device="cpu")
    run_explorer(args.demo / "explorer", adapter, args.demo, Path(args.hf_model).name, args.prompt,
                 args.target)


if __name__ == "__main__":
    main()
