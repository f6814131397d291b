#!/usr/bin/env bash
# Copy one figure per analysis from a finished `make demo` (runs/demo) into docs/figures, where the README and
# the docs pages show them. Run it after a demo whose numbers the docs quote.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-runs/demo}
mkdir -p docs/figures
copy() { test -f "$demo/$1" || { echo "copy_demo_figures.sh: $demo/$1 is missing; run make demo" >&2; exit 2; }
         cp "$demo/$1" "docs/figures/$2"; }
copy memories_fairseq/figures/agreement_by_layer.png memories_agreement.png
copy recall/knockout.png recall_knockout.png
copy shortcuts/fairseq/r2.png shortcuts_r2.png
copy neurons/knowledge_neurons.png neurons_effects.png
copy embedding_space/smollm2_neurons_vs_hidden.png embedding_neurons_vs_hidden.png
copy lenses/lenses.png lenses.png
copy explorer/explorer.png explorer.png
# the explorer's full-page screenshot at half size (it is 1400 px wide and several thousand tall)
"${PYTHON:-.venv/bin/python}" -c "from PIL import Image; im = Image.open('docs/figures/explorer.png'); \
im.resize((im.width // 2, im.height // 2), Image.LANCZOS).quantize(128).save('docs/figures/explorer.png', optimize=True)"
echo "copy_demo_figures.sh: 7 figures -> docs/figures/"
