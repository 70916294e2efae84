"""The manifest schema, checked on every load: a package is untrusted input.

:func:`check_manifest` checks the JSON itself (types, ranges, file paths, each module's record and its
method's ``info``); :func:`check_tensors` checks the tensors the safetensors headers declare against what
the manifest implies (names, shapes, dtypes; nothing missing, nothing extra). Each failure is one
:class:`PackageError` line that names the manifest key at fault, e.g. ``modules.x.weight.info.groups[0].bits``.
"""

from __future__ import annotations

import math
import re

import torch

from deltacomp.errors import DeltacompError, PackageError
from deltacomp.io.checkpoint import SIDE_FILES
from deltacomp.io.paths import check_relative
from deltacomp.io.safetensors_file import DTYPES

ACTIONS = ("compress", "exact", "added", "removed", "resized")
MAX_DIM = 1 << 31
MAX_NDIM = 8
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
# numbers the report and the model card print; each must be a finite number >= 0
BUDGET_KEYS = ("bits_per_entry", "achieved_factor_bits_per_entry", "achieved_all_in_bits_per_entry")
TOTALS_KEYS = ("compressed_modules", "exact_modules", "removed_modules", "compressed_entries", "compressed_bytes",
               "package_tensor_bytes", "fp16_delta_bytes", "finetuned_weight_bytes", "ratio_vs_fp16_delta",
               "ratio_vs_finetuned")

TUNING_KEYS = ("matrices", "epochs", "kept_epoch", "held_out_samples", "loss_before", "loss_after")


class _Bad(Exception):
    """A schema violation: (key, what is wrong)."""


def _fail(key: str, msg: str):
    raise _Bad(f"{key}: {msg}")


def _obj(value, key: str) -> dict:
    if not isinstance(value, dict):
        _fail(key, f"must be an object, got {type(value).__name__}")
    return value


def _str(value, key: str) -> str:
    if not isinstance(value, str):
        _fail(key, f"must be a string, got {value!r}")
    return value


def _number(value, key: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        _fail(key, f"must be a finite number >= 0, got {value!r}")
    if positive and value <= 0:
        _fail(key, f"must be positive, got {value!r}")
    return value


def _shape(value, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        _fail(key, f"must be a list of at most {MAX_NDIM} sizes, got {value!r}")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIM:
            _fail(key, f"sizes must be integers in [0, {MAX_DIM}], got {value!r}")
    return tuple(value)


def _module(name: str, rec, key: str) -> None:
    from deltacomp.methods.base import get_method

    rec = _obj(rec, key)
    action = rec.get("action")
    if action not in ACTIONS:
        _fail(f"{key}.action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    shape = _shape(rec.get("shape"), f"{key}.shape")
    dtype = rec.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        _fail(f"{key}.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    encoding = rec.get("encoding")
    if encoding is not None:
        from deltacomp.package.manifest import FP16_DELTA

        if encoding != FP16_DELTA or action != "exact" or not DTYPES[dtype].is_floating_point:
            _fail(f"{key}.encoding", f"only {FP16_DELTA!r}, on an exact floating-point module, got {encoding!r}")
    if action != "compress":
        if "bytes" in rec:
            _number(rec["bytes"], f"{key}.bytes")
        return
    for k in ("bytes", "factor_bits_per_entry", "all_in_bits_per_entry"):
        _number(rec.get(k), f"{key}.{k}")
    if len(shape) != 2 or min(shape) < 1 or not DTYPES[dtype].is_floating_point:
        _fail(key, f"a compressed module must be a 2-D float matrix, got {dtype} {list(shape)}")
    try:
        method = get_method(_str(rec.get("method"), f"{key}.method"))
    except DeltacompError as e:
        _fail(f"{key}.method", str(e))
    info = _obj(rec.get("info"), f"{key}.info")
    if "rows" in rec:
        rows = rec["rows"]
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= shape[0]:
            _fail(f"{key}.rows", f"must be an integer in [1, {shape[0]}] (rows kept of the delta), got {rows!r}")
    try:
        method.layout(info, stored_shape(rec))
    except ValueError as e:
        raise _Bad(f"{key}.info.{e}") from None


def stored_shape(rec: dict) -> tuple[int, ...]:
    """The shape of the matrix a compressed module's method stores: (rows kept, n) for a row-sparse module."""
    shape = tuple(rec["shape"])
    return (rec["rows"], *shape[1:]) if "rows" in rec else shape


def _check(manifest: dict) -> None:
    from deltacomp.package.manifest import FORMAT_VERSION, MANIFEST

    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        _fail("format_version", f"must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise _Bad(f"package format {version} is newer than this deltacomp reads ({FORMAT_VERSION}); "
                   f"upgrade deltacomp")
    _str(manifest["deltacomp_version"], "deltacomp_version")
    _str(manifest["method"], "method")
    _obj(manifest["settings"], "settings")
    base = _obj(manifest["base"], "base")
    for k in ("fingerprint", "full_fingerprint"):
        if (k in base or k == "fingerprint") and not _FINGERPRINT.match(str(base.get(k))):
            _fail(f"base.{k}", f"must be 'sha256:' and 64 hex digits, got {base.get(k)!r}")
    for k in ("source", "repo_id", "revision", "architecture"):
        if base.get(k) is not None:
            _str(base[k], f"base.{k}")
    _obj(manifest["finetuned"], "finetuned")
    budget = _obj(manifest["budget"], "budget")
    totals = _obj(manifest["totals"], "totals")
    for group, keys, name in ((budget, BUDGET_KEYS, "budget"), (totals, TOTALS_KEYS, "totals")):
        for k in keys:
            _number(group.get(k), f"{name}.{k}")
    if "tuning" in manifest:  # --tune's report, printed by inspect
        tuning = _obj(manifest["tuning"], "tuning")
        for k in TUNING_KEYS:
            _number(tuning.get(k), f"tuning.{k}")
        _str(tuning.get("loss"), "tuning.loss")
    if "package_bytes" in totals:  # packages of format 2 on
        _number(totals["package_bytes"], "totals.package_bytes")
    for k, v in _obj(totals.get("bytes_by_kind", {}), "totals.bytes_by_kind").items():
        _number(v, f"totals.bytes_by_kind.{k}")
    files = _obj(manifest["files"], "files")
    for rel, digest in files.items():
        try:
            check_relative(rel, f"files[{rel!r}]", PackageError)
        except PackageError as e:
            raise _Bad(str(e)) from None
        if rel in (MANIFEST, "README.md"):
            _fail(f"files[{rel!r}]", "the manifest and the card are not package files")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            _fail(f"files[{rel!r}]", f"must be a sha256 of 64 lower-case hex digits, got {digest!r}")
    for rel, digest in _obj(manifest.get("base_files", {}), "base_files").items():
        if rel not in SIDE_FILES:
            _fail(f"base_files[{rel!r}]", "only config and tokenizer files can come from the base")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            _fail(f"base_files[{rel!r}]", f"must be a sha256 of 64 lower-case hex digits, got {digest!r}")
    modules = _obj(manifest["modules"], "modules")
    for name, rec in modules.items():
        if not name or "/" in name:
            _fail(f"modules[{name!r}]", "a module name is a tensor name: non-empty, without '/'")
        _module(name, rec, f"modules.{name}")


def check_manifest(manifest: dict, where: str) -> dict:
    """``manifest`` if it follows the schema; else a PackageError ``where: key: what is wrong``."""
    try:
        _check(manifest)
    except _Bad as e:
        raise PackageError(f"{where}: {e}") from None
    return manifest


def expected_tensors(manifest: dict) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]] | None]:
    """Every stored tensor the manifest implies: key -> (shape, allowed dtypes); None for a compressed module's
    prefix when its method declares no layout (``module/`` then matches any part)."""
    from deltacomp.methods.base import get_method
    from deltacomp.package.manifest import FP16_DELTA, tensor_key

    out: dict = {}
    for name, rec in manifest["modules"].items():
        shape, dtype = tuple(rec["shape"]), DTYPES[rec["dtype"]]
        if rec["action"] == "removed":
            continue
        if rec["action"] != "compress":
            out[name] = (shape, (torch.float16,) if rec.get("encoding") == FP16_DELTA else (dtype,))
            continue
        layout = get_method(rec["method"]).layout(rec["info"], stored_shape(rec))
        if layout is None:
            out[name + "/"] = None
            continue
        if "rows" in rec:
            out[tensor_key(name, "rows")] = ((rec["rows"],), (torch.int32,))
        for local, want in layout.items():
            out[tensor_key(name, local)] = want
    return out


def check_tensors(manifest: dict, stored: dict[str, tuple[tuple[int, ...], torch.dtype]], where: str) -> None:
    """The tensors the headers declare (``stored``: key -> (shape, dtype)) against the manifest's implied set."""
    want = expected_tensors(manifest)
    open_prefixes = [k for k, v in want.items() if v is None]
    for key, spec in want.items():
        if spec is None:
            continue
        if key not in stored:
            raise PackageError(f"{where}: tensor {key!r} that the manifest implies is not in the package files")
        (shape, dtypes), (got_shape, got_dtype) = spec, stored[key]
        if tuple(got_shape) != tuple(shape) or got_dtype not in dtypes:
            module = key.split("/", 1)[0]
            raise PackageError(
                f"{where}: tensor {key!r} is {_dtype_name(got_dtype)} {list(got_shape)} but modules.{module} implies "
                f"{' or '.join(_dtype_name(d) for d in dtypes)} {list(shape)}"
            )
    for key in stored:
        if key not in want and not any(key.startswith(p) for p in open_prefixes):
            raise PackageError(f"{where}: tensor {key!r} in the package files belongs to no module of the manifest")


def _dtype_name(dtype: torch.dtype) -> str:
    from deltacomp.io.safetensors_file import DTYPE_NAMES

    return DTYPE_NAMES.get(dtype, str(dtype))
