"""Find the compiled CUDA extension (``cuda/``): built by ``setup.py``, or built just in time on request. Its
dequant-matmul serves :mod:`deltacomp.kernels`, its GPTQ block step :mod:`deltacomp.quant.gptq`.

The outcome is decided once and remembered. A failure never raises at import: it is kept and raised as one
clear error at the first CUDA call (:func:`extension`), and ``deltacomp doctor`` prints it.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from deltacomp.errors import DeltacompError

log = logging.getLogger(__name__)

JIT_ENV = "DELTACOMP_CUDA_JIT"  # 1: build the extension with torch.utils.cpp_extension.load when it is missing
SOURCES = ("delta_linear.cu", "gptq_block.cu", "binding.cpp")
OP_VERSION = 5  # the binding's argument lists (cuda/binding.cpp's op_version)
LAYOUT_VERSION = 2  # the delta bank layout the kernels read (deltacomp.kernels.bank lays it out)
CUDA_FLAGS = ("-O3", "-lineinfo", "-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90a,code=sm_90a")


@dataclass
class Status:
    path: str  # "extension" | "jit" | "twin"
    reason: str
    module: object = None
    error: str | None = None  # set when a build or load failed: raised at the first CUDA call


_status: Status | None = None


def source_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "cuda"


def cxx_std() -> str:
    """The C++ standard torch's headers need: C++20 from torch 2.13 on, C++17 before (setup.py keeps the same rule)."""
    import torch

    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 13) else "-std=c++17"


def _jit_build():
    from torch.utils.cpp_extension import load

    src = source_dir()
    missing = [s for s in SOURCES if not (src / s).is_file()]
    if missing:
        raise DeltacompError(f"cannot build the CUDA extension: {', '.join(missing)} not found in {src}")
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")  # this GPU only: a quicker build
    flags = [f for f in CUDA_FLAGS if not f.startswith("-gencode")] + [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    return load(name="deltacomp_cuda_jit", sources=[str(src / s) for s in SOURCES],
                extra_cuda_cflags=[*flags, cxx_std()], extra_cflags=["-O3", cxx_std()], verbose=False)


def status() -> Status:
    """Which path runs CUDA tensors, and why; decided on first use and remembered."""
    global _status
    if _status is not None:
        return _status
    try:
        module = importlib.import_module("deltacomp._cuda")
        _status = Status("extension", "the compiled extension deltacomp._cuda is installed", module)
    except Exception as e:  # not built: JIT or twin; built but not loading (ABI, missing symbol): remember it
        if isinstance(e, ModuleNotFoundError) and e.name == "deltacomp._cuda":
            _status = _jit_or_twin()
        else:
            _status = Status("extension", "deltacomp._cuda is installed but does not load",
                             error=f"the CUDA extension deltacomp._cuda does not load ({type(e).__name__}: {e}); "
                                   f"rebuild it against this torch")
    _status = _check_layout(_status)
    return _status


def _jit_or_twin() -> Status:
    if os.environ.get(JIT_ENV) != "1":
        return Status("twin", f"the CUDA extension is not built (install with a CUDA toolkit and "
                              f"--no-build-isolation, or set {JIT_ENV}=1 to build it on first use); "
                              f"CUDA tensors run through the pure-torch twin")
    try:
        import torch

        if not torch.cuda.is_available():
            return Status("twin", f"{JIT_ENV}=1 but no CUDA device is visible")
        module = _jit_build()
        return Status("jit", f"built just in time from {source_dir()}", module)
    except Exception as e:
        return Status("jit", "the just-in-time build failed",
                      error=f"building the CUDA extension failed ({type(e).__name__}: {str(e).splitlines()[0]})")


def _check_layout(st: Status) -> Status:
    """A loaded extension must read the bank layout this deltacomp writes; otherwise remember why not."""
    if st.module is None:
        return st
    if st.module.layout_version() != LAYOUT_VERSION:
        st.error = (f"the CUDA extension reads bank layout {st.module.layout_version()}; this deltacomp lays out "
                    f"layout {LAYOUT_VERSION}: rebuild the extension")
    elif getattr(st.module, "op_version", lambda: 1)() != OP_VERSION:
        st.error = "the CUDA extension was built from older sources than this deltacomp: rebuild the extension"
    return st


def extension():
    """The loaded extension module, or None when CUDA tensors run through the twin; a remembered failure raises."""
    st = status()
    if st.error:
        raise DeltacompError(st.error)
    return st.module
