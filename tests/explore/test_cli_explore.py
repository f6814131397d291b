"""``fflayers explore`` flags: bad input is one line on stderr and exit code 2, before any model loads."""

from __future__ import annotations

import pytest

from fflayers.cli.explore import build_parser, load_code
from fflayers.cli.main import main


@pytest.mark.parametrize("argv, words", [
    ([], "exactly one of --model_dir"),
    (["--hf_model", "m", "--memories", "/no/such/dir"], "--memories /no/such/dir does not exist"),
    (["--hf_model", "m", "--port", "70000"], "--port 70000 must be in 1..65535"),
    (["--hf_model", "m", "--token", "short"], "--token must be at least 8 characters"),
    (["--model_dir", "d", "--dtype", "bf16"], "--load_dtype applies to HuggingFace models"),
])
def test_bad_flags(capsys, argv, words):
    assert main(["explore", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and err.startswith("fflayers explore: error:")


def test_load_code_reloads_the_model_as_the_command_did(tiny_gpt2_dir):
    args = build_parser().parse_args(["--hf_model", str(tiny_gpt2_dir)])
    scope: dict = {}
    exec(load_code(args), scope)
    assert scope["adapter"].n_layers == 2


def test_load_code_carries_the_loading_options(tiny_gpt2_dir):
    args = build_parser().parse_args(["--hf_model", str(tiny_gpt2_dir), "--dtype", "bf16", "--device_map",
                                      "auto", "--max_memory", "cpu=2GiB"])
    code = load_code(args)
    assert "dtype='bfloat16'" in code and "device_map='auto'" in code and "max_memory='cpu=2GiB'" in code
