"""Atomic file writes, and output paths checked before any work starts.

Every file this package writes (patches, checkpoints, images, tables) appears complete or not at all: it is written
into a private temporary folder beside the target, ``.NAME.<pid>.<random>.partial/``, flushed to disk, then renamed
over the target. The folder, not just a temporary file, because some writers make temporary files of their own next
to the file they are given (safetensors does), which a killed writer would leave behind under names of their
choosing. A writer killed half-way leaves only its folder; the next save of ``NAME`` removes the folders of writers
that are no longer running, so leftovers never pile up.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from .errors import AblationError

PARTIAL_SUFFIX = ".partial"
PARTIAL_NAME_EXTRA = len(f"..{2**22}.{'0' * 8}{PARTIAL_SUFFIX}")  # what the private folder's name adds to NAME


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def partial_files(path: Path) -> list[Path]:
    """Temporary folders of writers of ``path`` (running or dead), and the temporary files of earlier versions."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+{re.escape(PARTIAL_SUFFIX)}$")
    if not path.parent.is_dir():
        return []
    return [path.parent / name for name in os.listdir(path.parent) if pattern.match(name)]


def remove_dead_partials(path: Path) -> int:
    """Delete what killed writers of ``path`` left behind (their temporary folders); returns how many."""
    removed = 0
    for leftover in partial_files(path):
        pid = int(leftover.name[len(path.name) + 2:].split(".", 1)[0])
        if pid != os.getpid() and _process_alive(pid):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)  # another writer may be removing it too
        else:
            leftover.unlink(missing_ok=True)
        removed += not leftover.exists()
    return removed


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file in a private folder beside ``path``, fsync it, then rename it
    over ``path``; the folder goes whether the write succeeds, fails or is interrupted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(path)
    private = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    private.mkdir()
    tmp = private / path.name
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the file gets the usual permissions, not a temp file's 0600
        os.replace(tmp, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return path


def save_safetensors_atomic(tensors: dict[str, Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_output_file(path: str | Path, suffixes: tuple[str, ...] = (), overwrite: bool = False,
                      what: str = "output file") -> Path:
    """Check before any work that ``path`` can be written: not a folder, its folder writable, the right suffix and,
    unless ``overwrite``, not an existing file, and a name the file system takes. Raises ``AblationError`` saying
    what to change."""
    path = _non_empty(path, what)
    _check_name_lengths(path, what, PARTIAL_NAME_EXTRA)
    if path.is_dir():
        example = path / ("output" + (suffixes[0] if suffixes else ""))
        raise AblationError(f"{path} is a folder; give a file name for the {what}, e.g. {example}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise AblationError(f"the {what} {path.name} should end in {' or '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise AblationError(f"{path} already exists; pass --overwrite to replace it, or choose another name")
    _check_folder_writable(path.parent, what)
    return path


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """A folder to write into: a missing one is created later; an existing file there is an error."""
    path = _non_empty(path, what)
    _check_name_lengths(path, what)
    if path.exists() and not path.is_dir():
        raise AblationError(f"{path} is a file, not a folder; give a folder for the {what}")
    _check_folder_writable(path if path.exists() else path.parent, what)
    return path


def _non_empty(path: str | Path, what: str) -> Path:
    if not str(path).strip():  # checked before Path(), which makes "" the current folder
        raise AblationError(f"the {what} path is empty")
    return Path(path).expanduser()


def _nearest_existing(folder: Path) -> Path:
    existing = folder
    while not os.path.exists(existing) and existing.parent != existing:  # False for names too long, unlike Path's
        existing = existing.parent
    return existing


def _check_name_lengths(path: Path, what: str, extra: int = 0) -> None:
    """Names the file system would refuse only when saving, after the work: any part of the path too long for it, or
    a last name too long once ``extra`` bytes are added (``write_atomic``'s private folder has a longer name)."""
    try:
        limit = os.pathconf(_nearest_existing(path.parent), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if any(len(part.encode()) > limit for part in path.parts) or len(path.name.encode()) + extra > limit:
        raise AblationError(f"the {what} path has a name too long for this file system; keep names under "
                            f"{limit - extra} bytes")


def _check_folder_writable(folder: Path, what: str) -> None:
    existing = _nearest_existing(folder)  # the nearest existing folder must let us create the rest
    if existing.exists() and not existing.is_dir():
        raise AblationError(f"cannot write the {what}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AblationError(f"cannot write the {what}: no permission to write in {existing}")


def check_input_file(path: str | Path, what: str = "input file") -> Path:
    path = _non_empty(path, what)
    if not os.path.exists(path):  # False for a name too long, where Path.exists() raises
        raise AblationError(f"the {what} {path} does not exist")
    if path.is_dir():
        raise AblationError(f"the {what} {path} is a folder, not a file")
    if not os.access(path, os.R_OK):
        raise AblationError(f"the {what} {path} cannot be read (no permission)")
    return path
