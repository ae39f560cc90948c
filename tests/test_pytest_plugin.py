"""The pytest plugin, driven through pytester: checks pass and fail with their figures, the reproduce command
reproduces the records, bad arguments fail in one line, the report option, marker selection, the summary.

Inner runs are in-process on the built-in architecture with random weights (saved as a model directory and
named through ``--robustvtc-model`` or ``make_target(model=...)``), 4 samples and 1 attack step.
"""
import json
import re
import shlex
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# the entry point registers the plugin when robustvtc is installed; otherwise name it for the inner runs
PLUGIN = ([] if any(ep.value == "robustvtc.pytest_plugin" for ep in entry_points(group="pytest11"))
          else ["-p", "robustvtc.pytest_plugin"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The built-in architecture with random weights as a Hugging Face directory.

    It also runs a tiny campaign and its report here: pytester's in-process runs drop the modules they import
    (torch extensions cannot be imported twice), so everything a check imports lazily is imported first."""
    from robustvtc import cli  # noqa: F401  (the reproduce test runs the CLI in this process)
    from robustvtc.campaign import parse_scenario, run_campaign
    from robustvtc.campaign.report import write_report
    from robustvtc.models import load_model
    from robustvtc.models.builtin import new_builtin, save_builtin

    folder = tmp_path_factory.mktemp("random-builtin")
    save_builtin(new_builtin(seed=0), folder, {})
    scenario = parse_scenario({"model": str(folder), "samples": 2, "compressors": ["visionzip"], "budgets": [16],
                               "steps": 1, "attacks": ["cage"], "defenses": ["jpeg"], "examples": 1})
    out = run_campaign(scenario, output=tmp_path_factory.mktemp("warmup"), adapter=load_model(str(folder)),
                       quiet=True)
    write_report(out)
    return str(folder)


def run(pytester: pytest.Pytester, model_dir: str, *args: str) -> pytest.RunResult:
    # "--opt=value": a separate path argument would move the rootdir (and the ini file pytest reads) above the test
    return pytester.runpytest_inprocess(*PLUGIN, f"--robustvtc-model={model_dir}", "--robustvtc-samples=4", *args)


def test_passing_checks_and_terminal_summary(pytester, model_dir):
    pytester.makepyfile(f"""
        from robustvtc.pytest_plugin import assert_compression_not_weaker, assert_no_overestimation, assert_robust

        def test_deployment(make_target):
            target = make_target(model={model_dir!r}, compressor="visionzip", budget=16)
            robust = assert_robust(target, attack="cage", eps="4/255", min_accuracy=0.0, steps=1)
            assert 0 <= robust.low <= robust.value <= robust.high <= 1
            assert_no_overestimation(target, eps="4/255", max_gap=1.0, steps=1)
            assert_compression_not_weaker(target, eps="4/255", max_drop=1.0, steps=1)
    """)
    result = pytester.runpytest_inprocess(*PLUGIN, "--robustvtc-samples", "4")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*= robustvtc security checks =*",
        "result*check*target*attack*eps*measured (95 % CI)*required*test",
        "PASS*robust accuracy*visionzip@16*cage*4/255*% (95 % CI *–* %)*>= 0.0 %*::test_deployment",
        "PASS*overestimation gap*visionzip@16*fulltoken - cage*4/255*points (95 % CI*<= +100.0 points*",
        "PASS*compression drop*visionzip@16*cage*4/255*points (95 % CI*<= +100.0 points*",
    ])


def test_failing_check_shows_figures_and_a_command_that_reproduces_them(pytester, model_dir):
    pytester.makepyfile("""
        import pytest
        from robustvtc.pytest_plugin import assert_robust

        @pytest.mark.robustvtc(compressor="visionzip", budget=16)
        def test_holds(robustvtc_target):
            assert_robust(robustvtc_target, eps="4/255", min_accuracy=1.0, steps=1)
    """)
    result = run(pytester, model_dir, "--robustvtc-report", "rep")
    assert result.ret == 1
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E * robust accuracy *.* % (95 % CI *.*–*.* %) breaches the requirement >= 100.0 %: the whole interval*",
        "E * target: *, visionzip keeping 16 of 144 visual tokens, defense none",
        "E * attack: cage at eps 4/255, 1 steps, 4 samples of the synthetic test split",
        "E * clean accuracy *.* % (95 % CI *",
        "E * reproduce: robustvtc run rep/scenarios/*.yaml --overwrite",
        "*FAIL*robust accuracy*visionzip@16*",
    ])
    command = re.search(r"reproduce: (robustvtc run .*)", result.stdout.str()).group(1)
    from click.testing import CliRunner

    from robustvtc.campaign import read_records, record_key
    from robustvtc.cli import main

    args = shlex.split(command)[1:] + ["-o", "repro", "--quiet", "--no-report"]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = {record_key(r): r["prediction"] for r in read_records("repro/results.jsonl")}
    (results,) = Path("rep").glob("visionzip16-*/results.jsonl")
    checked = {record_key(r): r["prediction"] for r in read_records(results)}
    assert again and again == {k: checked[k] for k in again}


def test_an_interval_across_the_bound_is_inconclusive_not_a_pass(pytester, model_dir):
    # at 4 samples every Clopper–Pearson interval contains 50 %: no outcome of 4 samples decides that bound
    pytester.makepyfile("""
        import pytest
        from robustvtc.pytest_plugin import assert_robust

        @pytest.mark.robustvtc(compressor="visionzip", budget=16)
        def test_holds(robustvtc_target):
            assert_robust(robustvtc_target, eps="4/255", min_accuracy=0.5, steps=1)
    """)
    result = run(pytester, model_dir)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E * robustvtc INCONCLUSIVE: robust accuracy * (95 % CI *) straddles the requirement >= 50.0 %*samples*",
        "*INCONCLUSIVE*robust accuracy*visionzip@16*",
    ])
    run(pytester, model_dir, "--robustvtc-inconclusive", "skip").assert_outcomes(skipped=1)
    pytester.makefile(".ini", pytest="[pytest]\nrobustvtc_inconclusive = pass\n")
    run(pytester, model_dir).assert_outcomes(passed=1)
    # a lower level narrows the interval, but 4 samples still straddle 50 % at 60 %
    assert "60 % CI" in run(pytester, model_dir, "--robustvtc-confidence", "0.6").stdout.str()


def test_bad_arguments_fail_in_one_line_naming_what_is_accepted(pytester, model_dir):
    pytester.makepyfile("""
        import pytest
        from robustvtc.pytest_plugin import assert_compression_not_weaker, assert_robust

        def test_attack(make_target):
            assert_robust(make_target(), attack="nope", eps="4/255", min_accuracy=0.5)

        def test_eps(make_target):
            assert_robust(make_target(), eps="300/255", min_accuracy=0.5)

        def test_min_accuracy(make_target):
            assert_robust(make_target(), eps="4/255", min_accuracy=60)

        def test_full_token_target(make_target):
            assert_compression_not_weaker(make_target(), eps="4/255")

        @pytest.mark.robustvtc(compressor="vzip", budget=16)
        def test_compressor(robustvtc_target):
            pass

        @pytest.mark.robustvtc(compresor="visionzip")
        def test_marker_key(robustvtc_target):
            pass
    """)
    result = run(pytester, model_dir)
    result.assert_outcomes(failed=4, errors=2)
    result.stdout.fnmatch_lines_random([
        "robustvtc: unknown attack 'nope'; accepted: cage, cira, fata, fulltoken, *",
        "robustvtc: eps '300/255' out of range; accepted: 0 < eps <= 1 *",
        "robustvtc: min_accuracy 60 out of range; accepted: a fraction in [[]0, 1] (0.6 = 60 %)",
        "robustvtc: the target keeps every visual token (compressor 'none')*; accepted: a target with a compressor*",
        "robustvtc: unknown compressor 'vzip'; accepted: *visionzip*",
        "robustvtc: unknown marker option compresor; accepted: model, compressor, budget, *",
    ])
    assert "Traceback" not in result.stdout.str() and "During handling" not in result.stdout.str()
    usage = pytester.runpytest_inprocess(*PLUGIN, "--robustvtc-samples", "0")
    assert usage.ret == pytest.ExitCode.USAGE_ERROR
    usage.stderr.fnmatch_lines(["*--robustvtc-samples: '0' is not an integer >= 1*"])


def test_report_option_writes_the_campaign_report_of_the_checks(pytester, model_dir):
    pytester.makepyfile("""
        from robustvtc.pytest_plugin import assert_no_overestimation, assert_robust

        def test_a(make_target):
            assert_robust(make_target(compressor="fastervlm", budget=16), eps="2/255", min_accuracy=0, steps=1)

        def test_b(make_target):
            assert_no_overestimation(make_target(compressor="fastervlm", budget=16), eps="2/255", max_gap=1, steps=1)
    """)
    result = run(pytester, model_dir, "--robustvtc-report", "out")
    result.assert_outcomes(passed=2)
    (folder,) = Path("out").glob("fastervlm16-*")
    result.stdout.fnmatch_lines([f"robustvtc report: {folder.resolve()}/report/report.html"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == manifest["records_expected"]
    assert [a["name"] for a in manifest["scenario"]["attacks"]] == ["cage", "fulltoken"]
    for name in ("results.jsonl", "scenario.yaml", "report/report.html", "report/summary.md",
                 "report/tables/summary.csv", "report/tables/gap.csv"):
        assert (folder / name).is_file(), name
    assert "Overestimation gap" in (folder / "report" / "summary.md").read_text()
    assert len(list(Path("out/scenarios").glob("*.yaml"))) == 2
    # cage ran once for both checks: one record per sample x cell (none@144, fastervlm@16) x defense
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert sum(r["attack"] == "cage" for r in records) == 4 * 2


def test_marker_selects_security_checks(pytester, model_dir):
    pytester.makepyfile(
        test_security="""
            import pytest

            pytestmark = pytest.mark.robustvtc(compressor="visionzip", budget=32)

            @pytest.mark.robustvtc(budget=16)
            def test_configured_by_markers(robustvtc_target):
                assert robustvtc_target.cell == ("visionzip", 16)  # the closest marker wins, the module's fills in
        """,
        test_other="""
            def test_uses_the_factory(make_target):  # selected as a security check without a marker
                assert make_target(compressor="fastervlm", budget=8).cell == ("fastervlm", 8)

            def test_unrelated():
                pass
        """)
    selected = run(pytester, model_dir, "-m", "robustvtc", "-v")
    selected.assert_outcomes(passed=2, deselected=1)
    selected.stdout.fnmatch_lines_random(["*test_configured_by_markers PASSED*", "*test_uses_the_factory PASSED*"])
    assert "robustvtc security checks" not in selected.stdout.str()  # no check measured anything
    others = run(pytester, model_dir, "-m", "not robustvtc", "-v")
    others.assert_outcomes(passed=1, deselected=2)
    others.stdout.fnmatch_lines(["*test_unrelated PASSED*"])


def test_target_from_scenario_file_and_user_data(pytester, model_dir):
    import numpy as np
    from PIL import Image

    from robustvtc.data.synthetic import generate_dataset

    pytester.makefile(".yaml", deploy="""
        name: deploy
        model: builtin
        compressors: [visionzip, fastervlm]
        budgets: [16]
        attacks: [cage]
        defenses: [jpeg]
        samples: 3
    """)
    lines = []
    for s in generate_dataset(2, "test"):
        Image.fromarray(np.asarray(s.image)).save(pytester.path / f"img{s.index}.png")
        lines.append(json.dumps({"image": f"img{s.index}.png", "question": s.question, "answer": s.answer}))
    (pytester.path / "val.jsonl").write_text("\n".join(lines))
    pytester.makepyfile("""
        from robustvtc.pytest_plugin import assert_robust

        def test_scenario_target(make_target):
            target = make_target(scenario="deploy.yaml", compressor="visionzip")
            assert (target.cell, target.defense, target.eval_set.samples) == (("visionzip", 16), "jpeg", 3)
            assert_robust(target, eps="4/255", min_accuracy=0, steps=1)

        def test_scenario_needs_one_compressor(make_target):
            make_target(scenario="deploy.yaml")

        def test_user_data(make_target, make_eval_set):
            target = make_target(compressor="visionzip", budget=16)
            data = make_eval_set("vqa_jsonl", path="val.jsonl", samples=2)
            pixels, prompts, answers = data.batch(target.target.adapter)
            assert pixels.shape == (2, 3, 96, 96) and len(prompts) == len(answers) == 2
            assert_robust(target, eps="4/255", min_accuracy=0, steps=1, data=data)
    """)
    result = pytester.runpytest_inprocess(*PLUGIN, "--robustvtc-model", model_dir)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines_random([
        "robustvtc: */deploy.yaml lists 2 compressors (visionzip, fastervlm); accepted: one, or pick it with "
        "make_target(compressor=...)",
        "PASS*robust accuracy*visionzip@16 +jpeg*cage*::test_scenario_target",
        "PASS*robust accuracy*visionzip@16 *cage*::test_user_data",
    ])
