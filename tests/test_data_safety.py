"""Nothing a user has is lost: crash-and-resume at random moments, bad inputs (exit 2, one line, nothing
written), --overwrite next to foreign files, one writer per folder, atomic files, safe tables."""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from robustvtc.campaign import parse_scenario, read_records, record_key, run_campaign
from robustvtc.campaign.runner import rebuild_manifest
from robustvtc.safe_io import LEDGER_NAME
from robustvtc.cli import main
from robustvtc.errors import UserInputError
from robustvtc.safe_io import LOCK_NAME, FolderLock, csv_cell, lock_holder, md_cell

BASE = {"compressors": ["fastervlm"], "budgets": [16], "samples": 3, "batch_size": 1, "steps": 1,
        "attacks": ["fulltoken"], "examples": 1}  # 3 chunks x (clean + fulltoken) x 2 cells = 12 records


def _strip(records):
    return {record_key(r): {k: v for k, v in r.items() if k != "seconds"} for r in records}


# ---------------------------------------------------------------------------------------------- crash and resume
def _killed_run(out, env_value, adapter, spec=BASE):
    os.environ["ROBUSTVTC_TEST_CRASH"] = env_value
    try:
        run_campaign(parse_scenario(spec), output=out, adapter=adapter, quiet=True)
    finally:
        os._exit(0)  # reached only when the crash point was never hit


def _kill(out, crash, adapter, spec=BASE):
    child = multiprocessing.get_context("fork").Process(target=_killed_run, args=(out, crash, adapter, spec))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, (crash, child.exitcode)


def _temps(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if ".rvtc-" in p.name)


def _example_lines(out: Path) -> list[tuple]:
    path = out / "examples" / "examples.jsonl"
    return [tuple(json.loads(line)[k] for k in ("sample", "attack", "eps", "compressor", "budget"))
            for line in path.read_text().splitlines()]


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_records(tiny_adapter, tmp_path):
    """SIGKILL between units, inside a unit (between two of its records), halfway through writing a record,
    and halfway through an atomic write (manifest or PNG), at seeded random moments; --resume always ends
    with exactly the uninterrupted records, one examples entry per key and no temporary file left.
    (Supersedes the subprocess kill test of test_campaign_runner: the same kill, three process start-ups less.)"""
    reference = run_campaign(parse_scenario(BASE), output=tmp_path / "ref", adapter=tiny_adapter, quiet=True)
    expected = _strip(read_records(reference / "results.jsonl"))
    assert len(expected) == 12  # 6 units (3 chunks x clean, fulltoken) of 2 records: a unit ends at every even N
    rng = random.Random(int(os.environ.get("ROBUSTVTC_CRASH_SEED", "18")))
    trials = int(os.environ.get("ROBUSTVTC_CRASH_TRIALS", "6"))
    modes = ["after", "mid", "atomic"]
    outcomes = []
    for trial in range(trials):
        mode = modes[trial % 3]  # every kind of moment is covered, the moment itself is random
        if mode == "after":  # alternately between two units (N even) and inside one (N odd)
            n = 2 * rng.randint(1, 5) + (trial // 3) % 2
        else:  # atomic writes: 1 the first manifest, 2-3 the example PNGs, 4 the last manifest
            n = rng.randint(1, 4) if mode == "atomic" else rng.randint(1, 11)
        out = tmp_path / f"trial{trial}"
        _kill(out, f"{mode}:{n}", tiny_adapter)
        results = out / "results.jsonl"
        partial = results.read_bytes() if results.exists() else b""
        if mode == "mid":
            assert partial and not partial.endswith(b"\n")  # really killed inside a line
        if mode == "after":
            assert partial.count(b"\n") == n
            assert json.loads((out / "manifest.json").read_text())["status"] == "running"  # no chance to record
        messages = []
        run_campaign(parse_scenario(BASE), output=out, adapter=tiny_adapter, quiet=True, resume=True,
                     log=messages.append)
        assert any("stale lock" in m for m in messages), messages  # the dead writer's lock was taken over
        lines = results.read_text().splitlines()
        assert _strip(read_records(results)) == expected, (mode, n)
        assert len(lines) == len(expected) and all(json.loads(line) for line in lines)  # no duplicate, no torn
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["records"] == 12
        assert not (out / LOCK_NAME).exists()
        assert _example_lines(out) == _example_lines(reference), (mode, n)  # one entry per key
        assert _temps(out) == [], (mode, n)  # a killed atomic write's temporary file is cleaned
        outcomes.append((mode, n, len(partial.splitlines())))
    assert len(outcomes) == trials
    if trials >= 6:
        assert {n % 2 for mode, n, _ in outcomes if mode == "after"} == {0, 1}  # between and inside units


def test_resume_after_a_kill_inside_the_examples_unit_keeps_one_example_per_key(tiny_adapter, tmp_path):
    """The unit that writes the report's kept-token examples is killed after writing them (and with a torn
    examples line): the resumed unit writes them again, examples.jsonl still holds each key once."""
    reference = run_campaign(parse_scenario(BASE), output=tmp_path / "ref", adapter=tiny_adapter, quiet=True)
    out = tmp_path / "out"
    _kill(out, "after:3", tiny_adapter)  # clean unit of chunk 0 (2 records), then 1 of the fulltoken unit's 2
    assert _example_lines(out) == _example_lines(reference)
    with open(out / "examples" / "examples.jsonl", "a") as f:
        f.write('{"sample": 0, "attack": "fullto')  # as if killed halfway through the line
    from robustvtc.campaign.report import _example_entries

    assert len(_example_entries(out / "examples")) == 1  # a report of the killed campaign reads past it
    run_campaign(parse_scenario(BASE), output=out, adapter=tiny_adapter, quiet=True, resume=True)
    assert _example_lines(out) == _example_lines(reference)
    assert (out / "examples" / "examples.jsonl").read_text().endswith("}\n")


@pytest.mark.parametrize("how", ["resume", "overwrite"])
def test_temporary_files_of_a_killed_write_are_removed_and_only_they(how, tiny_adapter, tmp_path):
    out = tmp_path / "out"
    _kill(out, "atomic:2", tiny_adapter)  # halfway through writing examples/0_clean.png
    left = _temps(out)
    assert len(left) == 1 and left[0].startswith("examples/.0_clean.png.rvtc-"), left
    users = {"examples/.holiday.png.rvtc-abcd1234.tmp": b"not ours: holiday.png is in no ledger",
             "examples/notes.tmp": b"mine", ".manifest.json.tmp": b"mine too"}
    for name, data in users.items():
        (out / name).write_bytes(data)
    run_campaign(parse_scenario(BASE), output=out, adapter=tiny_adapter, quiet=True, **{how: True})
    assert _temps(out) == ["examples/.holiday.png.rvtc-abcd1234.tmp"]
    for name, data in users.items():
        assert (out / name).read_bytes() == data, name
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


# ---------------------------------------------------------------------------------------------- bad inputs
def _png(path: Path, size=(40, 40), colour=(200, 30, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def _bomb_png(path: Path) -> Path:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def _mc(root: Path, rows=None, images=("a.png", "b.png")) -> Path:
    for name in images:
        if not (root / name).exists():
            _png(root / name)
    rows = rows or [{"id": f"q{i}", "image": name, "question": "What colour?", "options": ["red", "blue"],
                     "answer": 0} for i, name in enumerate(images)]
    path = root / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scenario(root: Path, tiny_model_dir, **changes) -> Path:
    doc = {**BASE, "model": str(tiny_model_dir), "samples": 2, **changes}
    path = root / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _records_folder(root: Path, lines: list[str]) -> Path:
    folder = root / "foreign"
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def _file_data(root, tiny_model_dir, image_writer):
    image_writer(root / "b.png")
    _mc(root)
    return ["run", str(_scenario(root, tiny_model_dir, data={"source": "multiple_choice", "path": "mc.jsonl"}))]


def _held_lock(root, tiny_model_dir):
    out = root / "out"
    lock = FolderLock(out).acquire()
    root.joinpath("keep").write_text("")  # the lock stays held for the test's duration
    _held_lock.locks.append(lock)
    return ["run", str(_scenario(root, tiny_model_dir)), "-o", str(out)]


_held_lock.locks = []


def _truncated(path):
    _png(path, (200, 200))
    path.write_bytes(path.read_bytes()[:300])


def _symlinked_results(root, tiny_model_dir):
    elsewhere = root / "elsewhere.txt"
    elsewhere.write_text("my notes, one line")
    (root / "out").mkdir()
    (root / "out" / "results.jsonl").symlink_to(elsewhere)
    return ["run", str(_scenario(root, tiny_model_dir)), "-o", str(root / "out"), "--resume"]


def _foreign_results(root, tiny_model_dir):
    (root / "out").mkdir()
    (root / "out" / "results.jsonl").write_text("not json at all")
    return ["run", str(_scenario(root, tiny_model_dir)), "-o", str(root / "out")]


def _foreign_report(root, tiny_model_dir):
    (root / "out" / "report").mkdir(parents=True)
    (root / "out" / "report" / "report.html").write_text("<p>my own report</p>")
    return ["run", str(_scenario(root, tiny_model_dir)), "-o", str(root / "out")]


def _corrupt_manifest(root, tiny_model_dir):
    (root / "out").mkdir()
    (root / "out" / "manifest.json").write_text('{"format": "robustvtc-campaign/1", "scen')
    (root / "out" / "results.jsonl").write_text("")
    return ["run", str(_scenario(root, tiny_model_dir)), "-o", str(root / "out"), "--resume"]


def _corrupt_manifest_with_records(root):
    (root / "out").mkdir()
    (root / "out" / "manifest.json").write_text('{"format": "robustvtc-campaign/1", "scen')
    (root / "out" / "results.jsonl").write_text(json.dumps(RECORD) + "\n")
    return root / "out"


RECORD = {"sample": 0, "attack": "clean", "eps": 0.0, "compressor": "none", "budget": 144, "defense": "none",
          "adaptive": False, "correct": True, "clean_correct": True, "full_token_correct": True}


def _records_without_manifest(root, tiny_model_dir):
    (root / "out").mkdir()
    (root / "out" / "results.jsonl").write_text(json.dumps(RECORD) + "\n")
    return ["run", str(_scenario(root, tiny_model_dir)), "-o", str(root / "out"), "--set", "attacks.0.steps=3"]


def _alias_bomb(root, tiny_model_dir):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, (prev, name) in enumerate(zip("abcdefgh", "bcdefghi")):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    path = root / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    return ["validate", str(path)]


BAD = {  # case -> (arguments maker, what the one line must name)
    "scenario not UTF-8": (lambda r, m: ["validate", str(_write(r / "s.yaml", b"name: caf\xe9\n"))], "s.yaml: not UTF-8"),
    "data not UTF-8": (lambda r, m: ["run", str(_scenario(r, m, data={"source": "vqa_jsonl", "path": str(
        _write(r / "d.jsonl", b'{"question": "caf\xe9"}\n'))}))], "d.jsonl: not UTF-8"),
    "lambda_rda abc": (lambda r, m: ["validate", str(_scenario(r, m, attacks=[{"name": "cage", "lambda_rda": "abc"}]))],
                       "attacks[0].lambda_rda: 'abc' is not a number"),
    "device quantum": (lambda r, m: ["validate", str(_scenario(r, m, device="quantum"))], "device: 'quantum'"),
    "device cuda without CUDA": (lambda r, m: ["run", str(_scenario(r, m)), "--device", "cuda"], "no usable CUDA"),
    "unknown model_kwargs key": (lambda r, m: ["run", str(_scenario(r, m, model_kwargs={"bogus_option": 1}))],
                                 "model_kwargs: "),
    "image_size -5": (lambda r, m: ["validate", str(_scenario(r, m, model_kwargs={"image_size": -5}))],
                      "model_kwargs.image_size: -5"),
    "image_size below the patch": (lambda r, m: ["run", str(_scenario(r, m, model_kwargs={"image_size": 5}))],
                                   "model_kwargs.image_size: 5 is below the model's patch size"),
    "truncated PNG": (lambda r, m: _file_data(r, m, _truncated), "b.png: cannot decode the image"),
    "PNG header 100000x100000": (lambda r, m: _file_data(r, m, _bomb_png), "b.png: too many pixels"),
    "image not an image": (lambda r, m: _file_data(r, m, lambda p: p.write_text("hello")), "b.png is not an image"),
    "LLaVA config without weights": (lambda r, m: ["run", str(_scenario(r, _weightless(r, m)))],
                                     "cannot load the model from"),
    "report: records without sample": (lambda r, m: ["report", str(_records_folder(r, ['{"a": 1}']))],
                                       "line 1 lacks the field(s) sample"),
    "report: records that are lists": (lambda r, m: ["report", str(_records_folder(r, ["[1, 2]"]))],
                                       "line 1 is a JSON list"),
    "report: records without correct": (lambda r, m: ["report", str(_records_folder(r, [json.dumps(
        {"sample": 0, "attack": "clean", "eps": 0, "compressor": "none", "budget": 1, "defense": "none",
         "adaptive": False})]))], "lacks the field(s) correct"),
    "report: non-JSON manifest": (lambda r, m: ["report", str(_corrupt_manifest_with_records(r))],
                                  "manifest.json is not a valid manifest"),
    "run: non-JSON manifest": (_corrupt_manifest, "robustvtc rebuild-manifest"),
    "YAML key twice": (lambda r, m: ["validate", str(_write(r / "s.yaml", b"compressors: [none]\nbudgets: [16]\n"
                                                             b"attacks: [fulltoken]\nsamples: 2\nsamples: 3\n"))],
                       "line 5: key 'samples' given twice (first on line 4)"),
    "YAML alias bomb": (_alias_bomb, "aliases expand to more than"),
    "YAML too large": (lambda r, m: ["validate", str(_write(r / "big.yaml", b"# " + b"x" * (2 << 20)))],
                       "bytes; accepted: a scenario file under"),
    "name ../../x": (lambda r, m: ["validate", str(_scenario(r, m, name="../../x"))], "name: '../../x' holds a path"),
    "duplicate sample ids": (lambda r, m: ["run", str(_scenario(r, m, data={"source": "multiple_choice",
                                                                            "path": str(_mc(r, _dup_rows(r)))}))],
                             "mc.jsonl:1 and "),
    "data row without question": (lambda r, m: ["run", str(_scenario(r, m, data={"source": "multiple_choice", "path": str(
        _mc(r, [{"image": "a.png", "options": ["x", "y"], "answer": 0}]))}))], "mc.jsonl:1: field 'question' missing"),
    "results.jsonl is a symlink": (_symlinked_results, "results.jsonl is a symbolic link"),
    "foreign results.jsonl, no manifest": (_foreign_results, "holds results.jsonl but no manifest.json"),
    "foreign report/report.html": (_foreign_report, "holds files that no robustvtc campaign wrote (report)"),
    "records but no manifest, changed option": (_records_without_manifest, "holds results.jsonl but no manifest"),
    "second writer": (_held_lock, f"is being written by pid {os.getpid()}"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _weightless(root: Path, tiny_model_dir: Path) -> Path:
    folder = root / "weightless"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    return folder


def _dup_rows(root):
    _png(root / "a.png")
    return [{"id": "same", "image": "a.png", "question": "Q?", "options": ["x", "y"], "answer": 0}] * 2


def _one_line_error(args: list[str], expected: str) -> str:
    """Invoke the CLI (releasing any lock an arrangement holds) and check it refused in one line: exit 2, no
    traceback, ``expected`` in the line. Returns the line."""
    try:
        result = CliRunner().invoke(main, args)
    finally:
        for lock in _held_lock.locks:
            lock.release()
        _held_lock.locks.clear()
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*")) if p.name != LOCK_NAME}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_model_dir, tmp_path, monkeypatch):
    import torch

    if case == "device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make, expected = BAD[case]
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.chdir(root)  # the default output folder (runs/<name>) would land here
    args = make(root, tiny_model_dir)
    before = _snapshot(tmp_path)
    line = _one_line_error([*args, *(["-q", "--no-report"] if args[0] == "run" else [])], expected)
    assert "import " not in line and ".convert(" not in line
    assert _snapshot(tmp_path) == before  # nothing written, changed or deleted, anywhere


def test_cmyk_jpeg_and_16_bit_png_are_converted(tmp_path):
    import numpy as np
    from PIL import Image

    from robustvtc.images import open_image

    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = np.asarray(open_image(tmp_path / "c.jpg"))
    assert red.shape == (20, 20, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "g.png")
    grey = np.asarray(open_image(tmp_path / "g.png"))
    assert grey.shape == (8, 8, 3) and abs(int(grey[0, 0, 0]) - 128) <= 1


# ---------------------------------------------------------------------------------------------- folders
def test_overwrite_removes_only_campaign_files(tiny_adapter, tmp_path):
    s = parse_scenario({**BASE, "samples": 2, "save_images": True})
    out = run_campaign(s, output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    from robustvtc.campaign.report import write_report

    write_report(out, n_boot=10)
    ours = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"results.jsonl", "manifest.json", "report/report.html", "examples/examples.jsonl"} <= ours
    assert any(n.startswith("images/") for n in ours)
    foreign = {"examples/photo.png": b"photo", "images/holiday.png": b"holiday", "report/my_report.txt": b"mine",
               "notes.txt": b"notes"}
    for name, data in foreign.items():
        (out / name).write_bytes(data)
    run_campaign(s, output=out, adapter=tiny_adapter, quiet=True, overwrite=True)
    for name, data in foreign.items():
        assert (out / name).read_bytes() == data, name  # the user's files survive
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "results.jsonl" in manifest["files"]
    assert not any("photo" in n or "holiday" in n or "my_report" in n for n in manifest["files"])
    assert len(read_records(out / "results.jsonl")) == manifest["records_expected"]


def test_second_writer_is_refused_and_a_stale_lock_taken_over(tiny_adapter, tmp_path):
    out = tmp_path / "out"
    s = parse_scenario({**BASE, "samples": 1})
    with FolderLock(out):
        assert lock_holder(out) == f"pid {os.getpid()} on {__import__('socket').gethostname()}"
        with pytest.raises(UserInputError, match=f"is being written by pid {os.getpid()}"):
            run_campaign(s, output=out, adapter=tiny_adapter, quiet=True, allow_existing=True)
    assert not (out / LOCK_NAME).exists() and lock_holder(out) is None
    (out / LOCK_NAME).write_text("pid 999999 on elsewhere\n")  # its writer died: no flock held
    messages = []
    run_campaign(s, output=out, adapter=tiny_adapter, quiet=True, log=messages.append)
    assert any("taking over the stale lock" in m and "pid 999999" in m for m in messages)
    assert len(read_records(out / "results.jsonl")) == 4


def test_two_concurrent_processes_one_refused(tiny_adapter, tmp_path):
    """Two writers started together on one folder: one writes every record once, the other is refused."""
    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")

    def writer(i):
        try:
            run_campaign(parse_scenario(BASE), output=out, adapter=tiny_adapter, quiet=True, resume=True)
            outcome = "ok"
        except UserInputError as exc:
            outcome = f"refused: {exc}"
        (tmp_path / f"outcome{i}").write_text(outcome)
        os._exit(0)

    children = [context.Process(target=writer, args=(i,)) for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    outcomes = sorted((tmp_path / f"outcome{i}").read_text() for i in range(2))
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == len({record_key(json.loads(line)) for line in lines}) == 12  # nothing twice
    # the second either met the held lock, or came after the first finished and found nothing left to do
    assert outcomes[0] == "ok" and (outcomes[1] == "ok" or "is being written by pid" in outcomes[1]), outcomes


def test_resume_names_what_changed_data_contents_included(tiny_adapter, tmp_path):
    _mc(tmp_path)
    data = {"source": "multiple_choice", "path": str(tmp_path / "mc.jsonl")}
    s = parse_scenario({**BASE, "samples": 2, "data": data})
    out = run_campaign(s, output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    with pytest.raises(UserInputError, match=r"changed: attacks\) \(keys that do not change records and may change: "
                                             r"name, .*examples, threads"):
        run_campaign(parse_scenario({**BASE, "samples": 2, "data": data, "steps": 3}), output=out,
                     adapter=tiny_adapter, quiet=True, resume=True)
    _png(tmp_path / "b.png", colour=(10, 200, 10))  # same path, new contents
    with pytest.raises(UserInputError, match=r"image .*b\.png changed since the campaign started"):
        run_campaign(s, output=out, adapter=tiny_adapter, quiet=True, resume=True)
    _png(tmp_path / "b.png")
    rows = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()]
    rows[1]["answer"] = 1
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserInputError, match=r"the rows of .*mc\.jsonl .* changed"):
        run_campaign(s, output=out, adapter=tiny_adapter, quiet=True, resume=True)


def test_moved_data_folder_resumes_and_a_changed_byte_is_named(tiny_adapter, tmp_path):
    """--resume compares the data by content, not by where it lies: the same bytes in a moved folder continue
    a killed campaign (the manifest records each run's data path); one changed pixel is refused, naming the
    file."""
    from PIL import Image

    first, moved = tmp_path / "data", tmp_path / "moved" / "data"
    first.mkdir()
    _mc(first)

    def spec(folder):
        return {**BASE, "samples": 2, "data": {"source": "multiple_choice", "path": str(folder / "mc.jsonl")}}
    assert parse_scenario(spec(first)).hash() == parse_scenario(spec(moved)).hash()  # the path is out of the hash
    assert parse_scenario(spec(first)).hash() != parse_scenario(spec(first)).hash(paths=True)
    assert parse_scenario(BASE).hash() == parse_scenario(BASE).hash(paths=True)  # unchanged for synthetic data
    out = tmp_path / "out"
    _kill(out, "after:4", tiny_adapter, spec(first))  # sample q0 done, q1 not
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    run_campaign(parse_scenario(spec(moved)), output=out, adapter=tiny_adapter, quiet=True, resume=True)
    reference = run_campaign(parse_scenario(spec(moved)), output=tmp_path / "ref", adapter=tiny_adapter, quiet=True)
    assert _strip(read_records(out / "results.jsonl")) == _strip(read_records(reference / "results.jsonl"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == 8 and manifest["runs"][-1]["resumed_with"] == 4
    assert manifest["scenario"]["data"]["path"] == str(moved / "mc.jsonl")  # reproducibility: where it was read
    assert [r.get("data_path") for r in manifest["runs"]] == [str(first / "mc.jsonl"), str(moved / "mc.jsonl")]
    assert manifest["data"]["image_files"]["q1"] == str(moved / "b.png")
    image = Image.open(moved / "b.png").convert("RGB")
    image.putpixel((0, 0), (200, 30, 31))
    image.save(moved / "b.png")
    with pytest.raises(UserInputError, match=r"sample q1's image .*moved/data/b\.png changed since the campaign"):
        run_campaign(parse_scenario(spec(moved)), output=out, adapter=tiny_adapter, quiet=True, resume=True)


def test_rebuild_manifest_then_resume(tiny_adapter, tmp_path):
    s = parse_scenario({**BASE, "samples": 2})
    out = run_campaign(s, output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    expected = _strip(read_records(out / "results.jsonl"))
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (out / "manifest.json").write_text('{"cut sho')
    with pytest.raises(UserInputError, match="rebuild-manifest"):
        run_campaign(s, output=out, adapter=tiny_adapter, quiet=True, resume=True)
    with pytest.raises(UserInputError, match="records this scenario does not produce"):
        rebuild_manifest(parse_scenario({**BASE, "samples": 2, "compressors": ["visionzip"]}), output=out,
                         adapter=tiny_adapter)
    rebuild_manifest(s, output=out, adapter=tiny_adapter)
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    run_campaign(s, output=out, adapter=tiny_adapter, quiet=True, resume=True)
    assert _strip(read_records(out / "results.jsonl")) == expected
    assert (out / LEDGER_NAME).is_file()


def test_atomic_write_leaves_the_old_file_when_killed(tmp_path):
    from robustvtc.safe_io import atomic_write_text

    target = tmp_path / "manifest.json"
    target.write_text('{"old": true}')
    context = multiprocessing.get_context("fork")

    def write():
        os.environ["ROBUSTVTC_TEST_CRASH"] = "atomic:1"
        atomic_write_text(target, json.dumps({"new": "x" * 10000}))
        os._exit(0)
    child = context.Process(target=write)
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"old": True}
    atomic_write_text(target, '{"new": 1}')
    assert json.loads(target.read_text()) == {"new": 1}


def test_csv_and_markdown_cells_are_neutralised(tiny_adapter, tmp_path):
    assert csv_cell("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0" and csv_cell("@SUM(1)") == "'@SUM(1)"
    assert csv_cell("-3.5") == "-3.5" and csv_cell(-3.5) == -3.5 and csv_cell("+x") == "'+x"
    assert md_cell("<script>alert(1)</script>|x") == "&lt;script&gt;alert(1)&lt;/script&gt;\\|x"
    s = parse_scenario({**BASE, "samples": 1, "attacks": [{"name": "fulltoken", "label": "<script>x</script>"},
                                                          {"name": "fulltoken", "label": "=cmd|calc", "steps": 2}]})
    out = run_campaign(s, output=tmp_path / "out", adapter=tiny_adapter, quiet=True)
    from robustvtc.campaign.report import write_report

    paths = write_report(out, n_boot=10)
    summary = (out / "report" / "summary.md").read_text()
    assert "<script>" not in summary and "&lt;script&gt;" in summary
    cells = [c for csv in (out / "report" / "tables").glob("*.csv") for c in csv.read_text().split(",")]
    assert not any(c.strip('"').startswith("=cmd") for c in cells)
    assert any("'=cmd|calc" in c for c in cells)
    assert "<script>x</script>" not in paths["html"].read_text()


# ---------------------------------------------------------------------------------------------- reports
def test_run_writes_its_report_while_it_holds_the_folder_lock(tiny_model_dir, tmp_path, monkeypatch):
    """`robustvtc run` writes report/ before it releases the lock: a second writer cannot come in between."""
    import socket

    from robustvtc.campaign import report as R

    real, seen = R._write_report, []

    def spy(results, out, n_boot, seed, **given):
        seen.append(lock_holder(results))
        with pytest.raises(UserInputError, match="is being written by"):
            FolderLock(results).acquire()  # a second writer, now
        return real(results, out, 10, seed, **given)
    monkeypatch.setattr(R, "_write_report", spy)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(_scenario(tmp_path, tiny_model_dir, samples=1)), "-o", str(out), "-q"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert seen == [f"pid {os.getpid()} on {socket.gethostname()}"]
    assert (out / "report" / "report.html").is_file() and lock_holder(out) is None
    ledger = (out / LEDGER_NAME).read_text().splitlines()
    assert "report/report.html" in ledger and "report/summary.md" in ledger


@pytest.fixture(scope="module")
def small_campaign(tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "run"
    run_campaign(parse_scenario({**BASE, "samples": 1}), output=out, adapter=tiny_adapter, quiet=True)
    return out


def _elsewhere(root: Path) -> Path:
    folder = root / "elsewhere"
    folder.mkdir(exist_ok=True)
    (folder / "summary.md").write_text("my summary")
    return folder


def _linked(run: Path, name: str, target: Path) -> None:
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).symlink_to(target)


def _held(run: Path):
    _held_lock.locks.append(FolderLock(run).acquire())


def _users_report(folder: Path, name: str) -> Path:
    (folder / Path(name).parent).mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("my own")
    return folder


REPORT_BAD = {  # case -> (arrange(run, root) -> extra arguments, what the one line must name)
    "report/ is a symlink": (lambda run, root: _linked(run, "report", _elsewhere(root)), "report is a symbolic link"),
    "report/summary.md is a symlink": (lambda run, root: _linked(run, "report/summary.md",
                                                                 _elsewhere(root) / "summary.md"),
                                       "summary.md is a symbolic link"),
    "report/tables is a symlink": (lambda run, root: _linked(run, "report/tables", _elsewhere(root)),
                                   "tables is a symbolic link"),
    "-o: the user's report.html": (lambda run, root: ["-o", str(_users_report(root / "mine", "report.html"))],
                                   "report.html exists and was not written by robustvtc"),
    "-o: the user's summary.md": (lambda run, root: ["-o", str(_users_report(root / "mine", "summary.md"))],
                                  "summary.md exists and was not written by robustvtc"),
    "-o: the user's tables/summary.csv": (lambda run, root: ["-o", str(_users_report(root / "mine",
                                                                                    "tables/summary.csv"))],
                                          "summary.csv exists and was not written by robustvtc"),
    "a run holds the folder": (lambda run, root: _held(run), "is being written by pid"),
}


@pytest.mark.parametrize("case", list(REPORT_BAD))
def test_report_refuses_links_foreign_files_and_a_held_folder(case, small_campaign, tmp_path):
    """`robustvtc report`: exit 2, one line naming the link or file, nothing written anywhere."""
    run = tmp_path / "run"
    shutil.copytree(small_campaign, run, symlinks=True)
    shutil.rmtree(run / "report", ignore_errors=True)
    arrange, expected = REPORT_BAD[case]
    extra = arrange(run, tmp_path) or []
    before = _snapshot(tmp_path)
    _one_line_error(["report", str(run), "--bootstrap", "10", *extra], expected)
    assert _snapshot(tmp_path) == before


def test_report_into_a_folder_rewrites_only_its_own_files(small_campaign, tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for _ in range(2):  # the second time over its own files (the ledger says they are)
        result = CliRunner().invoke(main, ["report", str(small_campaign), "-o", str(out), "--bootstrap", "10"])
        assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.html").is_file()
    assert {"report.html", "summary.md"} <= set((out / LEDGER_NAME).read_text().splitlines())
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------- image modes
def _image_inputs():
    """(name, image as given, the RGB it must become): alpha is composited on white."""
    import numpy as np
    from PIL import Image

    grey = np.full((6, 8), 100, np.uint8)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255  # opaque red ...
    rgba[:, :4, 3] = 0  # ... with a transparent left half (whose hidden colour is red too)
    opaque_red_right = np.zeros((6, 8, 3), np.float32)
    opaque_red_right[:, 4:] = (1, 0, 0)
    opaque_red_right[:, :4] = (1, 1, 1)  # white where transparent: not the hidden red
    palette = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) % 2, "L").convert("P")
    palette.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p_rgb = np.stack([np.zeros((6, 8)), np.arange(48).reshape(6, 8) % 2, 1 - np.arange(48).reshape(6, 8) % 2], -1)
    half = np.zeros((6, 8, 2), np.float32)
    half[..., 0], half[..., 1] = 0.0, 0.5  # black at half opacity on white: mid grey
    return [
        ("(H, W) uint8 array", grey, np.repeat(grey[..., None] / 255, 3, 2)),
        ("(H, W, 1) float array", grey[..., None] / 255.0, np.repeat(grey[..., None] / 255, 3, 2)),
        ("(H, W, 4) uint8 array", rgba, opaque_red_right),
        ("(H, W, 2) float array", half, np.full((6, 8, 3), 0.5)),
        ("(H, W) uint16 array", np.full((6, 8), 65535, np.uint16), np.ones((6, 8, 3))),
        ("PIL L", Image.fromarray(grey), np.repeat(grey[..., None] / 255, 3, 2)),
        ("PIL P", palette, p_rgb),
        ("PIL RGBA", Image.fromarray(rgba, "RGBA"), opaque_red_right),
        ("PIL LA", Image.fromarray(rgba, "RGBA").convert("LA"),
         np.repeat(np.where(np.arange(8) < 4, 1.0, 76 / 255)[None, :, None], 6, 0).repeat(3, 2)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_grey_palette_and_alpha_images_become_rgb_in_the_api_and_from_files(index, tiny_adapter, tmp_path):
    import numpy as np
    import torch

    from robustvtc.images import open_image, to_pixels

    name, image, expected = _image_inputs()[index]
    expected = torch.from_numpy(np.asarray(expected, np.float32)).permute(2, 0, 1)[None]
    got = to_pixels(image, (6, 8))
    assert got.shape == (1, 3, 6, 8) and torch.allclose(got, expected, atol=1.5 / 255), name
    if name.startswith("PIL"):  # the same image as a file (the CLI's data): the same pixels
        image.save(tmp_path / "x.png")
        from_file = torch.from_numpy(np.asarray(open_image(tmp_path / "x.png"), np.float32) / 255).permute(2, 0, 1)
        assert torch.allclose(from_file[None], expected, atol=1.5 / 255), name
    assert tiny_adapter.load_image(image).shape == (1, 3, 96, 96)  # the loader the campaign uses


def test_unusable_images_are_one_line_naming_them(tmp_path):
    import numpy as np
    from PIL import Image

    from robustvtc.images import to_pixels
    from robustvtc.models.preprocess import fit_image

    (tmp_path / "empty.png").write_bytes(b"")
    for bad, match in [(np.zeros((0, 5), np.uint8), r"image array is empty \(shape \(0, 5, 1\)\)"),
                       (np.zeros((4, 0, 4), np.float32), "image array is empty"),
                       (Image.new("RGB", (0, 3)), r"image is empty \(0x3 pixels\)"),
                       (np.zeros((4, 4, 5), np.uint8), r"image array has shape \(4, 4, 5\)"),
                       (np.zeros((4, 4), np.int64), "dtype int64 is not supported"),
                       ("nope.png", "image file not found: nope.png"),
                       (tmp_path / "empty.png", "empty.png is not an image file"),
                       ([[1, 2]], "not an image: list")]:
        for convert in (lambda x: to_pixels(x, 4), lambda x: fit_image(x, (4, 4))):
            with pytest.raises(UserInputError, match=match) as info:
                convert(bad)
            assert "\n" not in str(info.value)
