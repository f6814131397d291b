"""A toy analysis on fflayers.runs: a mean accumulator over units, also runnable as a script (torchrun, kill).

Unit ``u`` adds the vector ``one_hot(u) ++ [u + 1, (u + 1) ** 2]`` to a :class:`Mean`, so the merged total
counts every unit exactly once and the values are sums of small integers (exact in float64, in any order).

    python -m tests.runs.toy --out RESULT.pt [--run_dir DIR] [--unit_log LOG] [--units N] [--sleep S]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fflayers.runs import from_state, merge_parts

KIND = "toy-sum"


class Mean:
    """A running sum and count of vectors (the accumulator protocol)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        self.total = x.clone() if self.total is None else self.total + x
        self.count += 1

    def merge(self, other: Mean) -> None:
        if other.total is not None:
            self.total = other.total.clone() if self.total is None else self.total + other.total
        self.count += other.count

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total = None if state["total"] is None else state["total"].clone()
        self.count = int(state["count"])

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count


@dataclass
class ToyConfig:
    """The options of the toy analysis (the resume key)."""

    units: int = 12
    scale: int = 1


def unit_vector(u: int, n_units: int, scale: int = 1) -> torch.Tensor:
    hot = torch.zeros(n_units, dtype=torch.float64)
    hot[u] = 1
    return torch.cat([hot, torch.tensor([scale * (u + 1.0), scale * (u + 1.0) ** 2], dtype=torch.float64)])


class ToyTask:
    """Units ``0..n_units-1`` of weight ``1 + u % 3``; optionally sleeps and logs each unit computed."""

    def __init__(self, config: ToyConfig, sleep: float = 0.0, log: str | os.PathLike | None = None,
                 on_unit: Callable[[int], None] | None = None) -> None:
        self.config, self.n_units, self.sleep = config, config.units, sleep
        self.log, self.on_unit = log, on_unit

    def unit_weight(self, unit: int) -> int:
        return 1 + unit % 3

    def run_units(self, units: range, progress: Callable[[int], object]) -> Mean:
        acc = Mean()
        for u in units:
            time.sleep(self.sleep)
            acc.add(unit_vector(u, self.n_units, self.config.scale))
            if self.on_unit is not None:
                self.on_unit(u)
            if self.log is not None:
                with open(self.log, "a") as f:
                    f.write(f"{os.environ.get('RANK', '0')} {u}\n")
            progress(self.unit_weight(u))
        return acc

    def merge(self, parts: list[Mean]) -> Mean:
        return merge_parts(parts)

    def to_state(self, part: Mean) -> dict:
        return part.state_dict()

    def from_state(self, state: dict) -> Mean:
        return from_state(Mean, state)


def expected(config: ToyConfig) -> Mean:
    """The result computed directly, unit by unit."""
    acc = Mean()
    for u in range(config.units):
        acc.add(unit_vector(u, config.units, config.scale))
    return acc


def logged_units(log: Path) -> list[tuple[int, int]]:
    """``(rank, unit)`` of each line of a log."""
    if not log.is_file():
        return []
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    from fflayers.distributed import dist_info, finish, init_distributed
    from fflayers.runs import run_units

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--run_dir", default=None)
    p.add_argument("--unit_log", default=None)
    p.add_argument("--units", type=int, default=12)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--shard_weight", type=float, default=1.0)
    args = p.parse_args(argv)
    init_distributed(torch.device("cpu"))
    try:
        config = ToyConfig(units=args.units)
        out = run_units(ToyTask(config, args.sleep, args.unit_log), config, kind=KIND, run_dir=args.run_dir,
                        shard_weight=args.shard_weight, progress=False)
        if dist_info().is_main:
            torch.save({"state": out.result.state_dict(), "n_shards": out.plan["n_shards"],
                        "computed_all": out.computed_all, "workers": out.plan["workers"]}, args.out)
    finally:
        finish()


if __name__ == "__main__":
    main()
