"""Bad models, devices and interrupts through the command line: one line on stderr naming the problem and the
fix, exit code 2 (130 for Ctrl-C), never a traceback and never an output file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fflayers.cli.main import main
from tests.fixtures.fairseq_models import fairseq_adaptive_lm, fairseq_corpus, needs_fairseq  # noqa: F401
from tests.fixtures.hf_models import tiny_gpt2_dir  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def keys(model: list[str], tmp_path: Path) -> list[str]:
    return ["embedding", "keys", *model, "--layers", "0", "--neurons", "0", "--k", "3",
            "--output_file", str(tmp_path / "keys.tsv")]


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize(("device", "needle"), [("gpu0", "unknown device 'gpu0'"),
                                                ("tpu:3", "unknown device"), ("cuda", "no CUDA"),
                                                ("cuda:1", "cuda")])
def test_device_is_checked_before_the_model_loads(device, needle, tiny_gpt2_dir,  # noqa: F811
                                                  tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        if torch.cuda.device_count() > 1:
            pytest.skip("this machine has the device")
        needle = "does not exist"
    code, err = run_cli([*keys(["--hf_model", str(tiny_gpt2_dir)], tmp_path), "--device", device], capsys)
    assert_one_line_error(code, err, needle, "--device" if "unknown" not in needle else "use auto")
    assert not (tmp_path / "keys.tsv").exists()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_hf_folder_without_config(tiny_gpt2_dir, tmp_path, capsys):  # noqa: F811
    folder = copy_model(tiny_gpt2_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    code, err = run_cli(keys(["--hf_model", str(folder)], tmp_path), capsys)
    assert_one_line_error(code, err, "has no config.json", "save_pretrained")


def test_hf_config_with_more_layers_than_weights_names_the_missing_tensors(tiny_gpt2_dir,  # noqa: F811
                                                                           tmp_path, capsys):
    folder = copy_model(tiny_gpt2_dir, tmp_path / "m")
    edit_config(folder, n_layer=3)  # two blocks stored
    code, err = run_cli(keys(["--hf_model", str(folder)], tmp_path), capsys)
    assert_one_line_error(code, err, "missing from the checkpoint", "h.2.")
    assert not (tmp_path / "keys.tsv").exists()


def test_hf_hidden_size_not_a_multiple_of_the_heads(tiny_gpt2_dir, tmp_path, capsys):  # noqa: F811
    folder = copy_model(tiny_gpt2_dir, tmp_path / "m")
    edit_config(folder, n_head=3)  # n_embd 16
    code, err = run_cli(keys(["--hf_model", str(folder)], tmp_path), capsys)
    assert_one_line_error(code, err, "not a multiple of its 3 attention heads")


def test_hf_intermediate_size_not_matching_the_weights(tiny_gpt2_dir, tmp_path, capsys):  # noqa: F811
    folder = copy_model(tiny_gpt2_dir, tmp_path / "m")
    edit_config(folder, n_inner=48)  # stored: 32
    code, err = run_cli(keys(["--hf_model", str(folder)], tmp_path), capsys)
    assert_one_line_error(code, err, "do not match")


def test_malformed_dict_txt(fairseq_adaptive_lm, tmp_path, capsys):  # noqa: F811
    folder = copy_model(fairseq_adaptive_lm.model_dir, tmp_path / "m")
    (folder / "dict.txt").write_text("the\ncity 3 4 5 6\n")
    code, err = run_cli(keys(["--model_dir", str(folder)], tmp_path), capsys)
    assert_one_line_error(code, err, "is not a fairseq dictionary", "dict.txt that came with the checkpoint")


def test_dict_txt_shorter_than_the_checkpoint(fairseq_adaptive_lm, tmp_path, capsys):  # noqa: F811
    folder = copy_model(fairseq_adaptive_lm.model_dir, tmp_path / "m")
    lines = (folder / "dict.txt").read_text().splitlines()
    (folder / "dict.txt").write_text("\n".join(lines[:20]) + "\n")
    code, err = run_cli(keys(["--model_dir", str(folder)], tmp_path), capsys)
    assert_one_line_error(code, err, "dict.txt")
    assert "cannot specify cutoff" not in err


SLOW_MINING = """
import importlib, sys, time
sys.path.insert(0, {repo!r})
te = importlib.import_module("fflayers.memories.trigger_examples")
run_units = te.TriggerScan.run_units
def slow(self, units, progress=None):
    time.sleep(0.25)  # so that the interrupt lands in the middle of the pass
    return run_units(self, units, progress)
te.TriggerScan.run_units = slow
from analysis import generate_outputs
sys.exit(generate_outputs.main(sys.argv[1:]))
"""


def test_ctrl_c_stops_with_one_line_and_exit_130(tiny_gpt2_dir, tmp_path):  # noqa: F811
    """A real SIGINT in the middle of a resumable run (trigger mining, each unit slowed down), sent once its
    manifest exists."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The city number {i} lies on the river and has a long history .\n"
                              for i in range(3000)))
    script = tmp_path / "slow_mining.py"
    script.write_text(SLOW_MINING.format(repo=str(REPO)))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(script), "--data_file", str(corpus), "--hf_model", str(tiny_gpt2_dir),
           "--get_trigger_examples", "--top_k_trigger_examples", "3", "--extract_mode", "layer-raw",
           "--output_file", str(out), "--device", "cpu", "--resume"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    manifest = Path(str(out) + ".ckpt") / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not manifest.is_file() and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert len(lines) == 1 and "rerun with --resume" in lines[0], err[-2000:]
    assert not out.exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["neurons", "--countries", "--output", "{out}/r.json", "--threshold", "-5"],
     "--threshold -5 must be > 0"),
    (["neurons", "--countries", "--output", "{out}/r.json", "--percentile", "150"],
     "--percentile 150 must be in"),
    (["neurons", "--countries", "--output", "{out}/r.json", "--adaptive_threshold", "1.5"],
     "--adaptive_threshold 1.5 must be in (0, 1]"),
    (["recall", "knockout", "--countries", "--output", "{out}/k.parquet", "--window", "0"],
     "--window 0 must be >= 1"),
    (["recall", "enrichment", "--countries", "--paragraphs", "{out}/p.jsonl", "--output", "{out}/e.parquet",
      "--keep", "0"], "--keep 0 must be >= 1"),
    (["shortcuts", "early-exit", "--output_dir", "{out}", "--lambdas", "-0.5", "3"],
     "--lambdas -0.5 must be in [0, 1]"),
    (["shortcuts", "all", "--data_file", "{out}/c.txt", "--output_dir", "{out}/s", "--lambdas", "0.5", "3"],
     "--lambdas 3 must be in [0, 1]"),
])
def test_numeric_flags_are_range_checked_before_the_model_loads(argv, needle, tmp_path, capsys):
    """The model folder does not exist: the range error must come first."""
    argv = [a.replace("{out}", str(tmp_path)) for a in argv] + ["--hf_model", str(tmp_path / "no-model")]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


@needs_fairseq
def test_binary_trigger_jsonl_is_one_line_and_writes_nothing(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "dict.txt").write_text("the 5\n")
    src = tmp_path / "t.jsonl"
    src.write_bytes(bytes(range(128, 256)) * 20)
    code, err = run_cli(["memories", "textual", "--input_file", str(src), "--model_dir", str(model),
                         "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "is not UTF-8 text", "trigger-examples .jsonl")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("truncated.parquet", b"PAR1\x00\x01", "cannot read"),
    ("empty.tsv", b"", "cannot read"),
    ("other.tsv", b"layer\tW2_dim\n0\t1\n", "is not a knockout table"),
])
def test_recall_plot_of_a_bad_table(name, content, needle, tmp_path, capsys):
    table = tmp_path / name
    table.write_bytes(content)
    code, err = run_cli(["recall", "plot", "--kind", "knockout", "--input", str(table),
                         "--output", str(tmp_path / "fig")], capsys)
    assert_one_line_error(code, err, needle)
    assert not list(tmp_path.glob("fig*"))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("trust", [False, True])
@needs_fairseq
def test_plain_pickle_checkpoint_says_so_and_runs_nothing(trust, tmp_path, capsys):
    import pickle

    model, marker = tmp_path / "m", tmp_path / "PWNED"
    model.mkdir()
    (model / "dict.txt").write_text("the 5\ncity 3\n")
    (model / "model.pt").write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=4))
    corpus = tmp_path / "c.tokens"
    corpus.write_text("the city\n")
    argv = ["memories", "mine", "--model_dir", str(model), "--data_file", str(corpus),
            "--get_trigger_examples", "--output_file", str(tmp_path / "out.jsonl"),
            *(["--trust-checkpoint"] if trust else [])]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "is a plain pickle, not a torch checkpoint", "nothing in it was run",
                          "torch.save(pickle.load(")
    assert not marker.exists() and not (tmp_path / "out.jsonl").exists()


def test_plot_memories_d_ff_zero_and_a_table_of_another_kind(tmp_path, capsys):
    import pandas as pd

    knockout = tmp_path / "knockout.parquet"
    table = pd.DataFrame({"known_id": [0], "layer": [3], "block": ["subject"], "p_change": [0.1]})
    table.to_parquet(knockout)
    base = ["memories", "plot", "--ffn_info", str(knockout), "--output_dir", str(tmp_path / "figs")]
    code, err = run_cli([*base, "--d_ff", "0"], capsys)
    assert_one_line_error(code, err, "--d_ff 0 must be >= 1")
    code, err = run_cli(base, capsys)
    assert_one_line_error(code, err, "is not an ffn info table (columns known_id, layer, block",
                          "--extract_mode layer", "--extract_mode dim")
    assert not (tmp_path / "figs").exists()


def test_an_empty_facts_file_says_how_to_build_one(tiny_gpt2_dir, tmp_path, capsys):  # noqa: F811
    facts = tmp_path / "facts.json"
    facts.write_text("[]")
    code, err = run_cli(["recall", "knockout", "--hf_model", str(tiny_gpt2_dir), "--facts", str(facts),
                         "--output", str(tmp_path / "k.parquet")], capsys)
    assert_one_line_error(code, err, "holds no facts", "fflayers recall facts --countries")


@pytest.mark.parametrize(("extra", "needle"), [
    (["--model_dir", "d", "--device_map", "auto"], "--device_map applies to HuggingFace models"),
    (["--model_dir", "d", "--load_dtype", "bf16"], "--load_dtype applies to HuggingFace models"),
    (["--hf_model", "m", "--max_memory", "cpu=1GiB"], "--max_memory goes with --device_map"),
    (["--hf_model", "m", "--offload_folder", "off"], "--offload_folder goes with --device_map"),
])
def test_placement_flags_are_checked_before_the_model_loads(extra, needle, tmp_path, capsys):
    code, err = run_cli(keys(extra, tmp_path), capsys)
    assert_one_line_error(code, err, needle)


def test_a_command_with_a_block_on_disk_writes_what_the_whole_model_writes(tiny_gpt2_dir, tmp_path,  # noqa: F811
                                                                         capsys):
    """``fflayers embedding values`` of the last block with that block offloaded to disk (--device_map JSON
    file, --offload_folder; safetensors weights are read from their own file) writes the same table as the
    model loaded whole; a map naming a device that does not exist is one line."""
    mapping = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu",
               "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    values = ["embedding", "values", "--hf_model", str(tiny_gpt2_dir), "--layers", "1", "--neurons", "0", "5",
              "--k", "4"]
    assert main([*values, "--output_file", str(tmp_path / "whole.tsv")]) == 0
    assert main([*values, "--output_file", str(tmp_path / "placed.tsv"), "--device_map",
                 str(tmp_path / "map.json"), "--offload_folder", str(tmp_path / "offload")]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "placed.tsv").read_text() == (tmp_path / "whole.tsv").read_text()
    code, err = run_cli([*values, "--output_file", str(tmp_path / "bad.tsv"), "--device_map",
                         json.dumps({"": "gpu7"})], capsys)
    assert_one_line_error(code, err, "cannot place", "a device this machine has")
    assert not (tmp_path / "bad.tsv").exists()
