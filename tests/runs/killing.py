"""Kill a run for real: start a command, wait until its run folder's manifest shows N finished shards, then
SIGKILL it (the helper of every "killed, then resumed" test)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["shard_status", "kill_after_shards"]


def shard_status(run_dir: str | os.PathLike) -> list[str]:
    """The status of each shard in ``run_dir``'s manifest (none while it is missing or being replaced)."""
    try:
        return [s["status"] for s in json.loads((Path(run_dir) / "manifest.json").read_text())["shards"]]
    except (OSError, ValueError, KeyError):
        return []


def kill_after_shards(argv: Sequence[str], run_dir: str | os.PathLike, n_done: int, *,
                      env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                      timeout_s: float = 240) -> dict:
    """Run ``argv``, SIGKILL it once ``n_done`` shards of ``run_dir`` are done, and return the manifest then.

    Fails the test when the command exits first or does not get that far within ``timeout_s``."""
    proc = subprocess.Popen(list(argv), cwd=cwd, env=None if env is None else dict(env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout_s
        while shard_status(run_dir).count("done") < n_done:
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before {n_done} shard(s) were "
                                     f"done: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                raise AssertionError(f"the run did not finish {n_done} shard(s) in {timeout_s:g} s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not killed"
    return json.loads((Path(run_dir) / "manifest.json").read_text())
