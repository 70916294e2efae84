"""The quality suite's results: the reference ratio, the merge of results made apart, and the tables.

A result of one pair at one budget is :func:`deltacomp.evaluate.evaluate_packages`'s: its rows (base, fine-tune,
one per setting) carry the answer-token scores under ``answer`` and the task's ``exact_match``.
"""

from __future__ import annotations

import math

from deltacomp.report import format_table

REFERENCE = "reference"  # the label of the plain reference's row, which the others are divided by


def versus_reference(result: dict) -> None:
    """Each package row's answer KL as a ratio to the reference row's (None where there is no reference row)."""
    rows = {r["model"]: r for r in result["rows"]}
    ref = rows.get(REFERENCE, {}).get("answer", {}).get("kl")
    for r in result["rows"]:
        if "method" in r:
            r["answer"]["vs_reference"] = r["answer"]["kl"] / ref if ref else None


def _f(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if isinstance(x, float) and math.isinf(x) else format(x, spec)


def merge(parts: list[dict]) -> dict:
    """Results of several calls or processes (budgets, pairs or settings split among them) as one: a pair's rows
    at one budget from several parts are joined (the first part's row of a model kept), in the settings' order."""
    first = parts[0]["settings"]
    order = ["base", "fine-tuned", *first.get("order", first["compared"])]

    def rank(label: str) -> int:
        return order.index(label) if label in order else len(order)

    compared = {k: v for p in parts for k, v in p["settings"]["compared"].items()}
    out = {"settings": dict(parts[0]["settings"], compared=dict(sorted(compared.items(), key=lambda kv: rank(kv[0])))),
           "pairs": {}, "budgets": {}, "seconds": 0.0}
    for p in parts:
        out["pairs"].update(p["pairs"])
        out["seconds"] += p.get("seconds", 0.0)
        for bits, by_pair in p["budgets"].items():
            here = out["budgets"].setdefault(bits, {})
            for name, result in by_pair.items():
                if name not in here:
                    here[name] = result
                    continue
                have = {r["model"] for r in here[name]["rows"]}
                rows = here[name]["rows"] + [r for r in result["rows"] if r["model"] not in have]
                here[name]["rows"] = sorted(rows, key=lambda r: rank(r["model"]))
                here[name]["skipped"].update(result.get("skipped", {}))
                versus_reference(here[name])
    return out


def pair_table(name: str, info: dict, result: dict) -> str:
    rows = {r["model"]: r for r in result["rows"]}
    ft, base = rows["fine-tuned"], rows["base"]
    t = info["train"]
    head = (f"{name} ({info['kind']}): fine-tune {t['steps']} steps x {t['batch']}, loss {t['first_loss']:.3f} -> "
            f"{t['last_loss']:.4f}; exact match fine-tune {ft['exact_match']:.3f}, base {base['exact_match']:.3f}; "
            f"{info['heldout']} held-out examples, {ft['answer']['tokens']:,} answer tokens; "
            f"{result['scored']['count']:,} generic tokens")
    headers = ["model", "bits/entry", "all-in", "rel.err", "answer KL", "KL / ref", "answer top-1", "exact match",
               "generic ppl", "generic KL", "compress s"]
    table = []
    for r in result["rows"]:
        a = r["answer"]
        table.append([r["model"], _f(r.get("factor_bits_per_entry"), ".3f"), _f(r.get("all_in_bits_per_entry"), ".3f"),
                      _f(r.get("error", {}).get("global"), ".3f"), _f(a["kl"], ".3g"), _f(a.get("vs_reference"), ".2f"),
                      _f(a["top1"], ".4f"), _f(r["exact_match"], ".3f"), _f(r["ppl"], ".3f"), _f(r["kl"], ".3g"),
                      _f(r.get("compress_seconds"), ".1f")])
    lines = [head, format_table(headers, table)]
    lines += [f"{label}: skipped ({why})" for label, why in result.get("skipped", {}).items()]
    return "\n".join(lines)


def summary_table(by_pair: dict) -> str:
    """Settings x pairs: answer KL as a ratio to the reference, and exact match kept (model / fine-tune)."""
    names = list(by_pair)
    labels = list(dict.fromkeys(r["model"] for res in by_pair.values() for r in res["rows"]
                                if r["model"] not in ("base", "fine-tuned")))
    headers = ["setting", *[f"{n} KL/ref" for n in names], "geo-mean KL/ref", "worst KL/ref",
               *[f"{n} EM kept" for n in names]]
    table = []
    for label in labels:
        ratios, kept = [], []
        for n in names:
            rows = {r["model"]: r for r in by_pair[n]["rows"]}
            r, ft = rows.get(label), rows["fine-tuned"]
            ratios.append(r["answer"].get("vs_reference") if r else None)
            kept.append(r["exact_match"] / ft["exact_match"] if r and ft["exact_match"] else None)
        have = [x for x in ratios if x]
        geo = math.exp(sum(math.log(x) for x in have) / len(have)) if have else None
        table.append([label, *[_f(x, ".2f") for x in ratios], _f(geo, ".2f"), _f(max(have) if have else None, ".2f"),
                      *[_f(x, ".3f") for x in kept]])
    return format_table(headers, table)


def render(results: dict) -> str:
    s = results["settings"]
    out = [f"quality suite ({'smoke, tiny random Llama' if s['smoke'] else 'SmolLM2-135M-Instruct'}; device "
           f"{s['device']}; fine-tunes: batch {s['batch']}, lr {s['lr']:g}); KL in nats per token"]
    for bits, by_pair in results["budgets"].items():
        title = "the fine-tunes alone" if bits == "none" else f"{bits} bit{'s' * (bits != '1')} per entry"
        out += ["", f"== {title} ==", ""]
        for name, result in by_pair.items():
            out += [pair_table(name, results["pairs"][name], result), ""]
        if bits != "none":
            out += [f"summary at {title} (KL/ref: answer KL over the plain reference's; EM kept: exact "
                    f"match over the fine-tune's)", summary_table(by_pair)]
    out += ["", f"total {results['seconds']:.0f} s"]
    return "\n".join(out)
