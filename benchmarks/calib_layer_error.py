"""Does GPTQ's rounding overfit the calibration text, or does its layer objective miss what the answers need?

For every linear weight of a decoder's blocks, the output error of the compressed delta E = dW - dW_q, relative to
the delta's own output, ``tr(E H E^T) / tr(dW H dW^T)``, under two input second moments H: the calibration
records' (what GPTQ minimises) and held-out records' (the same task, never calibrated on). Two settings under the
same uncalibrated allocation: round-to-nearest (the default compress) and GPTQ (``--calib-use rounding``, with its
refit, and again without it at whole-vector groups). A GPTQ error below round-to-nearest's on held-out inputs while
the model's answers get worse means the layer objective does not follow the answers; above it, overfitting. The
last column leaves the held-out H's ``--top`` largest eigendirections out of the measure (the directions every
token shares weigh most in an uncentred second moment).

    python benchmarks/calib_layer_error.py BASE FINETUNED CALIB.jsonl --calib-samples 128 --bits 0.5

The held-out records are the calibration file's records after the first ``--calib-samples`` (the suite's
``calib_task512.jsonl`` holds ``calib_task128.jsonl`` first). Prints one row per kind of matrix (mean over the
blocks) and the means over all.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from transformers import AutoTokenizer

from deltacomp.calib.activations import LayerwiseHessians
from deltacomp.calib.context import MatrixContext
from deltacomp.calib.data import load_samples
from deltacomp.config import CompressConfig
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.methods.base import get_method

SETTINGS = {
    "round-to-nearest (default)": {},
    "GPTQ (--calib-use rounding)": {"calib_use": "rounding"},
    "GPTQ, no refit, whole-vector groups": {"calib_use": "rounding", "refit": False, "gptq_group_size": 0},
}


def hessians(ft: Checkpoint, samples: list[torch.Tensor], names: set[str], device: str) -> dict[str, torch.Tensor]:
    out = {}
    for _, block in LayerwiseHessians(ft, samples, names, device):
        out.update({n: h.cpu() for n, h in block.items()})
    return out


def rel_error(err: torch.Tensor, delta: torch.Tensor, h: torch.Tensor) -> float:
    return float(((err @ h) * err).sum() / ((delta @ h) * delta).sum())


def without_top(h: torch.Tensor, k: int) -> torch.Tensor:
    """``h`` less its ``k`` largest eigendirections (what every token shares, e.g. the inputs' mean)."""
    vals, vecs = torch.linalg.eigh(h.double())
    top = vecs[:, -k:]
    return (h.double() - top @ torch.diag(vals[-k:]) @ top.T).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("finetuned")
    ap.add_argument("calib", help="JSON lines of the task (calibration records first, then held-out ones)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--bits", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=8, help="eigendirections of the held-out H left out of the last "
                    "column")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    base, ft = Checkpoint(args.base), Checkpoint(args.finetuned)
    names = {n for n in ft.keys() if re.search(r"\.layers\.\d+\..*proj\.weight$", n)}
    tok = AutoTokenizer.from_pretrained(args.finetuned)
    samples = load_samples(args.calib, tok)
    if len(samples) <= args.calib_samples:
        raise SystemExit(f"{args.calib} holds {len(samples)} records: none left after {args.calib_samples}")
    h_cal = hessians(ft, samples[:args.calib_samples], names, args.device)
    h_out = hessians(ft, samples[args.calib_samples:], names, args.device)
    method = get_method("mixed")
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for name in sorted(h_cal):
        delta = ft.read(name).float() - base.read(name).float()
        kind = name.rsplit(".", 2)[-2]
        h_rest = without_top(h_out[name], args.top)
        for label, kw in SETTINGS.items():
            config = CompressConfig.from_options(bits=args.bits, device=args.device, **kw)
            context = MatrixContext(hessian=h_cal[name]) if kw else None
            c = method.compress(delta, config, context)
            err = delta - method.reconstruct(c.tensors, c.info, tuple(delta.shape))
            for key in ((label, kind), (label, "all")):
                s = sums[key]
                s[0] += rel_error(err, delta, h_cal[name])
                s[1] += rel_error(err, delta, h_out[name])
                s[2] += rel_error(err, delta, h_rest)
                s[3] += 1
    print(f"relative output error of the compressed delta at {args.bits:g} bit per entry "
          f"({args.calib_samples} calibration records, {len(samples) - args.calib_samples} held-out)")
    rest = f"held-out less top {args.top}"
    print(f"{'setting':<38} {'matrix':<10} {'calibration':>12} {'held-out':>10} {'held-out / cal':>15} {rest:>20}")
    for (label, kind), (cal, out, low, n) in sorted(sums.items(), key=lambda kv: (kv[0][1] != "all", kv[0][1])):
        print(f"{label:<38} {kind:<10} {cal / n:>12.4f} {out / n:>10.4f} {out / cal:>15.2f} {low / n:>20.4f}")


if __name__ == "__main__":
    main()
