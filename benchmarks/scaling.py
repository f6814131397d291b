"""Trigger mining (all keys, top-50) scaled over torchrun ranks: sentences per second on 1 vs N CPU ranks, and
the projected wall time of all of WikiText-103 train on 1 and 8 GPUs.

    python benchmarks/scaling.py [--model_dir runs/demo/fairseq_lm] [--corpus wiki.valid.tokens] \
        [--sentences 600] [--ranks 2] [--batch_tokens 4096] [--gpu_tflops 60]

Each setting runs ``torchrun --nproc_per_node R benchmarks/scaling.py --worker ...``: every rank loads the
model, then the scan (:func:`fflayers.memories.scan.run_scan` with :class:`TriggerScan`, the code behind
``generate_outputs.py --get_trigger_examples``) is timed from a barrier to the merged result on rank 0 (model
loading and corpus reading are left out). On a machine shared with other work the ratio is a lower bound.

Projection: the measured one-rank cost per token gives this machine's effective rate in model FLOPs
(``2 L (4 d^2 + 2 d d_ff)`` per token: attention projections and the FF layer; the top-k work is in the
measured time). WikiText-103's adaptive LM (16 layers, d = 1024, d_ff = 4096: 403 MFLOP per token) over 103M
tokens is projected at that rate for this machine, and at ``--gpu_tflops`` sustained per GPU (an assumption:
about 6% of an H100/H200's dense bf16 peak with ``--dtype bf16``) on 1 GPU and on 8 GPUs at the measured
N-rank efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_DIR, demo_sentences  # noqa: E402

WIKI103 = {"layers": 16, "d": 1024, "d_ff": 4096, "tokens": 103_227_021}


def flops_per_token(layers: int, d: int, d_ff: int) -> float:
    return 2.0 * layers * (4 * d * d + 2 * d * d_ff)


def worker(args: argparse.Namespace) -> None:
    import torch

    from fflayers.backends.fairseq_loading import load_fairseq_lm
    from fflayers.distributed import barrier, dist_info, finish, init_distributed
    from fflayers.memories.scan import ScanConfig, run_scan
    from fflayers.memories.trigger_examples import TriggerScan

    info = dist_info()
    init_distributed(torch.device("cpu"))
    lm = load_fairseq_lm(args.model_dir, device="cpu")
    ids = demo_sentences(lm, args.sentences, args.corpus)
    layers, dims = list(range(lm.n_layers)), list(range(lm.d_ff))
    config = ScanConfig("trigger_examples", layers, dims, len(ids), k=50)

    def make(bt):
        return TriggerScan(lm, ids, 50, layers, dims, bt)

    run_scan(make, args.batch_tokens, config, progress=False)  # warm-up
    barrier()
    t0 = time.perf_counter()
    out = run_scan(make, args.batch_tokens, config, progress=False)
    seconds = time.perf_counter() - t0
    if info.is_main:
        print(json.dumps({"ranks": info.world_size, "seconds": seconds, "sentences": len(ids),
                          "tokens": sum(map(len, ids)), "shards": out.plan["n_shards"], "layers": lm.n_layers,
                          "d": lm.d_model, "d_ff": lm.d_ff}))
    finish()


def launch(args: argparse.Namespace, ranks: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--nproc_per_node", str(ranks), "--master_port", str(port), __file__, "--worker",
            "--model_dir", args.model_dir, "--sentences", str(args.sentences), "--batch_tokens",
            str(args.batch_tokens)]
    if args.corpus:
        argv += ["--corpus", args.corpus]
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        sys.exit(f"scaling.py: the {ranks}-rank run failed:\n{proc.stderr[-2000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=str(DEMO_DIR / "fairseq_lm"))
    p.add_argument("--corpus", default=None)
    p.add_argument("--sentences", type=int, default=600)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch_tokens", type=int, default=4096)
    p.add_argument("--gpu_tflops", type=float, default=60.0, help="assumed sustained TFLOP/s per GPU (bf16)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not (Path(args.model_dir) / "model.pt").is_file():
        sys.exit(f"scaling.py: no fairseq LM in {args.model_dir}; run `make demo` or pass --model_dir")
    one = launch(args, 1)
    many = launch(args, args.ranks)
    rate1, rateN = one["sentences"] / one["seconds"], many["sentences"] / many["seconds"]
    ratio = rateN / rate1
    print(f"model: {one['layers']} layers, d={one['d']}, d_ff={one['d_ff']}; {one['sentences']} sentences, "
          f"{one['tokens']} tokens, all keys, top-50, batch_tokens {args.batch_tokens}")
    print(f"1 rank : {rate1:8.1f} sentences/s ({one['shards']} shards)")
    print(f"{args.ranks} ranks: {rateN:8.1f} sentences/s ({many['shards']} shards); speed-up {ratio:.2f}x")
    per_token = one["seconds"] / one["tokens"]
    rate = flops_per_token(one["layers"], one["d"], one["d_ff"]) / per_token
    big = flops_per_token(WIKI103["layers"], WIKI103["d"], WIKI103["d_ff"]) * WIKI103["tokens"]
    eff = ratio / args.ranks
    print(f"measured: {per_token * 1e6:.1f} us per token on 1 rank = {rate / 1e9:.1f} GFLOP/s effective")
    print(f"projected WikiText-103 train (103M tokens, 16 x 4096 keys, top-50): {big / rate / 3600:.1f} h on "
          f"one such CPU process; {big / (args.gpu_tflops * 1e12) / 60:.1f} min on 1 GPU, "
          f"{big / (8 * eff * args.gpu_tflops * 1e12) / 60:.1f} min on 8 GPUs (at {args.gpu_tflops:.0f} "
          f"TFLOP/s per GPU, {eff:.0%} parallel efficiency as measured here)")


if __name__ == "__main__":
    main()
