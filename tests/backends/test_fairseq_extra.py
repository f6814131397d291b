"""Without the fairseq extra, a fairseq model dir or tool gives one line naming the extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fflayers import core, fairseq_tools
from fflayers.backends.fairseq_loading import load_fairseq_lm
from fflayers.core import ModelError

MESSAGE = 'this is a fairseq model directory; install the fairseq extra: pip install "fflayers[fairseq]"'


@pytest.fixture
def fairseq_dir(tmp_path):
    (tmp_path / "dict.txt").write_text("the 5\nof 3\n")
    (tmp_path / "model.pt").write_bytes(b"not read: the extra is checked first")
    return tmp_path


@pytest.fixture
def without_fairseq(monkeypatch):
    """fairseq made invisible to the check (in the HuggingFace-only install it is absent anyway)."""
    monkeypatch.setattr(core, "fairseq_installed", lambda: False)
    monkeypatch.setattr(fairseq_tools, "fairseq_installed", lambda: False)


def test_loading_a_fairseq_dir_names_the_extra(fairseq_dir, without_fairseq):
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(fairseq_dir)
    assert str(err.value) == MESSAGE


def test_fairseq_tools_name_the_extra(without_fairseq):
    with pytest.raises(fairseq_tools.FairseqToolError, match=r'pip install "fflayers\[fairseq\]"'):
        fairseq_tools.cli_path("fairseq-train")


def test_missing_dir_is_reported_before_the_extra(tmp_path, without_fairseq):
    with pytest.raises(ModelError, match="does not exist"):
        load_fairseq_lm(tmp_path / "absent")


@pytest.mark.skipif(core.fairseq_installed(), reason="checks the install without fairseq")
def test_cli_on_a_fairseq_dir_without_the_extra(fairseq_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the of the\n")
    proc = subprocess.run([sys.executable, "-m", "fflayers", "memories", "mine", "--model_dir",
                           str(fairseq_dir), "--data_file", str(corpus), "--get_trigger_examples",
                           "--output_file", str(tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(MESSAGE), proc.stderr
