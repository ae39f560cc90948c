"""A campaign's files as data: the record key, results.jsonl (append-only, one record per line, a torn last
line repaired), the keys of the examples sidecar, and manifest.json. Whatever reads or appends campaign
output goes through here; nothing here imports torch."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserInputError
from ..safe_io import refuse_symlink

KEY_FIELDS = ("sample", "attack", "eps", "compressor", "budget", "defense", "adaptive")


CLEAN = "clean"


NONE = "none"


RESULTS, MANIFEST, EXAMPLES, IMAGES = "results.jsonl", "manifest.json", "examples", "images"


def record_key(record: dict) -> tuple:
    return tuple(record[k] for k in KEY_FIELDS)


EXAMPLE_KEY = ("sample", "attack", "eps", "compressor", "budget")


def example_key(entry: dict) -> tuple:
    return tuple(entry.get(k) for k in EXAMPLE_KEY)


def read_example_keys(path: Path, repair: bool = False) -> set[tuple]:
    """The keys of examples.jsonl's entries; a torn last line (killed mid-write) is skipped, or cut off the
    file with ``repair``, so entries appended after it stay one per line."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    keys = set()
    lines = raw.split(b"\n")
    for line in lines[:-1]:  # complete lines (a line is complete once its newline is written)
        try:
            entry = json.loads(line) if line.strip() else None
            keys.add(example_key(entry))
        except (ValueError, UnicodeDecodeError, TypeError, AttributeError):
            continue  # not an entry: the report skips it too
    if repair and lines[-1]:
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(lines[-1]))
    return keys


class ResultsWriter:
    """Appends records to results.jsonl, one ``write`` + flush per record (a kill loses only the one in flight).
    Never through a symlink (O_NOFOLLOW)."""

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if Path(path).is_symlink():
                refuse_symlink(path)
            raise UserInputError(f"cannot write {path}: {exc.strerror}; accepted: a writable output folder") from None
        self.file = os.fdopen(fd, "a", encoding="utf-8")
        self._crash = _test_crash()

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self._crash is not None:
            self._crash.record(self.file, line)
        self.file.write(line)
        self.file.flush()

    def close(self) -> None:
        os.fsync(self.file.fileno())
        self.file.close()


class _TestCrash:
    """ROBUSTVTC_TEST_CRASH=after:N (SIGKILL once N records are written by this process) or mid:N (SIGKILL
    halfway through writing record N): the crash tests' way of killing a campaign at a chosen moment."""

    def __init__(self, mode: str, n: int):
        self.mode, self.n, self.count = mode, n, 0

    def record(self, file, line: str) -> None:
        import signal

        self.count += 1
        if self.mode == "mid" and self.count == self.n:
            file.write(line[:max(1, len(line) // 2)])
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "after" and self.count == self.n + 1:
            os.kill(os.getpid(), signal.SIGKILL)


def _test_crash() -> _TestCrash | None:
    value = os.environ.get("ROBUSTVTC_TEST_CRASH", "")
    mode, _, n = value.partition(":")
    return _TestCrash(mode, int(n)) if mode in ("after", "mid") and n.isdigit() else None


# the fields every record has (a results.jsonl whose lines lack them is not robustvtc's)


REQUIRED_FIELDS = (*KEY_FIELDS, "correct", "clean_correct", "full_token_correct")
# records of other kinds ("kind" field) and the fields they all have: encoder-only campaigns ask no question
REQUIRED_BY_KIND = {"encoder": (*KEY_FIELDS, "kept_disruption", "kept_overlap", "full_token_disruption")}


def required_fields(record: dict) -> tuple[str, ...]:
    """The fields a record of its kind must have (a record without ``kind``: a full campaign's)."""
    return REQUIRED_BY_KIND.get(record.get("kind"), REQUIRED_FIELDS)


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """Every complete record of a results.jsonl; a torn last line (killed mid-write) is ignored, or cut
    off the file with ``repair``. Later duplicates of a key (a resumed unit) replace earlier ones. A line that
    is not a robustvtc record (not JSON, not an object, lacking a key field) is one error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records: dict[tuple, dict] = {}
    good = 0
    lines = raw.split(b"\n")
    accepted = "a results.jsonl written by robustvtc run"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number < len(lines) - 1:
                raise UserInputError(f"{path} line {number} is not a JSON record; accepted: {accepted}") from None
            break  # torn last line
        if not isinstance(record, dict):
            raise UserInputError(f"{path} line {number} is a JSON {type(record).__name__}, not a record; "
                                 f"accepted: {accepted}")
        missing = [k for k in required_fields(record) if k not in record]
        if missing:
            raise UserInputError(f"{path} line {number} lacks the field(s) {', '.join(missing)}; accepted: {accepted}")
        try:
            records[record_key(record)] = record
        except TypeError:
            raise UserInputError(f"{path} line {number}: a key field is a list or mapping; accepted: {accepted}") \
                from None
        good += len(line) + 1
    if repair and good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(min(good, len(raw)))
    return list(records.values())


def read_manifest(out: str | Path) -> dict | None:
    """The campaign's manifest.json, None when there is none; a corrupt one is one line naming the way out."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(
            f"{path} is not a valid manifest ({str(exc).splitlines()[0][:80]}; cut short by a crash?); accepted: "
            f"`robustvtc rebuild-manifest SCENARIO -o {Path(out)}` rebuilds it from the scenario and the records "
            "(then --resume), or --overwrite to start again") from None


def png_bytes(image) -> bytes:
    """(3, H, W) in [0, 1] -> an 8-bit PNG file's bytes (rounded: the PNG is a quantised copy of a float image);
    what the runner writes, or a worker ships to it."""
    import io

    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
