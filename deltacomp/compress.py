"""The compression pipeline: base + fine-tuned checkpoint -> delta package, one tensor pair at a time."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltacomp import __version__
from deltacomp.calib.context import MatrixContext
from deltacomp.config import DEFAULT_INCLUDE, CompressConfig, check_device
from deltacomp.errors import CheckpointError, DeltacompError
from deltacomp.extract import Entry, check_compatible, plan, stream
from deltacomp.io.checkpoint import SIDE_FILES, Checkpoint
from deltacomp.io.output import atomic_dir, check_output, mark
from deltacomp.io.paths import hub_cache_root, inside
from deltacomp.io.prefetch import prefetch
from deltacomp.io.safetensors_file import DTYPE_NAMES
from deltacomp.io.sharded_writer import ShardedWriter
from deltacomp.methods.base import get_method
from deltacomp.package.card import render_card
from deltacomp.package.fingerprint import FullFingerprint, fingerprint
from deltacomp.package.manifest import (
    BYTE_KINDS,
    FORMAT,
    FORMAT_VERSION,
    FP16_DELTA,
    MANIFEST,
    MODEL_DIR,
    tensor_key,
    write_manifest,
)
from deltacomp.package.store import sha256_file
from deltacomp.rows import is_vocab_matrix, select_rows

log = logging.getLogger(__name__)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config and tokenizer files of a model folder; return their relative paths."""
    copied = []
    root = hub_cache_root(src) or src
    for rel in SIDE_FILES:
        f = inside(src, rel, f"{src}: {rel}", CheckpointError, root) if (src / rel).exists() else src / rel
        if f.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / rel)
            copied.append(rel)
    return copied


def _source_info(ckpt: Checkpoint) -> dict:
    """How a manifest names a checkpoint without local paths: its Hub id and revision when it came from the Hub
    (given as an id, or a folder of the Hub cache), else its folder's name."""
    from deltacomp.io.hub import looks_like_repo_id, snapshot_repo, split_revision

    if not Path(ckpt.source).exists() and looks_like_repo_id(ckpt.source):
        repo_id, revision = split_revision(ckpt.source)
        return {"source": ckpt.source, "architecture": ckpt.architecture, "repo_id": repo_id, "revision": revision}
    info = {"source": Path(ckpt.path).resolve().name, "architecture": ckpt.architecture}
    cached = snapshot_repo(ckpt.path)
    if cached is not None:
        info["repo_id"], info["revision"] = cached
    return info


def compress(base_src: str | os.PathLike, ft_src: str | os.PathLike, out: str | os.PathLike,
             config: CompressConfig, overwrite: bool = False, progress: bool | None = None,
             context_for: Callable[[Entry], MatrixContext | None] | None = None) -> dict:
    """Write the delta package of ``ft_src`` over ``base_src`` to ``out``; return its manifest.

    Everything is checked before the first byte is written (inputs, budget against every matrix, the
    output path); the package is built in a hidden folder and renamed into place when complete.
    ``context_for(entry)`` may supply per-module data to the method (calibration statistics).
    """
    base, ft = Checkpoint(base_src), Checkpoint(ft_src)
    check_compatible(base, ft)
    entries = plan(base, ft, config)
    if config.include != DEFAULT_INCLUDE and not any(e.action == "compress" for e in entries):
        raise DeltacompError(f"--include {' '.join(config.include)} matches no 2-D float weight of {ft.source} "
                             f"(after --exclude); nothing would be compressed")
    method = get_method(config.method)
    for e in entries:
        if e.action == "compress":
            method.check_budget(e.shape, config)
    inputs = (base.path, ft.path)
    check_output(out, overwrite, "package", inputs)
    check_device(config.device)
    contexts = None
    if context_for is None:  # calibration / model-scope allocation (deltacomp.calib.provider), read before writing
        from deltacomp.calib.provider import open_contexts

        contexts = open_contexts(base, ft, entries, config, method)
        if contexts is not None:
            entries, context_for = contexts.entries, contexts.context_for
    base_fp = fingerprint(base)
    full = FullFingerprint()  # fed every base tensor as it streams past

    modules: dict[str, dict] = {}
    counts = {"factor_bits": 0, "all_in_bits": 0, "entries": 0, "fp16_delta_bytes": 0}
    with atomic_dir(out, overwrite, "package", inputs) as tmp:
        writer = ShardedWriter(tmp, config.max_shard_bytes, prefix="delta")
        try:
            bar = tqdm(prefetch(stream(base, ft, entries)), total=len(entries), desc="compress", unit="tensor",
                       disable=progress is False if progress is not None else None)
            for e, b, f in bar:
                if b is not None:
                    full.add(e.name, b)
                record = _compress_one(e, b, f, method, config, writer, counts,
                                       context_for(e) if context_for and e.action == "compress" else None)
                if record is not None:
                    modules[e.name] = record
            if not modules:
                raise DeltacompError(f"{ft.source} has the same weights as {base.source}: there is no delta to "
                                     f"compress")
            names = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            if contexts is not None:
                contexts.close()
        index = tmp / "delta.safetensors.index.json"
        files = names + ([index.name] if index.exists() else [])
        side = copy_side_files(ft.path, tmp / MODEL_DIR)
        base_fp = {"fingerprint": base_fp, "full_fingerprint": full.hexdigest()}
        manifest = _manifest(base, ft, base_fp, config, modules, counts, writer.total_bytes)
        manifest["files"] = {n: sha256_file(tmp / n) for n in files}
        manifest["files"].update({f"{MODEL_DIR}/{r}": sha256_file(tmp / MODEL_DIR / r) for r in side})
        _write_all_in(tmp, manifest)
    return manifest


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write_all_in(folder: Path, manifest: dict) -> None:
    """Write the manifest and the card with the package's total bytes, every file counted (these two included):
    the totals change the two files' lengths, so repeat until the count they state is the count on disk."""
    t = manifest["totals"]
    kinds = t["bytes_by_kind"]
    mark(folder, "package")  # atomic_dir writes the same marker file at the end: count it now
    for _ in range(8):
        write_manifest(folder, manifest)
        (folder / "README.md").write_text(render_card(manifest))
        total = _folder_bytes(folder)
        if total == t["package_bytes"]:
            return
        if total < t["package_bytes"]:  # a digit fewer than last time: pad the manifest (JSON whitespace)
            with open(folder / MANIFEST, "a") as fh:
                fh.write(" " * (t["package_bytes"] - total))
            return
        t["package_bytes"] = total
        kinds["metadata"] = total - sum(v for k, v in kinds.items() if k != "metadata")
        t["ratio_vs_fp16_delta"] = round(t["fp16_delta_bytes"] / total, 4)
        t["ratio_vs_finetuned"] = round(t["finetuned_weight_bytes"] / total, 4)
    log.warning("%s: the manifest's package_bytes did not settle; it is off by a few bytes", folder)


# fp16-delta is "lossless enough" when every rebuilt entry is within this fraction of the delta's largest entry
# (fp16 rounds each entry to 2**-11 of itself; entries below fp16's normal range, 2**-14, lose more)
FP16_DELTA_TOLERANCE = 2.0**-10


def _exact_form(f: torch.Tensor, delta: torch.Tensor | None, mode: str) -> torch.Tensor:
    """What is stored for a changed, uncompressed tensor: ``f`` itself, or with ``fp16-delta`` its delta in fp16
    where that is smaller than ``f`` and rebuilds ``f`` within :data:`FP16_DELTA_TOLERANCE` of the delta's largest
    entry (measured on the real MiniLM pair: norms and biases as fp16 deltas leave the embeddings' agreement with
    the fine-tune unchanged to 5 digits); otherwise ``f``, exactly."""
    if mode != "fp16-delta" or delta is None or f.element_size() <= 2:
        return f
    half = delta.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        return f
    err = float((half.float() - delta).abs().max()) if delta.numel() else 0.0
    return half if err <= FP16_DELTA_TOLERANCE * float(delta.abs().max()) else f


def _compress_one(e: Entry, b, f, method, config, writer: ShardedWriter, counts: dict,
                  context: MatrixContext | None) -> dict | None:
    record = {"action": e.action, "shape": list(e.shape), "dtype": DTYPE_NAMES[e.dtype]}
    if e.action == "removed":
        return record
    if e.action in ("added", "resized"):
        writer.add(e.name, f)
        counts["fp16_delta_bytes"] += 2 * f.numel()
        return {**record, "bytes": _nbytes(f)}
    if f.dtype.is_floating_point:
        dev = config.device if e.action == "compress" else "cpu"  # the delta of a compressed matrix on its device
        delta = f.to(dev).float() - b.to(dev).float()
        if not bool(delta.any()):
            return None
    elif torch.equal(b, f):
        return None
    counts["fp16_delta_bytes"] += 2 * f.numel()
    if e.action == "exact":
        stored = _exact_form(f, delta if f.dtype.is_floating_point else None, config.exact)
        writer.add(e.name, stored)
        encoding = {} if stored is f else {"encoding": FP16_DELTA}
        return {**record, **encoding, "bytes": _nbytes(stored)}
    if context is not None and context.target is not None:  # e.g. the delta serving the compressed model's inputs
        delta = context.target(b, f)
    rows = None
    if is_vocab_matrix(e.name) and not (context is not None and context.plan is not None):
        rows = select_rows(delta, config.rows_energy)  # (k,) or None: the rows of the tokens that moved
    if rows is not None:  # the kept rows as a (k, n) matrix, at the whole matrix's budget (fp16 at most)
        m = delta.shape[0]
        sub_config = dataclasses.replace(config, bits=min(config.bits * m / rows.numel(), 16.0))
        c = method.compress(delta[rows.to(delta.device)], sub_config, context)
        c.tensors["rows"] = rows.to(torch.int32)
        c.total_bits += 32 * rows.numel()
    else:
        c = method.compress(delta, config, context)  # delta: (m, n) float32
    if context is not None and context.compressed is not None:  # e.g. the student stream takes the matrix
        parts = {k: t.to(delta.device) for k, t in c.tensors.items()}
        context.compressed(b, method.reconstruct(parts, c.info, tuple(delta.shape)))
    for local, t in c.tensors.items():
        writer.add(tensor_key(e.name, local), t)
    counts["factor_bits"] += c.factor_bits
    counts["all_in_bits"] += c.total_bits
    counts["entries"] += delta.numel()
    return {
        **record,
        "method": method.name,
        **({"rows": int(rows.numel())} if rows is not None else {}),
        "info": c.info,
        "factor_bytes": c.factor_bits // 8,
        "bytes": c.total_bits // 8,
        "factor_bits_per_entry": c.factor_bits / delta.numel(),
        "all_in_bits_per_entry": c.total_bits / delta.numel(),
    }


def module_kind(name: str, rec: dict) -> str:
    """Which line of the size breakdown a module's bytes go to."""
    if is_vocab_matrix(name):
        return "embeddings"
    if rec["action"] == "compress":
        return "matrices"
    return "norms_biases" if len(rec["shape"]) == 1 else "other"


def _manifest(base, ft, base_fp, config, modules, counts, tensor_bytes) -> dict:
    entries = counts["entries"]
    compressed = [m for m in modules.values() if m["action"] == "compress"]
    kinds = dict.fromkeys(BYTE_KINDS, 0)
    for name, rec in modules.items():
        kinds[module_kind(name, rec)] += rec.get("bytes", 0)
    ft_bytes = ft.weight_bytes()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deltacomp_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": {**_source_info(base), **base_fp},
        "finetuned": {**_source_info(ft), "weight_bytes": ft_bytes,
                      "num_params": sum(_numel(ft.shape(k)) for k in ft.keys())},
        "method": config.method,
        "settings": config.to_dict(),
        "budget": {
            "bits_per_entry": config.bits,
            "achieved_factor_bits_per_entry": counts["factor_bits"] / entries if entries else 0.0,
            "achieved_all_in_bits_per_entry": counts["all_in_bits"] / entries if entries else 0.0,
        },
        "modules": modules,
        "totals": {
            "compressed_modules": len(compressed),
            "exact_modules": sum(m["action"] in ("exact", "added", "resized") for m in modules.values()),
            "removed_modules": sum(m["action"] == "removed" for m in modules.values()),
            "compressed_entries": entries,
            "compressed_bytes": sum(m["bytes"] for m in compressed),
            "package_tensor_bytes": tensor_bytes,
            "package_bytes": 0,  # every file of the package (written by _write_all_in)
            "bytes_by_kind": kinds,  # metadata: manifest, card, config/tokenizer files, safetensors headers
            "fp16_delta_bytes": counts["fp16_delta_bytes"],
            "finetuned_weight_bytes": ft_bytes,
            "ratio_vs_fp16_delta": 0.0,  # fp16 delta / package bytes
            "ratio_vs_finetuned": 0.0,  # fine-tuned weights / package bytes
        },
        "files": {},
    }
