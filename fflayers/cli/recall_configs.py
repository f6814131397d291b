"""The configs of the ``recall`` table subcommands: one dataclass each, built from the parsed options, whose
``asdict`` is both the ``.meta.json`` config and (with the block size) the resume key of a run.

A config holds every option that changes the rows; :data:`fflayers.cli.common.PLACE_OPTIONS` are the options
that say where things are, which model to load, or how the run looks (the model and the input files enter the
resume key through their content fingerprints instead). Every option of a table subcommand is one or the other
(a test checks that the parsers and these classes agree).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

__all__ = ["CONFIGS", "TableConfig", "KnockoutConfig", "ProjectConfig", "ExtractionConfig",
           "EnrichmentConfig", "SublayerKnockoutConfig", "table_config"]

@dataclass(frozen=True)
class TableConfig:
    """The options every table shares: which facts (``--countries`` or a facts file, ``--filter``,
    ``--max_facts``), the weights' dtype, and the batch size (padding can move the last float bits)."""

    countries: bool = False
    filter: bool = False
    max_facts: int | None = None
    load_dtype: str = "fp32"
    batch_size: int = 32


@dataclass(frozen=True)
class KnockoutConfig(TableConfig):
    """``knockout``: windows of ``window`` layers centred on ``layers``, the position ``sets`` blocked."""

    window: int = 9
    sets: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ProjectConfig(TableConfig):
    """``project``: the top ``k`` tokens of ``points`` at ``positions`` in ``layers``."""

    points: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    positions: tuple[str, ...] = ()
    k: int = 10
    final_norm: bool = True


@dataclass(frozen=True)
class ExtractionConfig(TableConfig):
    """``extraction``: the model ``variants`` (``patch_layer`` for subject patching)."""

    variants: tuple[str, ...] = ()
    patch_layer: int = 0
    final_norm: bool = False


@dataclass(frozen=True)
class RateConfig(TableConfig):
    """The attributes rate shared by ``enrichment`` and ``sublayer-knockout``."""

    paragraphs_format: str = "auto"
    top: int = 500
    keep: int = 50
    final_norm: bool = True
    layers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EnrichmentConfig(RateConfig):
    """``enrichment``: the rate of hidden states at ``positions`` (and the subject-embedding baseline)."""

    positions: tuple[str, ...] = ()
    no_baseline: bool = False


@dataclass(frozen=True)
class SublayerKnockoutConfig(RateConfig):
    """``sublayer-knockout``: ``kinds`` zeroed in windows ``[s, s + window]`` for ``starts``, read at
    ``position``."""

    kinds: tuple[str, ...] = ()
    window: int = 10
    starts: tuple[int, ...] | None = None
    position: str = "subject_last"


#: table subcommand -> its config class
CONFIGS: dict[str, type[TableConfig]] = {
    "knockout": KnockoutConfig, "project": ProjectConfig, "extraction": ExtractionConfig,
    "enrichment": EnrichmentConfig, "sublayer-knockout": SublayerKnockoutConfig,
}


def _frozen(value: object) -> object:
    """Lists of the parser as tuples (a config is hashable and compares by value)."""
    return tuple(value) if isinstance(value, list) else value


def table_config(args: argparse.Namespace) -> TableConfig:
    """The config of the table subcommand ``args.command`` from its parsed options."""
    cls = CONFIGS[args.command]
    return cls(**{f.name: _frozen(getattr(args, f.name)) for f in dataclasses.fields(cls)})
