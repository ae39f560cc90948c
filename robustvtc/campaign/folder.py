"""The output folder of a campaign: what may be written where, and what a campaign wrote.

A campaign writes only into its folder, never through a symlink, beside foreign files only when told, and
lists every file it writes in the folder's ledger before writing it, so ``--overwrite`` removes exactly
those. ``--resume`` continues a campaign only when the keys that change records and the data's contents are
those it started with; a mismatch names what changed.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import UserInputError
from ..safe_io import LEDGER_NAME, LOCK_NAME, is_own_temp, read_ledger, refuse_symlink, remove_stale_temps
from .records import EXAMPLES, IMAGES, MANIFEST, RESULTS, read_manifest
from .scenario import NOT_HASHED, Scenario

OWN = (RESULTS, MANIFEST, LEDGER_NAME, LOCK_NAME)


def changed_keys(old: dict, new: dict) -> list[str]:
    """Record-relevant scenario keys whose value differs between two resolved scenarios."""
    def where_free(scenario: dict) -> dict:  # where the data lies is not hashed (its contents are compared)
        data = scenario.get("data")
        return {**scenario, "data": {**data, "path": None, "image_root": None}} if isinstance(data, dict) else scenario
    old, new = where_free(old), where_free(new)
    keys = sorted((set(old) | set(new)) - set(NOT_HASHED))
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]


def check_resume(out: Path, previous: dict, scenario: Scenario, data: dict | None) -> None:
    """Refuse to resume a campaign whose record-relevant keys or data contents changed, naming what changed."""
    unhashed = f"(keys that do not change records and may change: {', '.join(NOT_HASHED)})"
    if previous.get("scenario_hash") not in (scenario.hash(), scenario.hash(paths=True)):
        changed = changed_keys(previous.get("scenario") or {}, scenario.to_dict()) if previous.get("scenario") else []
        what = f"changed: {', '.join(changed)}" if changed else f"scenario hash {previous.get('scenario_hash')}, now " \
                                                                 f"{scenario.hash()}"
        raise UserInputError(f"{out} holds a campaign of a different scenario ({what}) {unhashed}; accepted: the same "
                             "scenario and overrides, a new output folder, or --overwrite")
    old = previous.get("data")
    if data is None or not isinstance(old, dict):
        return  # a manifest without a data fingerprint (older robustvtc, the pytest plugin's)
    if old.get("rows") != data.get("rows"):
        raise UserInputError(f"{out}: the rows of {scenario.data.path} (ids, questions, answers) changed since the "
                             "campaign started; accepted: the data it started with, a new output folder, or --overwrite")
    files = data.get("image_files") or {}
    old_images, new_images = old.get("images") or {}, data.get("images") or {}
    if "image_files" not in old:  # robustvtc before images were keyed by sample: by path
        new_images = {files.get(sample, sample): digest for sample, digest in new_images.items()}
    for key in sorted(set(old_images) | set(new_images)):
        if old_images.get(key) != new_images.get(key):
            what = f"sample {key}'s image {files[key]}" if key in files else f"image {key}"
            raise UserInputError(f"{out}: {what} changed since the campaign started; accepted: the data it "
                                 "started with, a new output folder, or --overwrite")


def check_folder(out: Path, scenario: Scenario, resume: bool, overwrite: bool, allow_existing: bool) -> dict | None:
    """Whether ``out`` may be written as asked (read-only); returns the previous manifest to continue, if any."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output {out} is a file; accepted: a folder (new, empty, or holding a campaign)")
    for name in (*OWN, EXAMPLES, IMAGES, "report"):
        refuse_symlink(out / name)
    if not out.is_dir():
        return None
    manifest_file = out / MANIFEST
    if manifest_file.exists():
        try:
            previous = read_manifest(out)
        except UserInputError:
            if overwrite:
                return None  # what it wrote is in the ledger
            raise
        if resume:
            return previous
        if overwrite:
            return None
        raise UserInputError(f"{out} already holds a campaign; accepted: --resume to continue it, --overwrite "
                             "to start again, or another output folder")
    results = out / RESULTS
    ours = set(read_ledger(out))
    if results.is_file() and results.stat().st_size > 0 and not (overwrite and RESULTS in ours):
        raise UserInputError(f"{out} holds {RESULTS} but no {MANIFEST}, so robustvtc cannot tell what wrote the "
                             f"records; accepted: `robustvtc rebuild-manifest SCENARIO -o {out}` (then --resume), "
                             "another output folder, or move the file away")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN and p.name not in ours
                     and not is_own_temp(out, p))
    if foreign and not allow_existing:
        raise UserInputError(f"{out} holds files that no robustvtc campaign wrote ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); accepted: a new or empty folder, or "
                             "--allow-existing-files to write the campaign beside them")
    if foreign:
        clash = [n for n in (RESULTS, f"{EXAMPLES}/examples.jsonl", "report/report.html", "report/summary.md")
                 if (out / n).exists() and n not in ours]
        if clash:
            raise UserInputError(f"{out}: {clash[0]} exists and was not written by robustvtc; robustvtc would "
                                 "overwrite it; accepted: move it away or another output folder")
    return None


REPORT_FILES = ("report.html", "summary.md")


def report_root(results: str | Path, out: str | Path) -> Path:
    """The folder whose lock and ledger cover a report written to ``out``: the campaign folder ``results``
    when ``out`` lies in it (``results/report`` by default), else ``out`` itself (``robustvtc report -o``)."""
    results, out = Path(results), Path(out)
    a, b = os.path.normpath(results.absolute()), os.path.normpath(out.absolute())
    return results if b == a or b.startswith(a.rstrip(os.sep) + os.sep) else out


def check_report_folder(results: str | Path, out: str | Path, names=REPORT_FILES, prepare: bool = False) -> Path:
    """Refuse (one line naming it) to write a report through a symlink -- a folder between the campaign
    folder and the files, or a file -- or over a file of ``names`` (relative to ``out``) that robustvtc did
    not write (the ledger says; a pre-ledger campaign's fixed names count as its own). With ``prepare``
    (under the lock): create the folders and the ledger, and remove temporary files a kill left. Returns
    the folder the report's lock and ledger belong to (:func:`report_root`)."""
    results, out = Path(results), Path(out)
    root = report_root(results, out)
    inner = Path(os.path.relpath(os.path.normpath(out.absolute()), os.path.normpath(root.absolute())))
    folder = root
    for part in [p for p in inner.parts if p != "."]:
        folder = folder / part
        refuse_symlink(folder)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"report folder {out} is a file; accepted: a folder")
    ledger, legacy = set(read_ledger(root)), (root / MANIFEST).is_file() and not (root / LEDGER_NAME).exists()
    for name in names:
        path = out / name
        for parent in list(Path(name).parents)[:-1]:
            refuse_symlink(out / parent)
        refuse_symlink(path)
        rel = os.path.normpath(os.path.relpath(path.absolute(), root.absolute())).replace(os.sep, "/")
        if path.exists() and rel not in ledger and not (legacy and _LEGACY.match(rel)):
            raise UserInputError(f"{path} exists and was not written by robustvtc; the report would overwrite it; "
                                 "accepted: move it away, or another report folder (-o)")
    if prepare:
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
        refuse_symlink(root / LEDGER_NAME)
        if not (root / LEDGER_NAME).exists() and not (root / MANIFEST).is_file():
            (root / LEDGER_NAME).touch()  # a ledger, so the next report knows its own files
        remove_stale_temps(root, sorted({(inner / Path(n).parent).as_posix() for n in names}))
    return root


# what campaigns of robustvtc before the ledger wrote (a manifest without "files", no ledger)


_LEGACY = re.compile(r"^(results\.jsonl|manifest\.json|examples/examples\.jsonl|examples/.+_(clean|eps[0-9.]+)\.png|"
                     r"images/.+_eps[0-9.]+_.+_vs-.+\.png|report/(report\.html|summary\.md|tables/[a-z_]+\.csv))$")


def legacy_files(out: Path) -> list[str]:
    """The files in ``out`` a campaign of robustvtc before the ledger wrote (their fixed names and patterns)."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.is_symlink()
                  and _LEGACY.match(p.relative_to(out).as_posix()))


def clear(out: Path) -> None:
    """Remove exactly the files campaigns wrote in ``out`` (its ledger and manifest's list), nothing else;
    folders only when that leaves them empty."""
    remove_stale_temps(out)
    names = set(read_ledger(out))
    try:
        manifest = read_manifest(out) or {}
    except UserInputError:
        manifest = {}
    names |= {n for n in manifest.get("files", []) if isinstance(n, str) and ".." not in Path(n).parts}
    if not names and manifest:  # a campaign from before the ledger: its fixed names and patterns
        names = set(legacy_files(out))
    names.add(MANIFEST)
    for name in sorted(names, key=lambda n: -n.count("/")):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    for folder in ("report/tables", "report", EXAMPLES, IMAGES):
        try:
            (out / folder).rmdir()
        except OSError:
            pass  # not empty (user files) or absent
    (out / LEDGER_NAME).unlink(missing_ok=True)
