"""Scaling of ``deltacomp compress`` over the ranks of one host (torchrun; nccl on GPUs, gloo on the CPU).

    python benchmarks/compress_distributed.py generate /data/pair [--shape 70b]    # base + fine-tune, fp16
    python benchmarks/compress_distributed.py run /data/pair --ranks 1,2,4,8 [--no-calib] [--bits 1]
    python benchmarks/compress_distributed.py --smoke                               # tiny shapes, CPU, 1 and 2 ranks

The pair is made as ``benchmarks/compress_7b_speed.py`` makes its 7B pair (a Llama config with random base
weights, a decaying-spectrum delta on every linear weight of the blocks), with the 7B or 70B config. Each count of
ranks is one ``torchrun --standalone --nproc-per-node N`` of this script's ``worker``, which runs
:func:`deltacomp.compress.compress` under a stage timer (exclusive wall time per stage, as in compress_7b_speed.py)
and writes one JSON a rank. The table gives, per count of ranks: the wall time of the slowest rank, each stage's
time (the largest over ranks, summed over that rank's calls), the scaling efficiency ``T1 / (N * TN)``, and the
peak GPU memory (``torch.cuda.max_memory_allocated``) and host memory (maximum RSS) of the most demanding rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compress_7b_speed import LLAMA2_7B, StageTimer, calibration_text, generate  # noqa: E402

LLAMA2_70B = dict(LLAMA2_7B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)
TINY = dict(LLAMA2_7B, vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
SHAPES = {"7b": LLAMA2_7B, "70b": LLAMA2_70B, "tiny": TINY}


def worker(args) -> None:
    """One rank of a run (started by torchrun): compress, then write this rank's timings and memory."""
    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig
    from deltacomp.stages import observe

    rank = int(os.environ.get("RANK", "0"))
    calib = None if args.no_calib else str(args.pair / "calib.txt")
    config = CompressConfig(bits=args.bits, device=args.device, calib=calib, calib_samples=args.calib_samples,
                            calib_seqlen=args.calib_seqlen)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with observe(StageTimer()) as timer:
        compress(args.pair / "base", args.pair / "finetuned", args.out, config, overwrite=True, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    row = {"rank": rank, "total_s": time.perf_counter() - t0, "stages_s": dict(timer.total),
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
           "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    (args.results / f"rank-{rank}.json").write_text(json.dumps(row))


def launch(pair: Path, ranks: int, args, results: Path) -> list[dict]:
    results.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
           "worker", str(pair), "--out", str(pair / f"pkg-{ranks}"), "--results", str(results),
           "--device", args.device, "--bits", str(args.bits), "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), *(["--no-calib"] if args.no_calib else [])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // ranks)))}
    subprocess.run(cmd, check=True, env=env)
    return [json.loads((results / f"rank-{r}.json").read_text()) for r in range(ranks)]


def table(runs: dict[int, list[dict]]) -> str:
    stages = sorted({s for rows in runs.values() for r in rows for s in r["stages_s"]})
    head = ["ranks", "wall s", "efficiency", *[f"{s} s" for s in stages], "peak GPU GiB", "peak host GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t1 = max(r["total_s"] for r in runs[min(runs)]) * min(runs)
    for n, rows in sorted(runs.items()):
        wall = max(r["total_s"] for r in rows)
        cells = [str(n), f"{wall:.2f}", f"{t1 / (n * wall):.0%}"]
        cells += [f"{max(r['stages_s'].get(s, 0.0) for r in rows):.2f}" for s in stages]
        cells += [f"{max(r['peak_gpu_gib'] for r in rows):.2f}", f"{max(r['peak_host_gib'] for r in rows):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(pair: Path, args) -> None:
    calibration_text(pair / "calib.txt", args.calib_samples * args.calib_seqlen * 2)
    runs = {}
    for n in args.ranks:
        runs[n] = launch(pair, n, args, pair / f"results-{n}")
        print(f"{n} rank(s): {max(r['total_s'] for r in runs[n]):.2f} s", flush=True)
    print(table(runs))
    files = [json.loads((pair / f"pkg-{n}" / "deltacomp.json").read_text())["files"] for n in args.ranks]
    print(f"every count of ranks wrote the same files (sha256 of each): {all(f == files[0] for f in files)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["generate", "run", "worker"])
    p.add_argument("pair", nargs="?", type=Path)
    p.add_argument("--smoke", action="store_true", help="Tiny shapes on the CPU, 1 and 2 ranks, in a temporary folder.")
    p.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bits", type=float, default=1.0)
    p.add_argument("--no-calib", action="store_true")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--out", type=Path)
    p.add_argument("--results", type=Path)
    args = p.parse_args()
    if args.smoke:
        args.device, args.ranks, args.calib_samples, args.calib_seqlen = "cpu", [1, 2], 8, 64
        with tempfile.TemporaryDirectory(prefix="deltacomp-bench-") as tmp:
            pair = Path(tmp)
            generate(pair, TINY, device="cpu")
            run(pair, args)
        return
    if args.command is None or args.pair is None:
        p.error("give a command and a pair folder, or --smoke")
    if args.command == "generate":
        generate(args.pair, SHAPES[args.shape], device=args.device)
    elif args.command == "run":
        run(args.pair, args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
