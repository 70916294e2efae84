"""``deltacomp eval``: how close a package's rebuilt model is to the fine-tune, next to the baselines.

The pipeline: the baselines (the plain reference first, see :mod:`deltacomp.methods.reference`) are compressed at
the package's budget and settings into a temporary folder; the
per-module relative errors of every package are streamed (one tensor pair at a time); then one model is loaded
from the base and its weights swapped in place for the fine-tune (the reference), the base, and each package's
rebuilt fine-tune (:mod:`deltacomp.quality.weights`), scoring each on the same data. On CUDA a ``mixed`` package
is not rebuilt: the model keeps the base weights of its compressed layers and their deltas run from the packed
factors through the dequant-matmul op (:mod:`deltacomp.kernels`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deltacomp.calib.generic import calib_path
from deltacomp.compress import compress
from deltacomp.config import CompressConfig, check_device
from deltacomp.errors import BudgetError, DeltacompError
from deltacomp.io.checkpoint import Checkpoint
from deltacomp.io.output import scratch_dir
from deltacomp.kernels import attach, detach
from deltacomp.methods.base import get_method
from deltacomp.package.reader import check_base, compressed_names, iter_weights
from deltacomp.package.store import DeltaPackage
from deltacomp.quality import causal
from deltacomp.quality.encoder import mean_pool
from deltacomp.quality.modules import module_errors, summarise
from deltacomp.quality.texts import DEFAULT_TEXTS, EVAL_SENTENCES, read_texts
from deltacomp.quality.weights import WeightSlots, load_model, model_kind, tokenizer_source
from deltacomp.quant.packed import group_widths

log = logging.getLogger(__name__)

DEFAULT_COMPARE = ("lowrank", "bitdelta", "mixed")
REFERENCE = "reference"  # the plain reference method: every report has its row, and each package's ratio to it
CURVE_BUDGETS = (0.25, 0.5, 1.0, 2.0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EvalConfig:
    compare: tuple[str, ...] = DEFAULT_COMPARE  # baselines compressed at the package's budget
    reference: bool = True  # also the plain reference at the package's budget (first, whatever ``compare`` says)
    data: str | None = None  # data file; None = ``texts``, else the built-in texts (causal) or sentences (encoder)
    texts: tuple[str, ...] | None = None  # samples given directly (library use)
    max_samples: int | None = None
    max_length: int = 256  # tokens per causal sample
    batch_size: int = 8
    top_k: int = causal.DEFAULT_TOP_K  # reference tokens kept per position for the KL
    device: str = "cpu"
    dtype: str = "float32"  # of the evaluated model
    plot_budgets: tuple[float, ...] = ()  # compress at these budgets for the error-against-budget curve
    spectra: int = 0  # singular-value spectra (and bits per vector) of this many modules
    tokenizer: str | None = None  # folder of the tokenizer; None = the base's, else the fine-tune's
    module_errors: bool = True  # stream the per-module relative errors of every package
    packed: bool = True  # on CUDA, run mixed packages from their packed factors; False: every package rebuilt

    def __post_init__(self):
        for m in self.compare:
            get_method(m)
        if self.dtype not in DTYPES:
            raise DeltacompError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)
        if self.max_samples is not None and self.max_samples < 1:
            raise DeltacompError(f"--max-samples must be positive, got {self.max_samples}")
        for key, value in (("--max-length", self.max_length), ("--batch-size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeltacompError(f"{key} must be a positive integer, got {value!r}")


def _package_row(label: str, pkg: DeltaPackage, base: Checkpoint, ft: Checkpoint, seconds: float | None,
                 errors: bool = True) -> dict:
    m = pkg.manifest
    errs = list(module_errors(pkg, base, ft)) if errors else []
    row = {
        "model": label,
        "method": m["method"],
        "bits": m["budget"]["bits_per_entry"],
        "factor_bits_per_entry": m["budget"]["achieved_factor_bits_per_entry"],
        "all_in_bits_per_entry": m["budget"]["achieved_all_in_bits_per_entry"],
        "package_bytes": m["totals"]["package_tensor_bytes"],
        "compressed_bytes": m["totals"]["compressed_bytes"],
        "compress_seconds": seconds,
    }
    if errors:
        row["error"] = summarise(errs)
        row["modules"] = [{"name": e.name, "shape": list(e.shape), "rank": e.rank, "bits": e.bits,
                           "relative_error": e.relative} for e in errs]
    return row


def baseline_config(pkg: DeltaPackage, method: str, bits: float | None = None, device: str = "cpu") -> CompressConfig:
    """The package's own settings with another method (and budget): a like-for-like baseline.

    Calibration and optimal allocation stay for ``mixed`` (while the calibration file is still there) and are
    reset for the methods that do not take them.
    """
    settings = CompressConfig.from_dict(pkg.manifest["settings"])
    kw = {"method": method, "device": device}
    if bits is not None:
        kw["bits"] = bits
    calib = getattr(settings, "calib", None)
    neutral = get_method(method).neutral_settings()  # what the method does not read
    kw.update(neutral)
    if "calib" not in neutral and calib and not Path(calib_path(calib)).is_file():
        log.warning("the package's calibration file %s is gone; the %s baseline is uncalibrated", calib, method)
        kw["calib"] = None
    return dataclasses.replace(settings, **kw)


def package_label(manifest: dict) -> str:
    """The method and the settings that set it apart: ``mixed calib optimal``."""
    settings = manifest.get("settings", {})
    parts = [manifest["method"]]
    if settings.get("calib"):
        parts.append("calib")
    if settings.get("allocation", "schedule") != "schedule":
        parts.append(settings["allocation"])
    if settings.get("budget_scope", "matrix") != "matrix":
        parts.append(f"{settings['budget_scope']}-scope")
    return " ".join(parts)


def _compress_baselines(pkg, base, ft, methods, workdir: Path, device: str) -> tuple[list, dict]:
    made, skipped = [], {}
    for method in methods:
        if method == pkg.manifest["method"]:
            continue
        out = workdir / method
        try:
            config = baseline_config(pkg, method, device=device)
            t0 = time.perf_counter()
            compress(base.path, ft.path, out, config, progress=False)
            made.append((method, DeltaPackage(out, verify=False), time.perf_counter() - t0))
        except BudgetError as e:
            skipped[method] = str(e)
            log.info("%s skipped: %s", method, e)
    return made, skipped


def _texts(kind: str, config: EvalConfig) -> tuple[list[str], str]:
    if config.data:
        texts = read_texts(config.data, config.max_samples)
        return texts, f"{config.data} ({len(texts)} samples)"
    if config.texts:
        texts = list(config.texts)[: config.max_samples]
        return texts, f"given texts ({len(texts)} samples)"
    texts = list(DEFAULT_TEXTS if kind == "causal" else EVAL_SENTENCES)[: config.max_samples]
    return texts, f"built-in {'texts' if kind == 'causal' else 'sentences'} ({len(texts)} samples)"


class _Scorer:
    """Scores the model currently in memory against the reference (the fine-tune)."""

    def __init__(self, kind: str, tok, model, texts: list[str], config: EvalConfig):
        self.kind, self.tok, self.model, self.config = kind, tok, model, config
        self.texts = texts
        if kind == "causal":
            self.batches = causal.make_batches(tok, texts, config.max_length, config.batch_size)
            if not self.batches:
                raise DeltacompError("the evaluation data has no text to score (every sample is under two tokens)")

    def _embed(self) -> torch.Tensor:
        chunks = []
        for i in range(0, len(self.texts), self.config.batch_size):
            batch = self.tok(self.texts[i:i + self.config.batch_size], padding=True, truncation=True,
                             max_length=self.config.max_length, return_tensors="pt").to(self.config.device)
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state.float()  # (B, T, d)
            chunks.append(mean_pool(hidden, batch["attention_mask"]).cpu())
        return torch.cat(chunks)  # (N, d)

    def reference(self) -> dict:
        if self.kind == "causal":
            self.ref = causal.score_reference(self.model, self.batches, self.config.top_k, self.config.device)
            return dict(self.ref.metrics)
        self.ref = self._embed()
        return {"cos_mean": 1.0, "cos_min": 1.0, "samples": len(self.texts)}

    def score(self) -> dict:
        if self.kind == "causal":
            return causal.score(self.model, self.batches, self.ref, self.config.device)
        cos = (self._embed() * self.ref).sum(-1)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "samples": len(self.texts)}


def baseline_methods(config: EvalConfig) -> tuple[str, ...]:
    """The methods compressed beside the package: the plain reference first (unless switched off), then
    ``compare``, each once."""
    first = (REFERENCE,) if config.reference else ()
    return tuple(dict.fromkeys((*first, *config.compare)))


def evaluate(package: str | os.PathLike, base_src: str | os.PathLike, ft_src: str | os.PathLike,
             config: EvalConfig = EvalConfig()) -> dict:
    """The quality report of ``package``: one row per model (base, fine-tune, package, baselines), each package
    row with its ratio to the plain reference's row (:func:`versus`)."""
    pkg = DeltaPackage(package)
    base, ft = Checkpoint(base_src), Checkpoint(ft_src)
    check_base(pkg, base)
    methods = baseline_methods(config)
    with scratch_dir("eval") as tmp:
        log.info("compressing the baselines: %s", ", ".join(methods) or "none")
        baselines, skipped = _compress_baselines(pkg, base, ft, methods, Path(tmp), config.device)
        own = f"{package_label(pkg.manifest)} (package)"
        packages = [(own, pkg, None)]
        packages += [(method, p, s) for method, p, s in baselines]
        result = evaluate_packages(packages, base, ft, config)
        result["package"], result["skipped"] = str(pkg.path), skipped
        versus(result, (own if pkg.manifest["method"] == REFERENCE else REFERENCE) if config.reference else None)
        if config.plot_budgets:
            result["curve"] = error_curve(pkg, base, ft, config, Path(tmp) / "curve")
    if config.spectra:
        result["spectra"] = spectra(pkg, base, ft, config.spectra)
    return result


def evaluate_packages(packages: list[tuple[str, DeltaPackage, float | None]], base: Checkpoint, ft: Checkpoint,
                      config: EvalConfig = EvalConfig(), probes: dict | None = None) -> dict:
    """Rows for the base, the fine-tune and each (label, package, compress seconds) on the same data.

    ``probes`` maps a name to ``fn(tok, model) -> dict``, run on every model with its weights in place (a task
    metric such as exact match); its results join the row under that name. A probe measured against the fine-tune
    (:class:`deltacomp.quality.causal.BatchScorer`) has ``reference(tok, model)``, called on the fine-tune before
    any other model, and ``score(tok, model)``, called on each other model.
    """
    for _, p, _ in packages:
        check_base(p, base)
    kind = model_kind(base.config)
    texts, data_label = _texts(kind, config)
    tokenizer = tokenizer_source(config.tokenizer) if config.tokenizer else tokenizer_source(base.path, ft.path)
    rows = []
    for label, p, seconds in packages:
        log.info("per-module errors of %s", label)
        rows.append(_package_row(label, p, base, ft, seconds, config.module_errors))

    log.info("loading the model (%s) from %s", kind, base.path)
    tok, model = load_model(base, kind, tokenizer, config.device, DTYPES[config.dtype])
    slots = WeightSlots(model)
    scorer = _Scorer(kind, tok, model, texts, config)

    def probe(reference: bool = False) -> dict:
        out = {}
        for name, fn in (probes or {}).items():
            if hasattr(fn, "reference"):
                out[name] = fn.reference(tok, model) if reference else fn.score(tok, model)
            else:
                out[name] = fn(tok, model)
        return out

    slots.load(ft.items())
    reference = {"model": "fine-tuned", **scorer.reference(), **probe(reference=True)}
    slots.load(base.items())
    out_rows = [{"model": "base", **scorer.score(), **probe()}, reference]
    for row, (label, p, _) in zip(rows, packages):
        required = set(compressed_names(p))
        packed = (config.packed and config.device.startswith("cuda")
                  and all(p.modules[n]["method"] == "mixed" for n in required))
        log.info("scoring %s (%s)", label, "base weights + packed deltas" if packed else "rebuilt weights")
        slots.load(iter_weights(p, base, rebuild=not packed), required)
        if packed:
            attach(model, [p], stored_from=None)
        try:
            row.update(scorer.score())
            row.update(probe())
        finally:
            detach(model)
        row["path"] = "packed" if packed else "dense"
        out_rows.append(row)
    unit = "tokens" if kind == "causal" else "sentences"
    scored = {"unit": unit, "count": reference["tokens" if kind == "causal" else "samples"]}
    return {"kind": kind, "data": data_label, "scored": scored, "rows": out_rows, "skipped": {}}


def gap(row: dict) -> float | None:
    """How far a row is from the fine-tune by its kind's main measure: KL(fine-tune || model) for a causal LM, one
    minus the mean cosine for an encoder."""
    if "kl" in row:
        return row["kl"]
    return 1.0 - row["cos_mean"] if "cos_mean" in row else None


def versus(result: dict, label: str | None) -> None:
    """Set ``result["reference"]`` to ``label`` and each package row's ``vs_reference``: its :func:`gap` over the
    row ``label``'s (None where either is missing, as when the reference was not made, or the reference's is 0)."""
    rows = {r["model"]: r for r in result["rows"]}
    ref = gap(rows[label]) if label in rows else None
    result["reference"] = label if label in rows else None
    for r in result["rows"]:
        if "method" in r:  # a package row
            g = gap(r)
            r["vs_reference"] = g / ref if g is not None and ref else None


def error_curve(pkg: DeltaPackage, base: Checkpoint, ft: Checkpoint, config: EvalConfig, workdir: Path) -> dict:
    """{method: [(bits per entry, global relative error), ...]} for the package's method and the baselines."""
    methods = [pkg.manifest["method"], *[m for m in config.compare if m != pkg.manifest["method"]]]
    curve: dict[str, list] = {}
    for method in methods:
        for bits in config.plot_budgets:
            out = workdir / f"{method}-{bits:g}"
            try:
                compress(base.path, ft.path, out, baseline_config(pkg, method, bits, config.device), progress=False)
            except BudgetError:
                continue
            err = summarise(list(module_errors(DeltaPackage(out, verify=False), base, ft)))["global"]
            curve.setdefault(method, []).append((bits, err))
    return curve


def vector_bits(info: dict, shape: tuple[int, int] | None = None) -> list[float]:
    """Bits per entry of each kept singular vector pair, in singular-value order (fp16 = 16 for low-rank
    factors). A pair with U at b_u and V at b_v bits counts ``(b_u m + b_v n) / (m + n)`` (the mean without
    ``shape``)."""
    if isinstance(info.get("vector_bits"), list):
        return [int(b) for b in info["vector_bits"]]
    if info.get("groups"):
        m, n = shape or (1, 1)
        out = []
        for (bu, bv), g in zip(group_widths(info), info["groups"]):
            out += [bu if bu == bv else (bu * m + bv * n) / (m + n)] * g["rank"]
        return out
    if info.get("rank"):
        return [16] * int(info["rank"])
    return []


def pick_modules(pkg: DeltaPackage, count: int) -> list[str]:
    """Up to ``count`` compressed modules of different kinds (q_proj, down_proj, ...) from layers spread over
    the model: kind i of the ``count`` chosen takes its instance at fraction i / (count - 1) of the depth."""
    names = [n for n, r in pkg.modules.items() if r["action"] == "compress"]
    kinds: dict[str, list[str]] = {}
    for n in names:
        kinds.setdefault(re.sub(r"\.\d+\.", ".#.", n), []).append(n)
    keys = list(kinds)
    if len(keys) > count:
        keys = [keys[round(i * (len(keys) - 1) / max(count - 1, 1))] for i in range(count)]
    picked = []
    for i, key in enumerate(keys):
        same = kinds[key]
        picked.append(same[round(i * (len(same) - 1) / max(len(keys) - 1, 1))])
    for n in names:  # fewer kinds than asked: fill with other layers
        if len(picked) >= count:
            break
        if n not in picked:
            picked.append(n)
    return picked


def spectra(pkg: DeltaPackage, base: Checkpoint, ft: Checkpoint, count: int) -> dict:
    """{module: {"singular_values": [...], "vector_bits": [...]}} for a few modules spread over the model."""
    out = {}
    for name in pick_modules(pkg, count):
        delta = ft.read(name).float() - base.read(name).float()  # (m, n)
        s = torch.linalg.svdvals(delta)
        rec = pkg.modules[name]
        bits = vector_bits(rec.get("info", {}), tuple(rec["shape"]))
        out[name] = {"singular_values": s.tolist(), "vector_bits": bits}
    return out
