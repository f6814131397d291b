"""The wheel and sdist: built from the checkout, installed into a fresh venv outside it, they give the
``fflayers`` command, its version, the package data and a working analysis."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import fflayers

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh venv's python, a working folder outside the checkout) with the built wheel installed."""
    pytest.importorskip("build", reason="the build frontend comes with the dev extra")
    tmp = tmp_path_factory.mktemp("wheel")
    dist = tmp / "dist"
    # sdist first, then the wheel built from the unpacked sdist: the sdist must carry everything
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)], cwd=tmp)
    wheels = sorted(dist.glob("fflayers-*.whl"))
    sdists = sorted(dist.glob("fflayers-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    assert wheels[0].name.startswith(f"fflayers-{fflayers.__version__}-")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    # the dependencies come from the test session's environment (nothing is downloaded); fflayers itself
    # only from the wheel: a plain path line in a .pth does not run that environment's editable finder
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp).stdout.strip())
    (site / "session_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
          str(wheels[0])], cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    return py, work


def test_the_wheel_is_what_gets_imported(installed):
    py, work = installed
    out = _run([str(py), "-c", "import fflayers, sys; print(fflayers.__file__); print(sys.prefix)"],
               cwd=work).stdout.split()
    assert Path(out[0]).is_relative_to(Path(out[1])), out
    assert not Path(out[0]).is_relative_to(ROOT)


def test_command_version_and_help(installed):
    py, work = installed
    cmd = py.parent / "fflayers"
    assert _run([str(cmd), "--version"], cwd=work).stdout.strip() == f"fflayers {fflayers.__version__}"
    listing = _run([str(cmd), "--help"], cwd=work).stdout
    for group in ("memories", "recall", "shortcuts", "neurons", "embedding", "merge"):
        assert group in listing
    _run([str(cmd), "memories", "mine", "--help"], cwd=work)


def test_package_data(installed):
    py, work = installed
    code = ("from fflayers.neurons.facts import RELATIONS_FILE, load_relations; import sys; "
            "print(RELATIONS_FILE); print(len(load_relations()))")
    out = _run([str(py), "-c", code], cwd=work).stdout.split()
    assert Path(out[0]).is_file() and not Path(out[0]).is_relative_to(ROOT)
    assert int(out[1]) > 0
    # the explorer's page ships with the package
    code = "from fflayers.explore.app import STATIC; print(STATIC)"
    static = Path(_run([str(py), "-c", code], cwd=work).stdout.strip())
    assert not static.is_relative_to(ROOT)
    assert {p.name for p in static.iterdir()} >= {"index.html", "explorer.js", "explorer.css"}


def test_an_analysis_on_a_tiny_model(installed, tiny_gpt2_dir):
    """``fflayers embedding values`` equals the value vectors projected by hand with the tied embedding."""
    import transformers as tf

    py, work = installed
    out = work / "values.csv"
    _run([str(py.parent / "fflayers"), "embedding", "values", "--hf_model", str(tiny_gpt2_dir),
          "--layers", "1", "--neurons", "0", "3", "--k", "5", "--output_file", str(out), "--quiet"],
         cwd=work, timeout=300)
    rows = list(csv.DictReader(out.open()))
    model = tf.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    values = model.transformer.h[1].mlp.c_proj.weight.detach()  # Conv1D: [d_ff, d], row i = value i
    for neuron in (0, 3):
        expected = (model.transformer.wte.weight.detach() @ values[neuron]).topk(5).indices.tolist()
        got = [int(r["token_id"]) for r in rows if int(r["neuron"]) == neuron and r["side"] == "value"]
        assert got == expected
