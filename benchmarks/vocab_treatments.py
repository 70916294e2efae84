"""Treatments of a tied token table (SmolLM2-135M), by function: KL to the fine-tune, every other matrix fixed.

A default package of the fine-tune gives every matrix but the token table; the table's delta ``dE (V, d)`` is then
replaced by each treatment's approximation and the model scored against the fine-tune on two sets of generic
text: the evaluation's built-in texts (608 tokens with SmolLM2's tokenizer, what ``package_size_smollm2.py``
scores) and the second half of ``benchmarks/data/calib_everyday.txt`` (lines joined 20 at a time, about 8k
tokens). Statistics that need text (token counts, the head's input moment) come from ``--stats-text``
(default ``benchmarks/data/calib_sre.txt``: text of another kind than both scored sets), except ``rows:everyday``,
counted on the first half of calib_everyday (the scored half's twin: an optimistic row).

Treatments (``NAME[@BITS]``, BITS the table's budget per entry, default 1):

- ``whole``: dE in fp16 (``--exclude embed_tokens``); ``plain``: the mixed method as the default package has it;
- ``input-only`` / ``head-only``: the plain approximation in one role of the tied table, dE exact in the other;
- ``rank:R``: dE's truncated SVD at rank R, unquantized (what rank alone costs);
- ``rows:prior:C``: rows weighted by a token-id prior (BPE ids come roughly in frequency order),
  ``f_v = 1 / (v + C)``; ``rows:sre`` / ``rows:everyday``: by token counts + 1 (the SVD of diag(sqrt f) dE
  chooses the vectors, U S is the plain delta's on them: :class:`deltacomp.calib.context.MatrixContext`);
  ``rows-h:SRC``: those row weights and ``head-h`` together;
- ``head-h``: GPTQ and allocation under the head's input moment H = E[h h^T] (the fine-tune's final hidden
  states on the stats text); ``norm-h``: H = diag(g^2), g the final norm's weight (no text);
  ``emb-h``: H = E^T diag(f) E / sum f (the fine-tune's embeddings as stand-ins for hidden states, prior f);
- ``flat:B``: every vector at B bits (``--allocation schedule --schedule B``): rank bought with bits.

    python benchmarks/vocab_treatments.py --base BASE --tuned FT --package DEFAULT_PACKAGE_OF_FT \\
        --treatments whole,plain,rows:prior:1000,head-h@1.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deltacomp.calib.context import MatrixContext
from deltacomp.config import CompressConfig
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.lowrank.svd import svd
from deltacomp.methods.base import method_for
from deltacomp.package.reader import iter_weights
from deltacomp.package.store import DeltaPackage
from deltacomp.quality import causal
from deltacomp.quality.texts import DEFAULT_TEXTS
from deltacomp.quality.weights import WeightSlots, load_model
from deltacomp.report import format_table

DATA = Path(__file__).parent / "data"
TABLE = "model.embed_tokens.weight"


def _lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


def token_counts(tok, texts: list[str], vocab: int) -> torch.Tensor:
    """How often each token id occurs in ``texts``: (vocab,) float32."""
    ids = [i for row in tok(texts)["input_ids"] for i in row]
    return torch.bincount(torch.tensor(ids), minlength=vocab)[:vocab].float()


def head_moment(model, tok, texts: list[str]) -> torch.Tensor:
    """E[h h^T] (d, d) of the output head's inputs over ``texts`` (20 lines a forward pass)."""
    total, count = None, 0

    def hook(_module, inputs):
        nonlocal total, count
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, d)
        total = x.T @ x if total is None else total + x.T @ x
        count += x.shape[0]

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    with torch.no_grad():
        for i in range(0, len(texts), 20):
            model(**tok(" ".join(texts[i:i + 20]), return_tensors="pt"))
    handle.remove()
    return total / count


class Treatments:
    """The approximations of ``delta (V, d)``: (input role, head role) per treatment name."""

    def __init__(self, delta, table, norm_weight, h, counts):
        self.delta, self.table, self.g, self.h, self.counts = delta, table, norm_weight, h, counts
        self.method = method_for(CompressConfig())

    def mixed(self, bits: float, context: MatrixContext | None = None, **options) -> torch.Tensor:
        config = self.method.resolve(CompressConfig(bits=bits, **options))
        c = self.method.compress(self.delta, config, context)
        return self.method.reconstruct(c.tensors, c.info, tuple(self.delta.shape))

    def prior(self, c: float) -> torch.Tensor:
        return 1.0 / (torch.arange(self.delta.shape[0]).float() + c)

    def __call__(self, name: str, bits: float) -> tuple[torch.Tensor, torch.Tensor]:
        kind, _, arg = name.partition(":")
        if kind == "whole":
            both = self.delta.half().float()
        elif kind in ("input-only", "head-only"):
            approx = self.mixed(bits)
            return (approx, self.delta) if kind == "input-only" else (self.delta, approx)
        elif kind == "rank":
            u, s, v = svd(self.delta, int(arg), "cpu", "full")
            both = (u * s) @ v.T
        elif kind in ("rows", "rows-h"):
            f = self.prior(float(arg.split(":")[1])) if arg.startswith("prior") else self.counts[arg] + 1
            h = self.h if kind == "rows-h" else None
            both = self.mixed(bits, MatrixContext(row_weight=f.sqrt(), hessian=h))
        elif kind in ("head-h", "norm-h", "emb-h"):
            f = self.prior(1000.0) ** 2
            h = {"head-h": lambda: self.h, "norm-h": lambda: torch.diag(self.g ** 2),
                 "emb-h": lambda: (self.table * (f / f.sum())[:, None]).T @ self.table}[kind]()
            both = self.mixed(bits, MatrixContext(hessian=h))
        elif kind == "flat":
            both = self.mixed(bits, allocation="schedule", schedule=((int(arg), None),))
        elif kind == "plain":
            both = self.mixed(bits)
        else:
            raise SystemExit(f"unknown treatment {name!r}")
        return both, both


def measure(base: Path, tuned: Path, package: Path, names: list[str], stats_text: Path) -> list[dict]:
    base_ck, ft = Checkpoint(base), Checkpoint(tuned)
    tok, model = load_model(base_ck, "causal", tuned)
    everyday = _lines(DATA / "calib_everyday.txt")
    half = len(everyday) // 2
    scored = {"built-in": causal.make_batches(tok, DEFAULT_TEXTS),
              "everyday 2nd half": causal.make_batches(tok, [" ".join(everyday[i:i + 20])
                                                             for i in range(half, len(everyday), 20)])}
    slots = WeightSlots(model)
    slots.load(ft.items())
    stats = _lines(stats_text)
    h = head_moment(model, tok, stats[:600])
    refs = {k: causal.score_reference(model, b) for k, b in scored.items()}
    slots.load(iter_weights(DeltaPackage(package), base_ck))
    b0, table = base_ck.read(TABLE).float(), ft.read(TABLE).float()
    vocab = table.shape[0]
    counts = {"sre": token_counts(tok, stats, vocab), "everyday": token_counts(tok, everyday[:half], vocab)}
    treat = Treatments(table - b0, table, ft.read("model.norm.weight").float(), h, counts)
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())  # untied
    rows = []
    for spec in names:
        name, _, bits = spec.partition("@")
        t0 = time.perf_counter()
        a_in, a_head = treat(name, float(bits or 1.0))
        secs = time.perf_counter() - t0
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(b0 + a_in)
            model.lm_head.weight.copy_(b0 + a_head)
        row = {"tuned": tuned.name, "treatment": spec, "seconds": secs}
        for k, batches in scored.items():
            r = causal.score(model, batches, refs[k])
            row[k] = r["kl"]
            row[k + " tokens"] = r["tokens"]
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    whole = {r["tuned"]: r for r in rows if r["treatment"] == "whole"}
    sets = ("built-in", "everyday 2nd half")
    table = []
    for r in rows:
        w = whole.get(r["tuned"])
        cells = [f"{r[k]:.3g} ({r[k] / w[k]:.2f}x)" if w else f"{r[k]:.3g}" for k in sets]
        table.append([r["tuned"], r["treatment"], *cells, f"{r['seconds']:.1f}"])
    head = ", ".join(f"{k}: {rows[0][k + ' tokens']} tokens" for k in sets) if rows else ""
    return head + "\n" + format_table(["fine-tune", "token table", "KL built-in (vs whole)",
                                       "KL everyday (vs whole)", "table s"], table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="Base model folder.")
    ap.add_argument("--tuned", required=True, help="Fine-tune folder.")
    ap.add_argument("--package", required=True, help="The fine-tune's default package (the other matrices).")
    ap.add_argument("--treatments", default="whole,plain", help="Comma-separated NAME[@BITS] (module docstring).")
    ap.add_argument("--stats-text", default=str(DATA / "calib_sre.txt"), help="Text for counts and H.")
    ap.add_argument("--out", default=None, help="Write the rows as JSON here.")
    args = ap.parse_args()
    rows = measure(Path(args.base), Path(args.tuned), Path(args.package), args.treatments.split(","),
                   Path(args.stats_text))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print(render(rows))


if __name__ == "__main__":
    main()
