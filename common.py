"""Small helpers that every script and module shares, none of them about language models.

- run_script: a script's main() with one-line errors (`error: ...`, exit 1) and Ctrl-C (exit 130).
- write_atomically: write a file through a temporary name, fsync and a rename, so a crash never
  leaves half a file (checkpoints, tokenizers, token caches), and a failed write is one line.
- pick_device, cpu_has_native_bf16, autocast_dtype, autocast: where to run, and in which
  mixed precision.

It imports neither `datasets` nor any module of this project, so any script can use it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import torch


def run_script(main: Callable[[], object], user_errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> None:
    """Run a script's main(). A user error (a bad path, a damaged file, data that cannot be
    used) prints one line, `error: ...`, and exits with status 1; Ctrl-C exits with 130,
    after the script's own message (say, how to resume) if it gave one."""
    try:
        main()
    except KeyboardInterrupt as interrupt:
        print(f"\n{str(interrupt) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def write_atomically(path: str | os.PathLike, write: Callable[[str], object], suffix: str = "") -> None:
    """write(temporary_path), flush it to disk, then rename the result to path. A rename within
    a folder is atomic, so a reader (or a run resumed after a crash) sees the old file or the
    new one, never half of one. suffix keeps an extension some writers insist on (np.save adds
    .npy). A write that fails (a full disk, a read-only folder, a folder at path) is an OSError
    whose message names path and the cause; the temporary file is removed and an old file at
    path is left as it was."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OSError(f"cannot write {path}: it is a folder; give a file name")
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    except RuntimeError as err:  # torch.save's C++ writer reports a failed write this way
        reason = (str(err).strip().splitlines() or ["no reason given"])[0]
        hint = "; is the disk full?" if "unexpected pos" in reason else ""  # its words when space runs out
        raise OSError(f"cannot write {path}: the write failed ({reason}){hint}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pick_device(name: str = "auto") -> torch.device:
    """"auto" prefers CUDA, then Apple's MPS, then the CPU; asking for a device this machine
    does not have is a ValueError that says so."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here (no GPU, or a CPU-only torch); use --device cpu")
    if kind == "mps" and not mps:
        raise ValueError(f"device {name!r}: Apple's MPS is not available here; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: choose auto, cpu, cuda or mps")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Does this CPU multiply bf16 natively (Intel AMX, or AVX-512 BF16 on Intel and AMD)?"""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype to train with on this device: bf16 where it is supported
    (fp16, which needs a GradScaler, on CUDA GPUs older than Ampere), None (float32) on a
    CPU without native bf16 units."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to dtype on device's kind, or nothing at all for dtype None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
