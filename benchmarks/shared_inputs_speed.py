"""Decode steps with sibling layers sharing one call of the op (q|k|v, gate|up) against each layer alone.

A random Llama of SmolLM2-135M's shapes (30 layers, hidden 576, MLP 1536, 9 heads over 3 KV heads) and a random
fine-tune of it (every linear layer of the blocks moved by a delta of decaying spectrum, 1% of the weight's norm),
compressed by ``deltacomp compress`` at ``--bits`` per entry with the fixed schedule. The package is attached once
(one delta) and four times (a bank of four, weighted 1/4 each), with ``share_inputs`` on and off. Each row: decode
tokens/s of one step with a static KV cache, captured in a CUDA graph and replayed (``fusion_smollm2.step_rate``;
eager on the CPU), best of ``--repeats``; in brackets the time per token over the base alone's in the same run.

    GPU:   PYTHONPATH=.:benchmarks python benchmarks/shared_inputs_speed.py --device cuda --json r.json
    smoke: PYTHONPATH=.:benchmarks python benchmarks/shared_inputs_speed.py --smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from decoder_finetune import add_decaying_deltas
from fusion_smollm2 import step_rate

from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.kernels import attach
from deltacomp.report import format_table

log = logging.getLogger("shared_inputs_speed")
SHAPES = {"smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3),
          "smoke": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)}


def make_pair(work: Path, shape: dict, device: str = "cpu", seed: int = 0) -> tuple[Path, Path]:
    """A random base and a fine-tune whose every linear layer of the blocks moved by a decaying-spectrum delta
    (:func:`decoder_finetune.add_decaying_deltas`, products on ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=512, tie_word_embeddings=True))
    model.save_pretrained(work / "base")
    add_decaying_deltas(model, device=device)
    model.save_pretrained(work / "finetuned")
    return work / "base", work / "finetuned"


def rates(base: Path, pkg: Path, args) -> dict:
    from transformers import LlamaForCausalLM

    configs = {"base only": None}
    for k in (1, 4):
        for share in (True, False):
            configs[f"{k} delta{'s' if k > 1 else ''}, {'siblings shared' if share else 'each layer alone'}"] = \
                (k, share)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    out = {}
    for name, spec in configs.items():
        model = LlamaForCausalLM.from_pretrained(base, dtype=dtype).to(args.device).eval()
        if spec is not None:
            k, share = spec
            attach(model, [pkg] * k, weights=torch.full((k,), 1.0 / k), stored_from=None, dense_from=None,
                   share_inputs=share)
        out[name] = {f"batch {b}": step_rate(None, model, list(range(1, 9)), b, args.new_tokens, args.device,
                                             args.repeats) for b in args.batches}
        log.info("%s: %s", name, out[name])
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def render(res: dict) -> str:
    speed = res["speed"]
    cols = list(speed["base only"])
    base = speed["base only"]
    rows = [[name, *[f"{v[c]:.1f} ({base[c] / v[c]:.2f}x)" for c in cols]] for name, v in speed.items()]
    return (f"decode step (graph) tokens/s, {res['settings']['new_tokens']} steps, device {res['settings']['device']}"
            f"; in brackets: time per token over the base's\n" + format_table(["configuration", *cols], rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="A tiny model on the CPU (seconds).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=float, default=2.0, help="Bits per entry of the package (default 2).")
    ap.add_argument("--batches", default="1,16", help="Token rows a step (default 1,16).")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", help="Folder for the pair and the package (default: a temporary one).")
    ap.add_argument("--json", help="Write the results here.")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        args.batches, args.new_tokens, args.repeats = [1, 2], 4, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        base, ft = make_pair(work, SHAPES["smoke" if args.smoke else "smollm2"], args.device)
        pkg = work / "pkg"
        compress(base, ft, pkg, CompressConfig(bits=args.bits, allocation="schedule", calib=None,
                                               device=args.device), progress=False, overwrite=True)
        log.info("pair and package in %.1f s", time.perf_counter() - t0)
        res = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "speed": rates(base, pkg, args)}
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
