"""Outputs that appear whole or not at all, and that `--overwrite` may only replace when they are ours
(docs/design.md, "Output directories and --overwrite"; invariant 4).

- Every output directory is written in a temporary sibling `.NAME.partial-*` and renamed into place whole. It
  carries a marker file (OUTPUT_MARKER); `--overwrite` replaces only a directory carrying it, never `.`, an
  ancestor of the working directory, an input of the command, a symlink or a file.
- Writability is checked before any work, so a read-only parent fails in one line and not after an hour.
- SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt) once `exit_cleanly_on_signals` is installed, so
  the partial directory and every temporary file of a `with` block are removed as on Ctrl-C.
- Files and directories honour the umask (mkdtemp / mkstemp alone would leave them 0700 / 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import OutputError, OutputExistsError

OUTPUT_MARKER = ".compress-output"  # JSON: {"tool": "compress", "version": ...}


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP) turned into an exception, so that cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def exit_cleanly_on_signals() -> None:
    """Make SIGTERM and SIGHUP unwind like Ctrl-C (main thread only; a no-op elsewhere)."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(getattr(signal, name), _raise_interrupted)


def interruption_in(exc: BaseException):
    """The KeyboardInterrupt (Ctrl-C) or Interrupted (SIGTERM, SIGHUP) behind `exc`, or None. Some libraries catch
    it and raise their own error from it (onnxruntime's import turns it into "ImportError: initialization
    failed"), which is still the user's signal, not a bug."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def is_our_output(path) -> bool:
    """True when `path` is a directory that one of our commands wrote (it carries OUTPUT_MARKER)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / OUTPUT_MARKER).is_file()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would have had."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_parent(target: Path, flag: str) -> None:
    """The directory that will hold `target` exists or can be created, and is writable."""
    anchor = _nearest_existing(target.parent)
    if not anchor.is_dir():
        raise OutputError(f"{flag} {target}: {anchor} is a file, not a directory; choose another {flag}")
    try:  # a real probe: os.access says yes to root on a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".compress-probe-", dir=anchor))
    except OSError as e:
        raise OutputError(f"{flag} {target}: cannot write in {anchor} ({e.strerror}); choose another {flag} or "
                          "fix its permissions") from None


def _is_same_or_inside(path: Path, other: Path) -> bool:
    return path == other or path in other.parents


def _check_replaceable(target: Path, overwrite: bool, inputs: Iterable, flag: str, want_dir: bool) -> None:
    """Refuse, before any work, what the output may not replace."""
    resolved = target.resolve()
    for raw in inputs or ():
        if raw is None:
            continue
        src = Path(raw).resolve()
        if _is_same_or_inside(src, resolved):  # writing inside an input directory is fine; replacing it is not
            raise OutputError(f"{flag} {target} is or contains an input of this command ({raw}); choose another "
                              f"{flag}")
    if not (target.exists() or target.is_symlink()):
        return
    if _is_same_or_inside(resolved, Path.cwd().resolve()):
        raise OutputError(f"{flag} {target} is the working directory or one of its parents; choose a new "
                          f"directory for {flag}")
    if not overwrite:
        raise OutputExistsError(f"{target} already exists; choose another {flag} or pass --overwrite")
    if target.is_symlink():
        raise OutputError(f"{flag} {target} is a symbolic link; --overwrite replaces only an earlier output of "
                          f"ours: choose another {flag}")
    if want_dir and not is_our_output(target):
        what = "a file" if not target.is_dir() else f"a directory not written by compress (no {OUTPUT_MARKER})"
        raise OutputError(f"{flag} {target} is {what}; --overwrite replaces only an earlier output of ours: remove "
                          f"it yourself or choose another {flag}")
    if not want_dir and target.is_dir():
        raise OutputError(f"{flag} {target} is a directory; give a file name")


def check_output_dir(target, overwrite: bool = False, inputs: Iterable = (), flag: str = "--out") -> None:
    """Fail early, before any work, when `target` may not be written or replaced."""
    target = Path(target)
    _check_replaceable(target, overwrite, inputs, flag, want_dir=True)
    _check_writable_parent(target, flag)


def check_output_file(target, overwrite: bool = False, inputs: Iterable = (), flag: str = "--json") -> None:
    """As check_output_dir, for a single file (e.g. `--json`)."""
    target = Path(target)
    _check_replaceable(target, overwrite, inputs, flag, want_dir=False)
    _check_writable_parent(target, flag)


def _write_marker(directory: Path) -> None:
    from . import __version__

    (directory / OUTPUT_MARKER).write_text(json.dumps({"tool": "compress", "version": __version__}) + "\n")


@contextlib.contextmanager
def atomic_output_dir(target, overwrite: bool = False, inputs: Iterable = (), flag: str = "--out"):
    """Yield a temporary directory beside `target`; rename it to `target` only if the block succeeds.

    An existing `target` is an error unless `overwrite` and it is an earlier output of ours (check_output_dir).
    On any exception (Ctrl-C, SIGTERM, SIGHUP included) the temporary directory is removed and `target` is left
    as it was."""
    target = Path(target)
    check_output_dir(target, overwrite, inputs, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if tmp.is_dir():  # a writer may have replaced it (write_adapterhub creates its own directory)
            _write_marker(tmp)
        _apply_umask(tmp)
        if target.exists():
            check_output_dir(target, overwrite, inputs, flag)  # still ours: nothing swapped it meanwhile
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path, data: dict, overwrite: bool = False, inputs: Iterable = (), flag: str = "--json"):
    """Write a JSON file whole or not at all (mode per umask)."""
    path = Path(path)
    check_output_file(path, overwrite, inputs, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
