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

from deltacomp import __version__, distributed
from deltacomp.calib.context import MatrixContext
from deltacomp.calib.generic import settle as settle_calibration
from deltacomp.config import DEFAULT_INCLUDE, CompressConfig
from deltacomp.errors import DeltacompError
from deltacomp.extract import Entry, check_compatible, plan, stream
from deltacomp.io.checkpoint import SIDE_FILES, Checkpoint, side_file
from deltacomp.io.output import atomic_dir, check_output, kept_work, mark
from deltacomp.io.prefetch import prefetch
from deltacomp.io.safetensors_file import DTYPE_NAMES
from deltacomp.io.sharded_writer import ShardedWriter
from deltacomp.methods.base import method_for
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
from deltacomp.resume import FOLDER, ResultStore
from deltacomp.rows import is_token_table, is_vocab_matrix, select_rows
from deltacomp.stages import stage

log = logging.getLogger(__name__)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def copy_side_files(src: Path, dst: Path, base: Path) -> tuple[list[str], dict[str, str]]:
    """Copy the fine-tune's config and tokenizer files into ``dst``, except those byte-identical to the base's:
    (copied relative paths, {relative path: sha256} of the files the base supplies)."""
    copied, from_base = [], {}
    for rel in SIDE_FILES:
        f = side_file(src, rel)
        if f is None:
            continue
        digest, twin = sha256_file(f), side_file(base, rel)
        if twin is not None and sha256_file(twin) == digest:
            from_base[rel] = digest
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)
        copied.append(rel)
    return copied, from_base


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
             context_for: Callable[[Entry], MatrixContext | None] | None = None, resume: bool = False) -> dict:
    """Write the delta package of ``ft_src`` over ``base_src`` to ``out``; return its manifest.

    Everything is checked before the first byte is written (the settings against the method, inputs, budget
    against every matrix, the output path); the package is built in a hidden folder and renamed into place when
    complete.
    ``context_for(entry)`` may supply per-module data to the method (calibration statistics).

    Each compressed matrix's result is kept in the hidden folder as soon as it is done (:mod:`deltacomp.resume`);
    an interrupted run leaves them there, and ``resume`` takes them up instead of compressing them again.
    Under ``torchrun`` (:mod:`deltacomp.distributed`) the matrices are shared among the ranks and rank 0 writes
    the package, the same as one process writes; every rank returns its manifest.
    """
    method = method_for(config)
    config = method.resolve(config)  # "auto" settings as the method makes them, so the manifest says what was done
    base, ft = Checkpoint(base_src), Checkpoint(ft_src)
    check_compatible(base, ft)
    config = settle_calibration(config, base, ft)  # --calib auto: the everyday text, or none
    entries = plan(base, ft, config)
    if config.include != DEFAULT_INCLUDE and not any(e.action == "compress" for e in entries):
        raise DeltacompError(f"--include {' '.join(config.include)} matches no 2-D float weight of {ft.source} "
                             f"(after --exclude); nothing would be compressed")
    for e in entries:
        if e.action == "compress":
            method.check_budget(e.shape, matrix_config(e.name, config))
    inputs = (base.path, ft.path)
    check_output(out, overwrite, "package", inputs)
    world = distributed.world(config.device)
    config = dataclasses.replace(config, device=world.device(config.device))  # the device is not in the manifest
    owner = _owners(entries, config, world, context_for is not None)
    mine = {e.name for e in entries if owner.get(e.name) == world.rank}
    contexts = None
    if context_for is None and (world.is_main or mine):  # calibration / model-scope allocation, read before writing
        from deltacomp.calib.provider import open_contexts

        contexts = open_contexts(base, ft, entries, config, method)
        if contexts is not None:
            entries, context_for = contexts.entries, contexts.context_for
    if method.weighs_token_tables(config):
        context_for = _with_token_weights(base, ft, entries, mine, config, context_for, contexts)
    replay = contexts is not None and contexts.sequential is not None  # a resumed matrix still feeds the student
    identity = {"deltacomp_version": __version__, "settings": config.to_dict(),
                "inputs": [str(Path(p).resolve()) for p in inputs], "compressed": sorted(owner)}
    if resume and world.is_main and (kept := kept_work(out, FOLDER)) is not None:
        ResultStore(kept).check(identity)  # before the work is taken up: a wrong command leaves it in place
    try:
        if not world.is_main:
            store = ResultStore(world.broadcast(None))
            error = _share(base, ft, entries, mine, method, config, store, context_for, replay, progress=False)
            world.check_all(error)
            return world.broadcast(None)
        with atomic_dir(out, overwrite, "package", inputs, keep=FOLDER, resume=resume) as tmp:
            store = ResultStore(tmp / FOLDER)
            kept = store.start(identity)
            if kept:
                log.info("%d finished matrices taken up from the interrupted run", kept)
            world.broadcast(str(store.folder))
            error = _share(base, ft, entries, mine, method, config, store, context_for, replay, progress)
            world.check_all(error)
            tuning = _tune(base, ft, entries, config, store, contexts, progress) if config.tune else None
            manifest = _assemble(base, ft, entries, config, tmp, store, progress, tuning)
    finally:
        if contexts is not None:
            contexts.close()
    return world.broadcast(manifest)


def _tune(base: Checkpoint, ft: Checkpoint, entries: list[Entry], config: CompressConfig, store: ResultStore,
          contexts, progress: bool | None) -> dict | None:
    """``--tune``: the compressed matrices' S, scales and offsets fitted end to end (:mod:`deltacomp.tune.fit`);
    its report."""
    from deltacomp.tune.fit import tune

    compressed = [e.name for e in entries if e.action == "compress"]
    return tune(base, ft, contexts.samples, store, compressed, config.tune, config.tune_lr, config.device,
                contexts.dtype(), progress, contexts.answer_starts, config.tune_on)


def _with_token_weights(base: Checkpoint, ft: Checkpoint, entries: list[Entry], mine: set[str],
                        config: CompressConfig, context_for, contexts=None):
    """``context_for`` with ``--vocab-weights`` (:mod:`deltacomp.calib.frequency`) in the contexts of this rank's
    token tables and output heads (not position tables); unchanged when it compresses none or no tokenizer is
    found. With calibration ``contexts``, their samples (loaded once) and, where they walk the fine-tune block by
    block, that walk (the head's inputs) serve."""
    shapes = {e.name: tuple(e.shape) for e in entries
              if e.name in mine and e.action == "compress" and is_token_table(e.name)}
    if not shapes:
        return context_for
    from deltacomp.calib.frequency import token_table_contexts

    samples = contexts.samples if contexts is not None else None
    moment = contexts.cursor.head_moment if contexts is not None and contexts.cursor is not None else None
    extra = token_table_contexts(base, ft, shapes, config, samples, moment)
    if not extra:
        return context_for

    def context(e: Entry) -> MatrixContext | None:
        given = context_for(e) if context_for else None
        if e.name not in extra:
            return given
        return dataclasses.replace(given or MatrixContext(), **extra[e.name]())

    return context


def _owners(entries: list[Entry], config: CompressConfig, world: distributed.World, given: bool) -> dict[str, int]:
    """The rank that compresses each compressed matrix: shared by size, or all on rank 0 where the matrices depend
    on each other (``--sequential``, ``--budget-scope model``) or the caller gives the contexts."""
    names = {e.name: _numel(e.shape) for e in entries if e.action == "compress"}
    if world.size == 1 or config.sequential or config.budget_scope == "model" or given:
        return dict.fromkeys(names, 0)
    return distributed.assign(names, world.size)


def _share(base, ft, entries, mine, method, config, store: ResultStore, context_for, replay: bool,
           progress: bool | None) -> BaseException | None:
    """Compress this rank's matrices (in the order of ``entries``) that ``store`` lacks, keeping each result there;
    return the error that stopped it (an interruption is raised, not returned)."""
    todo = [e for e in entries if e.name in mine and (replay or not store.has(e.name))]
    try:
        bar = tqdm(prefetch(_with_digests(stream(base, ft, todo))), total=len(todo), desc="compress", unit="matrix",
                   disable=progress is False if progress is not None else None)
        for e, b, f, digest in bar:
            context = context_for(e) if context_for else None
            if store.has(e.name):  # resumed: the student stream takes the matrix as it was compressed
                _replay(e, b, store, method, context, config.device)
                continue
            record, tensors, counts = _compress_one(e, b, f, method, config, context)
            store.save(e.name, tensors, {"record": record, "counts": counts, "base_digest": digest.hex()})
    except Exception as err:  # handed to the other ranks, then raised
        return err
    return None


def _with_digests(pairs):
    """The tensor pairs with the base tensor's digest (:class:`FullFingerprint`), computed where they are read: in the
    read-ahead thread, beside the compression (0.15-0.2 s a 11008 x 4096 matrix on one core)."""
    for e, b, f in pairs:
        with stage("digest"):
            digest = FullFingerprint.digest(e.name, b)
        yield e, b, f, digest


def _replay(e: Entry, b: torch.Tensor, store: ResultStore, method, context: MatrixContext | None,
            device: str) -> None:
    if context is None or context.compressed is None:
        return
    tensors, meta = store.load(e.name)
    record = meta["record"]
    if record is not None:
        parts = {k.removeprefix(tensor_key(e.name, "")): t.to(device) for k, t in tensors.items()}
        delta = method.reconstruct(parts, record["info"], tuple(e.shape))
        context.compressed(b, delta)


def _assemble(base, ft, entries, config, tmp: Path, store: ResultStore, progress: bool | None,
              tuning: dict | None = None) -> dict:
    """Write the package into ``tmp`` in the order of ``entries``: compressed matrices from ``store``, the other
    tensors as they stream past; return the manifest (with ``--tune``'s report)."""
    base_fp = fingerprint(base)
    full = FullFingerprint()  # fed every base tensor (a compressed matrix's digest comes with its result)
    modules: dict[str, dict] = {}
    counts = {"factor_bits": 0, "all_in_bits": 0, "entries": 0, "fp16_delta_bytes": 0}
    writer = ShardedWriter(tmp, config.max_shard_bytes, prefix="delta")
    try:
        rest = [e for e in entries if e.action != "compress"]
        read = prefetch(stream(base, ft, rest))
        bar = tqdm(entries, desc="write", unit="tensor", disable=progress is False if progress is not None else None)
        for e in bar:
            if e.action == "compress":
                tensors, meta = store.load(e.name)
                record = meta["record"]
                full.add_digest(e.name, bytes.fromhex(meta["base_digest"]))
                done = meta["counts"]
            else:
                _, b, f = next(read)
                if b is not None:
                    full.add(e.name, b)
                record, tensors, done = _compress_one(e, b, f, None, config, None)
            for local, t in tensors.items():
                writer.add(local, t)
            for k, v in done.items():
                counts[k] += v
            if record is not None:
                modules[e.name] = record
        if not modules:
            raise DeltacompError(f"{ft.source} has the same weights as {base.source}: there is no delta to "
                                 f"compress")
        names = writer.close()
    except BaseException:
        writer.abort()
        raise
    shutil.rmtree(store.folder)
    index = tmp / "delta.safetensors.index.json"
    files = names + ([index.name] if index.exists() else [])
    side, from_base = copy_side_files(Path(ft.path), tmp / MODEL_DIR, Path(base.path))
    base_fp = {"fingerprint": base_fp, "full_fingerprint": full.hexdigest()}
    manifest = _manifest(base, ft, base_fp, config, modules, counts, writer.total_bytes)
    if tuning is not None:
        manifest["tuning"] = tuning
    manifest["files"] = {n: sha256_file(tmp / n) for n in files}
    manifest["files"].update({f"{MODEL_DIR}/{r}": sha256_file(tmp / MODEL_DIR / r) for r in side})
    manifest["base_files"] = from_base  # the fine-tune's side files that are the base's, byte for byte
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


def matrix_config(name: str, config: CompressConfig) -> CompressConfig:
    """The settings matrix ``name`` is compressed with: a token table or output head at ``--vocab-bits``."""
    if config.vocab_bits is None or not is_vocab_matrix(name):
        return config
    return dataclasses.replace(config, bits=config.vocab_bits)


def _compress_one(e: Entry, b, f, method, config, context: MatrixContext | None
                  ) -> tuple[dict | None, dict[str, torch.Tensor], dict[str, int]]:
    """One tensor pair -> (its manifest record or None when unchanged, the tensors stored under their package
    keys in order, its additions to the byte and bit counts)."""
    record = {"action": e.action, "shape": list(e.shape), "dtype": DTYPE_NAMES[e.dtype]}
    if e.action == "removed":
        return record, {}, {}
    if e.action in ("added", "resized"):
        return {**record, "bytes": _nbytes(f)}, {e.name: f}, {"fp16_delta_bytes": 2 * f.numel()}
    if f.dtype.is_floating_point:
        dev = config.device if e.action == "compress" else "cpu"  # the delta of a compressed matrix on its device
        with stage("delta"):
            delta = f.to(dev).float() - b.to(dev).float()
            changed = bool(delta.any())
        if not changed:
            return None, {}, {}
    elif torch.equal(b, f):
        return None, {}, {}
    if e.action == "exact":
        stored = _exact_form(f, delta if f.dtype.is_floating_point else None, config.exact)
        encoding = {} if stored is f else {"encoding": FP16_DELTA}
        return {**record, **encoding, "bytes": _nbytes(stored)}, {e.name: stored}, {"fp16_delta_bytes": 2 * f.numel()}
    if context is not None and context.target is not None:  # e.g. the delta serving the compressed model's inputs
        delta = context.target(b, f)
    config = matrix_config(e.name, config)
    rows = None
    if context is not None and context.plan is not None:  # a shared allocation chose the rows (or none)
        rows = context.plan.rows
    elif is_vocab_matrix(e.name):
        rows = select_rows(delta, config.rows_energy)  # (k,) or None: the rows of the tokens that moved
    if rows is not None:  # the kept rows as a (k, n) matrix, at the whole matrix's budget (fp16 at most)
        if context is not None and context.row_weight is not None:  # the weights are for the dense table
            context = dataclasses.replace(context, row_weight=None)
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
    tensors = {tensor_key(e.name, local): t for local, t in c.tensors.items()}
    counts = {"factor_bits": c.factor_bits, "all_in_bits": c.total_bits, "entries": delta.numel(),
              "fp16_delta_bytes": 2 * f.numel()}
    return {
        **record,
        "method": method.name,
        **({"rows": int(rows.numel())} if rows is not None else {}),
        "info": c.info,
        "factor_bytes": c.factor_bits // 8,
        "bytes": c.total_bits // 8,
        "factor_bits_per_entry": c.factor_bits / delta.numel(),
        "all_in_bits_per_entry": c.total_bits / delta.numel(),
    }, tensors, counts


def module_kind(name: str, rec: dict) -> str:
    """Which line of the size breakdown a module's bytes go to."""
    if is_vocab_matrix(name):
        return "embeddings"
    if rec["action"] == "compress":
        return "matrices"
    return "norms_biases" if len(rec["shape"]) == 1 else "other"


def _created() -> str:
    """Now, or ``SOURCE_DATE_EPOCH`` when set (reproducible builds: two runs then give the same bytes)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return when.isoformat(timespec="seconds")


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
        "created": _created(),
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
