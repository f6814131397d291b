"""The recall tables' configs against their parsers: every option of a table subcommand is a config field or a
place option, never both and never neither; a config holds the parsed values; the metadata's config and the
run's resume key are its ``asdict``."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from fflayers.cli.common import PLACE_OPTIONS
from fflayers.cli.recall import build_parser
from fflayers.cli.recall_configs import CONFIGS, table_config


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_option_is_config_or_place(command):
    dests = {a.dest for a in subparsers()[command]._actions if a.dest != "help"} | {"command"}
    fields = {f.name for f in dataclasses.fields(CONFIGS[command])}
    assert fields <= dests, f"config fields without an option: {fields - dests}"
    assert not fields & PLACE_OPTIONS
    neither = dests - fields - PLACE_OPTIONS
    assert not neither, f"options neither config nor place: {neither}"


def test_config_holds_the_parsed_values():
    args = build_parser().parse_args(["knockout", "--hf_model", "m", "--countries", "--output", "o.csv",
                                      "--window", "3", "--sets", "last", "subject", "--layers", "0", "2",
                                      "--max_facts", "5", "--batch_size", "7", "--load_dtype", "bf16"])
    config = table_config(args)
    assert config == CONFIGS["knockout"](countries=True, filter=False, max_facts=5, load_dtype="bf16",
                                         batch_size=7, window=3, sets=("last", "subject"), layers=(0, 2))
    assert hash(config) == hash(table_config(args))
    # the resume key's JSON form: lists where the parser gave lists
    assert json.loads(json.dumps(dataclasses.asdict(config)))["sets"] == ["last", "subject"]
