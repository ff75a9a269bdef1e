"""Build and load the C integer kernels (quant/csrc/*.c) through ctypes.

The library is compiled once per source version into a cache directory with the system C
compiler; no torch headers are needed, so the build takes about a second. Set
EDGEWEAVE_CACHE to move the cache, or EDGEWEAVE_CC to choose the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp first so the kernels share its OpenMP runtime)

__all__ = ["load_kernels", "KernelBuildError", "EwLinear", "EwLlamaLayer", "EwLlamaDims"]

_SOURCES = tuple(Path(__file__).parent / "csrc" / f for f in ("int8_gemm.c", "llama_stage.c", "spin.c"))
_I64, _F32 = ctypes.c_int64, ctypes.c_float
_PTR = ctypes.c_void_p

_SIGNATURES = {
    "ew_gemm_s8s8s32": [_I64, _I64, _I64, _PTR, _PTR, _PTR],
    "ew_gemm_s8s8s32_ld": [_I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64],
    "ew_quantize_rows": [_I64, _I64, _PTR, _F32, _PTR, _PTR],
    "ew_rescale": [_I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "ew_linear_w8a8": [_I64, _I64, _I64, _PTR, _F32, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "ew_linear_w4a8": [_I64, _I64, _I64, _PTR, _F32, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR],
    "ew_unpack_int4": [_I64, _I64, _PTR, _PTR, _I64, _PTR],
    "ew_w4_nibble_path": [_I64, _I64],
    "ew_llama_stage_forward": [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "ew_attend": [_PTR, _PTR, _PTR, _I64, _I64, _F32, _I64, _PTR],
    "ew_idle_spin": [_PTR],  # workers/awake.py
}
_RETURNS = {"ew_llama_stage_forward": ctypes.c_int, "ew_attend": ctypes.c_int, "ew_w4_nibble_path": ctypes.c_int}


class EwLinear(ctypes.Structure):
    """One quantized linear for the C stage (struct ew_linear in csrc/llama_stage.c)."""

    _fields_ = [("bits", _I64), ("n", _I64), ("k", _I64), ("w", _PTR), ("sw", _PTR), ("zero", _PTR),
                ("group", _I64), ("bias", _PTR), ("static_scale", _F32), ("offset", _F32), ("has_offset", _I64),
                ("rotate", _I64)]


class EwLlamaLayer(ctypes.Structure):
    """One dense Llama decoder layer's weights (struct ew_llama_layer)."""

    _fields_ = [("ln1", _PTR), ("ln2", _PTR), ("qkv", EwLinear), ("o", EwLinear), ("gate_up", EwLinear),
                ("down", EwLinear)]


class EwLlamaDims(ctypes.Structure):
    """struct ew_llama_dims"""

    _fields_ = [("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("inter", _I64),
                ("eps", _F32)]


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled; the message says which command failed."""


def _cache_dir() -> Path:
    root = os.environ.get("EDGEWEAVE_CACHE") or os.path.join(Path.home(), ".cache", "edgeweave")
    return Path(root) / "kernels"


def _compile(sources: tuple[Path, ...], target: Path) -> None:
    cc = os.environ.get("EDGEWEAVE_CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelBuildError(
            "no C compiler found to build edgeweave's int8 kernels; install one "
            "(Debian: apt-get install gcc) or set EDGEWEAVE_CC"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name, then rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [cc, "-O3", "-shared", "-fPIC", "-fopenmp", *map(str, sources), "-o", tmp, "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"building int8 kernels failed: {' '.join(cmd)}\n{done.stderr}")
    os.replace(tmp, target)


@functools.lru_cache(maxsize=1)
def load_kernels() -> ctypes.CDLL:
    """Compile (if needed) and load the kernel library; cached for the process."""
    digest = hashlib.sha256(b"".join(src.read_bytes() for src in _SOURCES)).hexdigest()[:16]
    target = _cache_dir() / f"edgeweave_int8_{digest}.so"
    if not target.exists():
        _compile(_SOURCES, target)
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = _RETURNS.get(name)
    return lib
