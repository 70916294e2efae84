"""Speed of ``deltacomp compress`` with calibration + GPTQ on a Llama-2-7B-shaped pair (run on one GPU).

Two steps, in separate processes so that the peak host memory of compression is its own:

    python benchmarks/compress_7b_speed.py generate /tmp/pair           # base + fine-tune, fp16, sharded
    python benchmarks/compress_7b_speed.py compress /tmp/pair [--allocation optimal] [--budget-scope matrix]
    python benchmarks/compress_7b_speed.py svd                          # randomized vs full SVD, accuracy + time

The pair: the real Llama-2-7B config (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000) with
random base weights (N(0, 0.02)); the fine-tune adds to every linear weight of the blocks a delta with a decaying
spectrum ``s_i ~ i^-0.8`` (random singular vectors) scaled to 1% of the weight's norm, and small changes to the
norms. Both are stored in fp16 (Llama-2's own dtype), so ``ft - base`` also carries fp16 rounding noise, as a
real fine-tune does. There is no Llama tokenizer offline: the pair carries a byte-level tokenizer (256 ids, a
subset of the 32000), and the calibration text is this repository's own source and docs, cut into
``--calib-samples`` windows of ``--calib-seqlen`` tokens (default 128 x 512).

Stages are timed exclusively (a nested stage's time is not counted in its parent), with
``torch.cuda.synchronize()`` at every boundary: load (reading checkpoint tensors), calibration text (reading and
tokenizing it), token tables (their weights, the output head's inputs included), calibration (embedding and block
forwards with Hessian hooks), svd, allocation (per-vector error tables and the allocator), gptq (factor
quantization incl. refits), pack (bit packing), write (package shards). Peak GPU memory is
``torch.cuda.max_memory_allocated``; peak host memory is the process's maximum RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, torch_dtype="float16")
REPO = Path(__file__).resolve().parents[1]


def byte_tokenizer():
    """A byte-level tokenizer: 256 ids, one per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def calibration_text(path: Path, min_bytes: int) -> Path:
    parts = [p.read_text(errors="replace") for p in sorted(REPO.rglob("*.py")) + sorted(REPO.rglob("*.md"))
             if ".git" not in p.parts]
    text = "\n".join(parts)
    while len(text) < min_bytes:
        text += "\n" + text
    path.write_text("\n".join(line for line in text.splitlines() if line.strip()))
    return path


def _shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], bool]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h), False)]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h), True), (p + "self_attn.k_proj.weight", (kv, h), True),
                (p + "self_attn.v_proj.weight", (kv, h), True), (p + "self_attn.o_proj.weight", (h, h), True),
                (p + "mlp.gate_proj.weight", (i, h), True), (p + "mlp.up_proj.weight", (i, h), True),
                (p + "mlp.down_proj.weight", (h, i), True), (p + "input_layernorm.weight", (h,), False),
                (p + "post_attention_layernorm.weight", (h,), False)]
    return out + [("model.norm.weight", (h,), False), ("lm_head.weight", (v, h), False)]


def generate(out: Path, cfg: dict, shard_bytes: int = 4 << 30, device: str = "cuda") -> None:
    """Write base/ and finetuned/ (fp16 sharded safetensors, config, tokenizer), one tensor at a time."""
    from safetensors.torch import save_file

    g = torch.Generator(device=device).manual_seed(0)
    writers = {side: {"buf": {}, "bytes": 0, "n": 0, "map": {}} for side in ("base", "finetuned")}

    def flush(side: str) -> None:
        w = writers[side]
        if w["buf"]:
            w["n"] += 1
            name = f"model-{w['n']:05d}.safetensors"
            save_file(w["buf"], str(out / side / name), metadata={"format": "pt"})
            w["map"].update({k: name for k in w["buf"]})
            w["buf"], w["bytes"] = {}, 0

    def add(side: str, name: str, t: torch.Tensor) -> None:
        w = writers[side]
        w["buf"][name] = t.to(torch.float16).cpu()
        w["bytes"] += t.numel() * 2
        if w["bytes"] >= shard_bytes:
            flush(side)

    for side in writers:
        (out / side).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name, shape, is_linear in _shapes(cfg):
        if len(shape) == 1:
            base = torch.ones(shape, device=device)
            ft = base + 0.01 * torch.randn(shape, device=device, generator=g)
        else:
            base = 0.02 * torch.randn(shape, device=device, generator=g)
            ft = base
            if is_linear:
                m, n = shape
                r = min(m, n)
                s = torch.arange(1, r + 1, device=device, dtype=torch.float32) ** -0.8
                a = torch.randn(m, r, device=device, generator=g) / m**0.5
                b = torch.randn(n, r, device=device, generator=g) / n**0.5
                delta = (a * s) @ b.T
                ft = base + delta * (0.01 * base.norm() / delta.norm())
        add("base", name, base)
        add("finetuned", name, ft)
    for side, w in writers.items():
        flush(side)
        index = {"metadata": {"total_size": sum(p.numel() * 2 for p in [])}, "weight_map": w["map"]}
        (out / side / "model.safetensors.index.json").write_text(json.dumps(index))
        conf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **cfg}
        (out / side / "config.json").write_text(json.dumps(conf, indent=1))
        byte_tokenizer().save_pretrained(out / side)
    print(f"generated {out} in {time.perf_counter() - t0:.1f} s", flush=True)


class StageTimer:
    """Exclusive wall time per stage, synchronizing the GPU at every boundary."""

    def __init__(self):
        import threading

        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self.local = threading.local()
        self.main = threading.get_ident()

    @property
    def stack(self) -> list[list]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def enter(self, stage: str) -> None:  # deltacomp.stages listener
        import threading

        main = threading.get_ident() == self.main  # reads ahead in the prefetch thread overlap the rest
        if main:
            self._sync()
        self.stack.append([stage if main else stage + " (prefetch thread, overlapped)", time.perf_counter(), 0.0])

    def exit(self, stage: str) -> None:
        import threading

        if threading.get_ident() == self.main:
            self._sync()
        name, start, child = self.stack.pop()
        took = time.perf_counter() - start
        self.total[name] += took - child
        self.calls[name] += 1
        if self.stack:
            self.stack[-1][2] += took


def _report_when_stopped(timer: StageTimer, t0: float) -> None:
    """On SIGTERM (a time limit's ``timeout``), print the stage times and call counts so far, then stop (124)."""
    import signal

    def stop(signum, frame):
        so_far = {k: round(v, 1) for k, v in timer.total.items()}
        print(f"stopped after {time.perf_counter() - t0:.1f} s; stage seconds so far {json.dumps(so_far)}; "
              f"calls {json.dumps(dict(timer.calls))}", flush=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, stop)


def run_compress(pair: Path, args) -> dict:
    from deltacomp.compress import compress
    from deltacomp.config import CompressConfig
    from deltacomp.stages import observe

    calib = calibration_text(pair / "calib.txt", args.calib_samples * args.calib_seqlen * 2)
    config = CompressConfig(bits=args.bits, device=args.device, calib=None if args.no_calib else str(calib),
                            calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                            allocation=args.allocation, budget_scope=args.budget_scope, svd=args.svd,
                            sequential=args.sequential, tune=args.tune)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with observe(StageTimer()) as timer:
        _report_when_stopped(timer, t0)
        manifest = compress(pair / "base", pair / "finetuned", pair / "pkg", config, overwrite=True, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    stages = dict(timer.total)
    stages["other"] = total - sum(v for k, v in stages.items() if "overlapped" not in k)
    return {
        "config": {k: v for k, v in config.to_dict().items() if k not in ("include", "exclude")},
        "total_s": total,
        "stages_s": stages,
        "calls": dict(timer.calls),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "budget": manifest["budget"],
        "package_bytes": manifest["totals"]["package_tensor_bytes"],
        "compressed_modules": manifest["totals"]["compressed_modules"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def svd_check(device: str, sizes=((4096, 4096, 1024), (11008, 4096, 1352))) -> list[dict]:
    """Randomized vs full SVD on decaying-spectrum deltas: time and the rank-k error ratio."""
    from deltacomp.lowrank.svd import randomized_svd

    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    for m, n, k in sizes:
        r = min(m, n)
        s = torch.arange(1, r + 1, device=device, dtype=torch.float32) ** -0.8
        a = ((torch.randn(m, r, device=device, generator=g) / m**0.5) * s) @ (
            torch.randn(n, r, device=device, generator=g) / n**0.5).T
        a += 0.05 * float(s[k]) / (m**0.5) * torch.randn(m, n, device=device, generator=g)  # fp16-like noise

        def timed(fn):
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return out, time.perf_counter() - t

        (u, sv, vh), t_full = timed(lambda a=a: torch.linalg.svd(a, full_matrices=False))
        best = float((a - (u[:, :k] * sv[:k]) @ vh[:k]).norm())
        row = {"shape": f"{m}x{n}", "k": k, "full_s": t_full}
        for name, niter, qr in (("rand2", 2, None), ("rand4", 4, None), ("rand4_qr", 4, True)):
            (u2, s2, v2), t_r = timed(lambda a=a, k=k, niter=niter, qr=qr: randomized_svd(a, k, niter, qr=qr))
            err = float((a - (u2 * s2) @ v2.T).norm())
            row[f"{name}_s"] = t_r
            row[f"{name}_err_ratio"] = err / best
            row[f"{name}_sv_rel"] = float(((s2 - sv[:k]).abs() / sv[:k]).max())
        rows.append(row)
    return rows


def gptq_check(device: str) -> dict:
    """GPTQ's three GPU paths (eager column loop, CUDA graph, the extension's block kernel where built) against each
    other, and GPTQ against round-to-nearest, on random data."""
    from deltacomp import native
    from deltacomp.quant import gptq, rtn

    g = torch.Generator(device=device).manual_seed(2)
    rows, cols, n = 1024, 4096, 8192
    x = torch.randn(n, cols, device=device, generator=g) @ (torch.randn(cols, cols, device=device, generator=g)
                                                            / cols**0.5)
    h = x.T @ x / n
    w = torch.randn(rows, cols, device=device, generator=g) / cols**0.5
    bits = torch.tensor([8, 3, 2], device=device).repeat_interleave(torch.tensor([2, 32, rows - 34], device=device))
    paths = {"eager": (False, False), "graph": (False, True)}
    if native.status().module is not None:
        paths["kernel"] = (True, False)
    out = {"gptq_path_default": next(iter(reversed(paths)))}
    runs = {}
    for name, (kernel, graphs) in paths.items():
        gptq.USE_KERNEL, gptq.USE_CUDA_GRAPHS = kernel, graphs
        gptq.gptq_rows(w, h, bits, 128)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runs[name] = gptq.gptq_rows(w, h, bits, 128)
        torch.cuda.synchronize()
        out[f"gptq_rows_1024x4096_{name}_s"] = time.perf_counter() - t0
    gptq.USE_KERNEL, gptq.USE_CUDA_GRAPHS = True, True
    for name, (codes, scale, offset) in runs.items():
        out[f"codes_differing_{name}_vs_eager"] = float((codes != runs["eager"][0]).float().mean())
        w_q = rtn.dequantize(codes, scale, offset, 128)
        out[f"gptq_{name}_rel_output_err"] = float(((w - w_q) @ x.T).norm() / (w @ x.T).norm())
    rtn_q = torch.cat([rtn.dequantize(*rtn.quantize_rows(w[bits == b], int(b), 128), 128) for b in (8, 3, 2)])
    out["rtn_rel_output_err"] = float(((w - rtn_q) @ x.T).norm() / (w @ x.T).norm())
    return out


def table(result: dict) -> str:
    lines = [f"device: {result['device']}", "| stage | seconds |", "| --- | ---: |"]
    for k, v in sorted(result["stages_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.1f} |")
    lines.append(f"| **total** | **{result['total_s']:.1f}** |")
    lines.append(f"peak GPU memory {result['peak_gpu_gib']:.1f} GiB, "
                 f"peak host RSS {result['peak_host_rss_gib']:.1f} GiB, "
                 f"{result['compressed_modules']} matrices, package {result['package_bytes'] / 1e9:.3f} GB, "
                 f"factor bits/entry {result['budget']['achieved_factor_bits_per_entry']:.4f}, "
                 f"all-in {result['budget']['achieved_all_in_bits_per_entry']:.4f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["generate", "compress", "svd", "check"])
    ap.add_argument("pair", nargs="?", default="/tmp/pair7b")
    ap.add_argument("--layers", type=int, default=32, help="fewer blocks for a smoke run")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bits", type=float, default=1.0)
    ap.add_argument("--allocation", default="optimal")
    ap.add_argument("--budget-scope", default="matrix")
    ap.add_argument("--svd", default="auto")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--no-calib", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="compress --sequential")
    ap.add_argument("--tune", type=int, default=0, help="compress --tune N (--preset best: 3)")
    ap.add_argument("--json", help="append the result as a JSON line to this file")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    pair = Path(args.pair)
    if args.step == "generate":
        cfg = {**LLAMA2_7B, "num_hidden_layers": args.layers, "hidden_size": args.hidden,
               "intermediate_size": args.intermediate, "num_attention_heads": max(1, args.hidden // 128),
               "num_key_value_heads": max(1, args.hidden // 128)}
        generate(pair, cfg, device=args.device)
        return
    if args.step == "check":
        print(json.dumps(gptq_check(args.device)), flush=True)
        return
    if args.step == "svd":
        rows = svd_check(args.device)
        result = {"svd": rows}
        print(json.dumps(rows, indent=1))
    else:
        result = run_compress(pair, args)
        print(json.dumps(result, indent=1))
        print(table(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
