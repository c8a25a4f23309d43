"""Plain files between stages, written atomically: a reader never sees half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from gradmm.errors import UserError


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def read_yaml(path: Path, what: str) -> Any:
    """The YAML (or JSON) document in ``path``, a ``what`` file; a missing, unreadable,
    non-UTF-8 or malformed file is a one-line :class:`UserError` (YAML's own messages span
    several lines: only the problem and its line are kept)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise UserError(f"{path}: not valid YAML ({problem}{where})") from None


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file; a malformed line is a :class:`UserError` naming the file and line."""
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: Path) -> list[tuple[int, dict]]:
    """Like :func:`read_jsonl`, with each row's 1-based line number (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object")
                rows.append((lineno, row))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return rows


STAMP = ".gradmm.json"  # written into every folder gradmm creates: {"kind": ...}


@dataclass(frozen=True)
class OutputKind:
    """A folder gradmm writes: which entries are its own and which one marks it finished.

    gradmm writes only into a folder that is new, empty, or stamped (:data:`STAMP`) as its own
    output of the same kind and holding nothing but ``owned`` entries; ``--overwrite`` removes
    only those entries. File names alone never make a folder gradmm's.
    """

    name: str
    marker: str  # present once the output is finished
    owned: tuple[str, ...]  # glob patterns of the entries gradmm writes there

    def owns(self, entry: str) -> bool:
        # the stamp, and the temporary files of write_text (left by a killed process), are ours
        return (
            entry == STAMP
            or (entry.startswith(".") and entry.endswith(".tmp"))
            or any(fnmatch(entry, pattern) for pattern in self.owned)
        )

    def stamp(self, folder: Path) -> None:
        """Mark ``folder`` as gradmm's output of this kind."""
        write_json(Path(folder) / STAMP, {"kind": self.name})


def _protected(path: Path) -> bool:
    """The file system root, a home folder, the working directory or one of its ancestors."""
    cwd = Path.cwd().resolve()
    return path == Path(path.anchor) or path == Path.home().resolve() or path in (cwd, *cwd.parents)


def check_writable(path: Path) -> None:
    """A :class:`UserError` unless ``path`` (a file or folder) can be created or replaced: its
    nearest existing ancestor folder must be writable, and so must ``path`` if it is a folder."""
    path = Path(path).expanduser().resolve()
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {path}: {ancestor} is a file")
    for folder in (ancestor, path) if path.is_dir() else (ancestor,):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            raise UserError(f"cannot write to {folder} (read-only file system)")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"cannot write to {folder} (permission denied)")


def check_output_dir(out: Path, kind: OutputKind) -> bool:
    """Refuse an output folder gradmm may not write into; True if it holds a finished output.

    Raises a :class:`UserError` (before any work is done) for ``/``, a home folder, the working
    directory and its ancestors, a path under a file or in a folder that cannot be written, and a
    non-empty folder that is not stamped as ``kind``'s output or holds anything else.
    """
    out = Path(out)
    try:
        resolved = out.expanduser().resolve()
        if _protected(resolved):
            raise UserError(
                f"refusing to write outputs into {out} ({resolved}): it is the file system root, "
                "a home folder or the working directory; choose a new folder"
            )
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} exists and is not a folder")
        check_writable(out)
        if not out.exists():
            return False
        entries = sorted(e.name for e in out.iterdir())
        if not entries:
            return False
        stamp = out / STAMP
        stamped = stamp.is_file() and _stamp_kind(stamp) == kind.name
        foreign = [e for e in entries if not kind.owns(e)]
        if not stamped or foreign:
            shown = (foreign or entries)[0]
            raise UserError(
                f"{out} is not empty and is not a gradmm {kind.name} folder (it holds "
                f"{shown!r}{' and more' if len(entries) > 1 else ''}); gradmm never writes into "
                "or deletes from a folder it did not create: choose a new folder"
            )
        return (out / kind.marker).exists()
    except OSError as e:
        raise UserError(f"cannot use {out}: {e.strerror}") from None


def _stamp_kind(stamp: Path) -> str | None:
    try:
        content = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content.get("kind") if isinstance(content, dict) else None


def remove_owned(folder: Path, kind: OutputKind, keep: set[str] = frozenset()) -> None:
    """Delete ``kind``'s own entries of ``folder`` (never anything else, nor the stamp), except
    ``keep``. Call only on a folder :func:`check_output_dir` accepted."""
    for entry in Path(folder).iterdir():
        if entry.name in keep or entry.name == STAMP or not kind.owns(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def make_output_dir(out: Path, kind: OutputKind) -> None:
    """Create ``out`` (checked with :func:`check_output_dir`) stamped as ``kind``'s output."""
    Path(out).mkdir(parents=True, exist_ok=True)
    if not (Path(out) / STAMP).exists():
        kind.stamp(out)


@contextmanager
def staged_dir(final: Path, kind: OutputKind) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success its entries become ``final``'s.

    A new ``final`` is created by one rename (stamped, with normal permissions). An existing one
    (callers have checked it with :func:`check_output_dir` and decided that replacing it is
    allowed) gets each new entry by a rename, the finish marker last, and loses only its other own
    entries; nothing else is touched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        kind.stamp(tmp)
        if not final.exists():
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide results from other users
            os.replace(tmp, final)
            return
        check_output_dir(final, kind)  # again, right before touching it
        new = sorted(e.name for e in tmp.iterdir())
        (final / kind.marker).unlink(missing_ok=True)  # unfinished until the marker is back
        remove_owned(final, kind, keep=set(new))
        for name in sorted(new, key=lambda n: n == kind.marker):
            if (final / name).is_dir():
                shutil.rmtree(final / name)
            os.replace(tmp / name, final / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_result_file(out: Path, stage: str, overwrite: bool) -> None:
    """Refuse to write a one-file result over a file that ``gradmm <stage>`` did not write (its
    JSON carries ``"stage": stage``), or over one it did without ``overwrite``."""
    out = Path(out)
    try:
        if out.is_dir():
            raise UserError(f"{out} is a folder; --out takes a file path")
        check_writable(out)
        if not out.exists():
            return
    except OSError as e:
        raise UserError(f"cannot use {out}: {e.strerror}") from None
    try:
        ours = read_json(out).get("stage") == stage
    except (UserError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"{out} exists and was not written by gradmm {stage}; choose a new --out")
    if not overwrite:
        raise UserError(f"{out} already holds a {stage} result (pass --overwrite to replace it)")
