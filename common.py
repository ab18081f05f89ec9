"""Small helpers that every script and module shares, none of them about language models.

- Interrupted, run_script: a script's main() with one-line errors (`error: ...`, exit 1), and
  Ctrl-C (exit 130) or, where a script handles other signals (training does), exit 128 + the
  signal's number (143 for SIGTERM, 129 for SIGHUP).
- output_path_problem, check_output_paths: refuse output files and folders that cannot be
  written, before any work.
- write_atomically: write a file through a temporary name (temporary_prefix, temporary_name),
  fsync and a rename, so a crash never leaves half a file (checkpoints, tokenizers, token
  caches), and a failed write is one line; the temporary files that killed processes left
  behind are removed first (process_is_alive, remove_stale_temporaries). write_folder_atomically
  writes a folder of files (a model export) the same way, through a temporary folder and a rename.
- pick_device, cpu_has_native_bf16, autocast_dtype, autocast: where to run, and in which
  mixed precision.

It imports neither `datasets` nor any module of this project, so any script can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch


class Interrupted(KeyboardInterrupt):
    """A script stopped by a signal after it has cleaned up (a training run: after saving);
    the message says what was kept and how to go on."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def run_script(main: Callable[[], object], user_errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> None:
    """Run a script's main(). A user error (a bad path, a damaged file, data that cannot be
    used) prints one line, `error: ...`, and exits with status 1. Ctrl-C, or an Interrupted
    that a script's own signal handling raised, prints its message (say, how to resume) and
    exits with 128 + the signal's number, as a shell reports a process the signal killed: 130
    for Ctrl-C, 143 for SIGTERM."""
    try:
        main()
    except KeyboardInterrupt as interrupt:
        print(f"\n{str(interrupt) or 'interrupted'}", file=sys.stderr)
        sys.exit(128 + getattr(interrupt, "signum", signal.SIGINT))
    except user_errors as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def output_path_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why path cannot be written as a file (or, with folder, as a folder), or None: the other
    kind is there, a file stands where a parent folder should be, or the folder is read-only.
    Missing folders are not a problem: write_atomically and the output folders make them."""
    path = Path(path).absolute()
    try:
        if path.exists() and path.is_dir() != folder:
            return f"it is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file name'}"
        existing = path if folder and path.is_dir() else path.parent
        while not existing.exists():  # the folders still to be made
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is a file, not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable (read-only?); choose another place"
    except OSError as err:  # a folder on the way that this user may not enter
        return f"cannot be checked ({err.strerror or err})"
    return None


def check_output_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, files: tuple[str, ...] = (),
                       folders: tuple[str, ...] = ()) -> None:
    """parser.error (exit 2) for the first of these flags whose path cannot be written; run
    before any work, so a bad path never costs a finished run. Unset flags are skipped."""
    for flag in (*files, *folders):
        path = getattr(args, flag)
        problem = path and output_path_problem(path, folder=flag in folders)
        if problem:
            parser.error(f"--{flag} {path}: {problem}")


def process_is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        pass
    return True


def temporary_prefix(path: str) -> str:
    """The start of write_atomically's temporary file names for path on this machine; the
    process id and the suffix follow. It names the machine as well as the process: on a folder
    several machines share, a process id means nothing to the others."""
    return f"{path}.tmp-{socket.gethostname()}-"


def temporary_name(path: str, pid: int, suffix: str = "") -> str:
    """write_atomically's temporary file for path, written by process pid."""
    return f"{temporary_prefix(path)}{pid}{suffix}"


def remove_stale_temporaries(path: str, suffix: str = "") -> None:
    """Remove path's temporary files (or folders, for write_folder_atomically) whose process,
    on this machine, is gone: a run killed in the middle of a save (kill -9, a power cut)
    leaves one, and it may be large. Best effort: what cannot be listed or removed is left."""
    folder, name = os.path.split(path)
    stale = re.compile(re.escape(temporary_prefix(name)) + r"([0-9]{1,9})" + re.escape(suffix))  # any process id
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder or "."):
            match = stale.fullmatch(entry.name)
            if match and not process_is_alive(int(match[1])):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.remove(entry.path)


def write_atomically(path: str | os.PathLike, write: Callable[[str], object], suffix: str = "") -> None:
    """Make path's folder if need be, write(temporary_path), flush it to disk, then rename the
    result to path. A rename within a folder is atomic, so a reader (or a run resumed after a
    crash) sees the old file or the new one, never half of one. suffix keeps an extension some
    writers insist on (np.save adds .npy). A write that fails (a full disk, a read-only
    folder, a folder at path) is an OSError whose message names path and the cause; the
    temporary file is removed and an old file at path is left as it was."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OSError(f"cannot write {path}: it is a folder; give a file name")
    remove_stale_temporaries(path, suffix)
    tmp = temporary_name(path, os.getpid(), suffix)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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


def write_folder_atomically(path: str | os.PathLike, write: Callable[[str], object], overwrite: bool = False) -> None:
    """write_atomically for a folder of files: write(temporary_folder), then a rename makes it
    path, so a reader never sees half an export. An existing path is refused, or with
    overwrite replaced: moved aside first, and removed only once the new folder is in place
    (an interruption between the two renames leaves it beside path, as PATH.tmp-HOST-PID-old).
    A failed write is an OSError naming path; the temporary folder is removed and path left as
    it was. The files are not fsynced one by one: a power cut can still cost the new export."""
    path = os.fspath(path).rstrip(os.sep) or os.sep
    if os.path.lexists(path) and not (overwrite and os.path.isdir(path)):
        raise OSError(f"cannot write {path}: it already exists")
    for suffix in ("", "-old"):
        remove_stale_temporaries(path, suffix)
    tmp = temporary_name(path, os.getpid())
    old = tmp + "-old"
    try:
        os.makedirs(tmp)
        write(tmp)
        if os.path.lexists(path):
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if os.path.lexists(old):
                os.replace(old, path)  # put the old folder back
            raise
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # the new folder is in place: the old one can go


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
