"""fflayers.fairseq_tools: the CLI wrappers (the session fixtures exercise the happy path)."""

from __future__ import annotations

import math

import pytest

from fflayers import fairseq_tools
from fflayers.fairseq_tools import FairseqToolError
from tests.fixtures.fairseq_models import NO_FAIRSEQ

Dictionary = pytest.importorskip("fairseq.data", reason=NO_FAIRSEQ).Dictionary


def test_dict_size_counts_special_symbols(fairseq_plain_lm):
    assert fairseq_tools.dict_size(fairseq_plain_lm.data_bin) == len(
        Dictionary.load(str(fairseq_plain_lm.data_bin / "dict.txt")))
    # the model dir got a copy of the dictionary it was trained with
    assert ((fairseq_plain_lm.model_dir / "dict.txt").read_bytes()
            == (fairseq_plain_lm.data_bin / "dict.txt").read_bytes())


def test_adaptive_cutoffs():
    assert fairseq_tools.adaptive_cutoffs(267_744) == (20_000, 60_000)
    a, b = fairseq_tools.adaptive_cutoffs(400)
    assert 0 < a < b < 400
    with pytest.raises(FairseqToolError):
        fairseq_tools.adaptive_cutoffs(5)


def test_preprocess_missing_file(tmp_path):
    with pytest.raises(FairseqToolError) as err:
        fairseq_tools.preprocess(tmp_path / "a.txt", tmp_path / "b.txt", None, tmp_path / "bin")
    assert "a.txt" in str(err.value) and "\n" not in str(err.value)


def test_cli_failure_is_one_line_with_the_tool_output(fairseq_plain_lm, tmp_path):
    # a data dir without the requested split makes fairseq-eval-lm fail
    (tmp_path / "dict.txt").write_bytes((fairseq_plain_lm.data_bin / "dict.txt").read_bytes())
    with pytest.raises(FairseqToolError) as err:
        fairseq_tools.eval_lm(tmp_path, fairseq_plain_lm.model_dir, subset="test")
    msg = str(err.value)
    assert msg.startswith("fairseq-eval-lm failed") and "\n" not in msg


def test_bad_training_options_fail_before_running(fairseq_plain_lm, tmp_path):
    vocab = fairseq_tools.dict_size(fairseq_plain_lm.data_bin)
    with pytest.raises(FairseqToolError) as err:
        fairseq_tools.train_lm(fairseq_plain_lm.data_bin, tmp_path, adaptive=True, cutoffs=(10, vocab + 5))
    assert "cutoffs" in str(err.value)
    with pytest.raises(FairseqToolError):
        fairseq_tools.train_lm(fairseq_plain_lm.data_bin, tmp_path, adaptive=True, normalize_before=False)
    assert not (tmp_path / "model.pt").exists()


def test_eval_lm_scores_cover_every_token(fairseq_plain_lm):
    result = fairseq_tools.eval_lm_scores(fairseq_plain_lm.data_bin, fairseq_plain_lm.model_dir,
                                          subset="valid")
    lines = fairseq_plain_lm.valid.read_text(encoding="utf-8").splitlines()
    assert sorted(result.samples) == list(range(len(lines)))
    assert sum(len(v) for v in result.samples.values()) == sum(len(line.split()) + 1 for line in lines)
    # the 4-decimal summary (bits) and the 6-decimal per-token scores tell the same story
    assert abs(result.mean_loss() - result.loss) < 0.5e-4 * math.log(2) + 1e-6
