"""Writing without losing what a user has: atomic files, one writer per folder, safe YAML, safe tables.

* :func:`atomic_write_text` / :func:`atomic_write_bytes` -- temporary file in the same folder, fsync, rename:
  a kill leaves the old file or the new one, never half of one, and never writes through a symlink (the
  rename replaces the link itself; :func:`refuse_symlink` refuses it first, naming it).
* :class:`FolderLock` -- an exclusive lock on an output folder (``.robustvtc.lock`` holding pid and host, held
  with ``flock`` so a SIGKILLed holder releases it); a second writer gets one line naming the holder, a lock
  left by a dead process is taken over with a message.
* :func:`load_yaml` -- size limit, bounded alias expansion (no "billion laughs"), duplicate keys refused with
  their line.
* :func:`csv_cell` / :func:`write_csv` neutralise spreadsheet formulas; :func:`md_cell` escapes Markdown/HTML.

Temporary files are named ``.<name>.rvtc-XXXXXXXX.tmp`` next to ``<name>``; one a kill left behind is
robustvtc's when ``<name>`` is in the folder's ledger, and :func:`remove_stale_temps` (run under the lock by
every campaign, ``--overwrite`` and report) removes exactly those.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import UserInputError

LOCK_NAME = ".robustvtc.lock"
LEDGER_NAME = ".robustvtc-files"  # what campaigns wrote in a folder, one relative path a line, noted before writing
YAML_MAX_BYTES = 1 << 20  # a scenario is a few hundred bytes; 1 MiB is generous
YAML_MAX_NODES = 100_000  # nodes after alias expansion
TEMP_MARK = ".rvtc-"  # in every temporary file name: .<name>.rvtc-XXXXXXXX.tmp
_TEMP = re.compile(r"^\.(?P<target>.+)\.rvtc-[a-z0-9_]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\.(?P<target>manifest\.json)\.[a-z0-9_]{8}\.tmp$")  # before TEMP_MARK (manifest only)


# ---------------------------------------------------------------------------------------------- files
def refuse_symlink(path: str | Path) -> None:
    """A :class:`UserInputError` when ``path`` (or a folder between it and its campaign folder) is a symlink."""
    path = Path(path)
    if path.is_symlink():
        raise UserInputError(f"{path} is a symbolic link; robustvtc never writes through links; accepted: remove "
                             "the link or choose another output folder")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def note_in_ledger(path: str | Path) -> None:
    """Add ``path`` to the ledger of the campaign folder holding it (up to three levels up), if there is one,
    before it is written: ``--overwrite`` removes exactly what the ledger lists."""
    path = Path(path)
    for folder in list(path.parents)[:3]:
        ledger = folder / LEDGER_NAME
        if ledger.is_file() and not ledger.is_symlink():
            note_written(folder, [path.relative_to(folder).as_posix()])
            return


def note_written(out: Path, names) -> None:
    """Add paths (relative to ``out``) to the folder's ledger of campaign files, before they are written."""
    known = set(read_ledger(out))
    new = [str(n) for n in names if str(n) not in known]
    if new:
        refuse_symlink(out / LEDGER_NAME)
        with open(out / LEDGER_NAME, "a", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in new))
            f.flush()


def read_ledger(folder: str | Path) -> list[str]:
    """The relative paths ``folder``'s ledger lists (none when it has no ledger, or a symlinked one)."""
    path = Path(folder) / LEDGER_NAME
    if not path.is_file() or path.is_symlink():
        return []
    names = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return list(dict.fromkeys(n for n in names if n and not n.startswith("/") and ".." not in Path(n).parts))


def temp_target(name: str) -> str | None:
    """The file a temporary file of an atomic write was to become (``.x.png.rvtc-ab12cd34.tmp`` -> ``x.png``),
    None for any other name."""
    match = _TEMP.match(name) or _LEGACY_TEMP.match(name)
    return match.group("target") if match else None


def is_own_temp(root: str | Path, path: str | Path) -> bool:
    """Whether ``path`` is a temporary file robustvtc left in ``root`` (a kill during an atomic write): its
    name has robustvtc's pattern and the file it was to become is in ``root``'s ledger."""
    root, path = Path(root), Path(path)
    target = temp_target(path.name)
    if target is None or path.is_symlink() or not path.is_file():
        return False
    try:
        name = (path.parent / target).relative_to(root).as_posix()
    except ValueError:
        return False
    return name in read_ledger(root) or (name == "manifest.json" and _LEGACY_TEMP.match(path.name) is not None)


def remove_stale_temps(root: str | Path, folders=("", "examples", "images", "report", "report/tables")) -> list[Path]:
    """Remove the temporary files robustvtc's killed atomic writes left in ``root`` and its ``folders``
    (:func:`is_own_temp`); nothing else. Returns what it removed."""
    root = Path(root)
    removed = []
    for folder in folders:
        where = root / folder
        if where.is_symlink() or not where.is_dir():
            continue
        for path in where.iterdir():
            if is_own_temp(root, path):
                path.unlink()
                removed.append(path)
    return removed


_ATOMIC_WRITES = [0]


def _test_crash_in_atomic_write(fd: int, data: bytes) -> None:
    """ROBUSTVTC_TEST_CRASH=atomic:N: SIGKILL halfway through the N-th atomic write (the crash tests)."""
    mode, _, n = os.environ.get("ROBUSTVTC_TEST_CRASH", "").partition(":")
    if mode != "atomic" or not n.isdigit():
        return
    _ATOMIC_WRITES[0] += 1
    if _ATOMIC_WRITES[0] == int(n):
        import signal

        os.write(fd, data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


def _temp_file(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp", dir=path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, note: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename; noted in the
    enclosing campaign folder's ledger first unless ``note=False`` (a caller that noted it already)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_symlink(path)
    if note:
        note_in_ledger(path)
    fd, tmp = _temp_file(path)
    try:
        _test_crash_in_atomic_write(fd, data)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class FolderLock:
    """Exclusive lock on an output folder: ``with FolderLock(out, log):``. See the module docstring."""

    def __init__(self, folder: str | Path, log: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.log = log
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        import fcntl

        refuse_symlink(self.path)
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise UserInputError(f"{self.folder} is being written by {holder} (lock {self.path}); accepted: "
                                     "wait for it to finish, or another output folder") from None
            try:  # the file we locked must still be the lock file (a releasing holder unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = os.read(fd, 4096).decode("utf-8", "replace").strip()
            if previous and self.log is not None:
                self.log(f"taking over the stale lock {self.path} of {previous} (no longer running)")
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise UserInputError(f"{self.path}: could not take the lock; accepted: retry")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int, wait: float = 1.0) -> str:
    """"pid N on HOST" from a lock file another process holds; the holder writes it just after taking the lock,
    so an empty file is read again for up to ``wait`` seconds."""
    import time

    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if text or time.monotonic() > deadline:
            return text or "another process"
        time.sleep(0.02)


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock now ("pid N on HOST"), or None when nobody does (stale files included)."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(fd)
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- YAML
def load_yaml(path: str | Path, text: str | None = None) -> Any:
    """A YAML document, refusing oversized files, alias bombs and duplicate keys (one line naming them)."""
    import yaml

    path = Path(path)
    if text is None:
        size = path.stat().st_size
        if size > YAML_MAX_BYTES:
            raise UserInputError(f"{path}: {size} bytes; accepted: a scenario file under {YAML_MAX_BYTES} bytes")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserInputError(f"{path}: not UTF-8 text (byte {exc.start}); accepted: a UTF-8 YAML file") from None

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # SafeLoader reports it
                if key in seen:
                    raise UserInputError(f"{path}: line {key_node.start_mark.line + 1}: key {key!r} given twice "
                                         f"(first on line {seen[key] + 1}); accepted: each key once")
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _bounded(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserInputError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()


def _bounded(root, path: Path) -> None:
    """Refuse a document whose aliases expand to more than YAML_MAX_NODES nodes (without expanding them)."""
    import yaml

    sizes: dict[int, int] = {}
    # iterative post-order: size(node) = 1 + sum of its children's sizes, each shared node counted every time
    stack = [(root, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in sizes:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if ready:
            sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in children), YAML_MAX_NODES + 1)
            if sizes[id(node)] > YAML_MAX_NODES:
                raise UserInputError(f"{path}: line {node.start_mark.line + 1}: aliases expand to more than "
                                     f"{YAML_MAX_NODES} values; accepted: a scenario without alias chains")
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


# ---------------------------------------------------------------------------------------------- tables
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (``=cmd|calc``) gets a leading apostrophe; numbers
    (negative ones included) are left alone."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value
    return value


def write_csv(table, path: str | Path) -> Path:
    """A DataFrame as CSV with neutralised formula cells, written atomically."""
    safe = table.copy()
    for col in safe.columns:
        if getattr(safe[col].dtype, "kind", "O") not in "biufcmM":  # text columns (object or string dtype)
            safe[col] = safe[col].map(csv_cell)
    safe.columns = [csv_cell(str(c)) for c in safe.columns]
    return atomic_write_text(path, safe.to_csv(index=False))


def md_cell(value: Any) -> str:
    """Text safe in a Markdown table cell: HTML special characters escaped, pipes and newlines neutralised."""
    import html

    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def md_text(value: Any) -> str:
    """Markdown with every HTML tag neutralised (``<script>`` -> ``&lt;script>``): what a viewer renders from a
    label cannot run. Comparisons like ``a < b`` are left alone."""
    import re

    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", str(value))
