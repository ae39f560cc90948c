"""Scenario files: strict validation (key path + accepted values in one line), overrides, shipped scenarios."""
from __future__ import annotations

import pytest
import yaml

from robustvtc.campaign.scenario import (apply_overrides, load_scenario, parse_scenario, schedule_differences,
                                        shipped_scenarios)
from robustvtc.errors import UserInputError

BASE = {"compressors": ["fastervlm"], "budgets": [16, 32], "attacks": ["fulltoken", "cage"]}


def parse(**changes):
    return parse_scenario({**BASE, **changes}, source="s.yaml")


@pytest.mark.parametrize("changes,needle", [
    ({"sampels": 3}, "s.yaml: sampels: unknown key; accepted: name, description, model"),
    ({"data": {"source": "synthetic", "splt": "test"}},
     "s.yaml: data.splt: unknown key; accepted: source, split, path"),
    ({"data": {"split": "dev"}}, "s.yaml: data.split: 'dev' is not accepted; accepted: train, val, test"),
    ({"data": {"source": "csv"}}, "data.source: 'csv' is not accepted; accepted: synthetic, vqa_jsonl, vqa_folder"),
    ({"data": {"source": "vqa_jsonl"}}, "data.path: missing; accepted: the data file or folder of source vqa_jsonl"),
    ({"compressors": ["fastervlm", "fasterVLM"]}, "compressors[1]: 'fasterVLM' is not accepted; accepted: dart,"),
    ({"budgets": [16, 0]}, "budgets[1]: 0 is not a budget; accepted: integers >= 1 (visual tokens kept) or 'all'"),
    ({"budgets": []}, "budgets: empty; accepted: one or more budgets"),
    ({"attacks": ["fulltoken", "pgd"]}, "attacks[1].name: 'pgd' is not accepted; accepted: cage, cira, fata, fulltoken"),
    ({"attacks": [{"name": "cage", "lambda": 1}]}, "attacks[0].lambda: unknown key; accepted: name, label, eps, k_min"),
    ({"attacks": [{"name": "cage", "eps": ["8/255", "eight"]}]},
     "attacks[0].eps[1]: 'eight' is not a radius; accepted: a float like 0.03 or a fraction like '8/255'"),
    ({"attacks": [{"name": "cage", "steps": -1}]}, "attacks[0].steps: -1 is not an integer >= 0"),
    ({"attacks": [{"name": "known_budget", "budget": 16}]}, "attacks[0].budget: unknown key"),
    ({"attacks": ["cage", {"name": "cage", "steps": 3}]},
     "attacks[1].label: duplicate 'cage'; accepted: attack labels (set label: to tell two apart)"),
    ({"attacks": [{"name": "cage", "label": "clean"}]}, "attacks[0].label: 'clean' is reserved"),
    ({"eps": "lots"}, "s.yaml: eps[0]: 'lots' is not a radius"),
    ({"schedule": {"stpes": 5}}, "s.yaml: schedule.stpes: unknown key; accepted: steps, alpha, random_start"),
    ({"schedule": [5]}, "s.yaml: schedule: expected a mapping, got list [5]; accepted: a mapping with keys steps"),
    ({"schedule": {"steps": -2}}, "s.yaml: schedule.steps: -2 is not an integer >= 0"),
    ({"schedule": {"steps": 1.5}}, "s.yaml: schedule.steps: 1.5 is not an integer >= 0"),
    ({"steps": "ten"}, "s.yaml: steps: 'ten' is not an integer >= 0"),
    ({"schedule": {"alpha": "half"}}, "s.yaml: schedule.alpha: 'half' is not a radius; accepted: a float like"),
    ({"schedule": {"random_start": "yes"}}, "s.yaml: schedule.random_start: 'yes' is not a boolean; accepted: "
                                            "true or false"),
    ({"schedule": {"steps": 5}, "steps": 5}, "s.yaml: steps: given twice (also as schedule.steps); accepted: one "
                                             "of steps (shorthand) or schedule.steps"),
    ({"attacks": ["fulltoken", {"name": "cage", "random_start": 1}]},
     "s.yaml: attacks[1].random_start: 1 is not a boolean; accepted: true or false"),
    ({"attacks": [{"name": "cage", "alpha": "big"}]}, "s.yaml: attacks[0].alpha: 'big' is not a radius"),
    ({"dtype": "float8"}, "dtype: 'float8' is not accepted; accepted: float32, fp32, bfloat16"),
    ({"batch_size": 0}, "batch_size: 0 is not an integer >= 1; accepted: an integer >= 1"),
    ({"threads": 0}, "threads: 0 is not an integer >= 1"),
    ({"adaptive": "yes"}, "adaptive: 'yes' is not a boolean; accepted: true or false"),
    ({"defenses": ["jpg"]}, "defenses[0]: 'jpg' is not accepted; accepted: none, bit_depth"),
    ({"defenses": [{"jpeg": {"qualty": 50}}]}, "defenses[0].jpeg.qualty: unknown key; accepted: quality"),
    ({"defenses": ["jpeg", {"jpeg": None}]}, "defenses[1].label: duplicate 'jpeg'"),
])
def test_errors_name_the_key_path_and_accepted_values(changes, needle):
    with pytest.raises(UserInputError) as info:
        parse(**changes)
    message = str(info.value)
    assert needle in message, message
    assert "\n" not in message


def test_missing_required_key_and_non_mapping():
    with pytest.raises(UserInputError, match=r"s.yaml: attacks: missing; accepted: a value for each of compressors"):
        parse_scenario({"compressors": ["none"], "budgets": [16]}, source="s.yaml")
    with pytest.raises(UserInputError, match="top level: expected a mapping, got list"):
        parse_scenario(["a"], source="s.yaml")


def test_defaults_and_normalisation():
    s = parse(attacks=["fulltoken", {"name": "cage", "eps": [0.01, "2/255"], "steps": 3, "lambda_rda": 0.1}],
              defenses=["none", "jpeg", {"gaussian_noise": {"sigma": 0.1}}], name="t")
    assert s.compressors == ("none", "fastervlm")  # the full-token reference is always there
    shared = {"steps": 10, "alpha": None, "random_start": True}  # the campaign schedule by default
    assert s.attacks[0].eps == (8 / 255,) and s.attacks[0].options == shared
    assert s.attacks[1].eps == (0.01, 2 / 255)
    assert s.attacks[1].options == {**shared, "steps": 3, "lambda_rda": 0.1}
    assert [d.label for d in s.defenses] == ["jpeg", "gaussian_noise(sigma=0.1)"]  # "none" is implicit
    assert (s.output, s.seed, s.batch_size, s.eot_samples, s.adaptive, s.threads) == ("runs/t", 0, 8, 8, True, None)
    assert parse(threads=None).threads is None and parse(threads=2).threads == 2


def test_hash_covers_what_changes_records_only():
    s = parse()
    assert parse(output="elsewhere", save_images=True, examples=0, description="x", threads=1).hash() == s.hash()
    assert parse(seed=1).hash() != s.hash()
    assert parse(attacks=["fulltoken", {"name": "cage", "steps": 11}]).hash() != s.hash()
    assert parse(schedule={"random_start": False}).hash() != s.hash()
    assert parse(schedule={"alpha": "1/255"}).hash() != s.hash()
    assert parse(schedule={"steps": 10, "alpha": None, "random_start": True}).hash() == s.hash()  # the defaults
    assert parse(steps=10).hash() == s.hash()
    # a campaign schedule every attack overrides changes no record, so not the hash
    both = [{"name": n, "steps": 4} for n in ("fulltoken", "cage")]
    assert parse(attacks=both, steps=7).hash() == parse(attacks=both).hash()


def test_overrides_are_applied_before_validation(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "samples": 50}))
    s = load_scenario(path, {"samples": 4, "attacks.1.steps": 2, "data.split": "val"})
    assert s.samples == 4 and s.attacks[1].options["steps"] == 2 and s.data.split == "val"
    with pytest.raises(UserInputError, match=r"s.yaml: samples: 0 is not an integer >= 1"):
        load_scenario(path, {"samples": 0})
    with pytest.raises(UserInputError, match="override attacks.5.steps: no item 5 in attacks"):
        load_scenario(path, {"attacks.5.steps": 2})
    assert apply_overrides({"a": [1]}, {"b.c": 2}) == {"a": [1], "b": {"c": 2}}


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("compressors: [none\n")
    with pytest.raises(UserInputError, match="bad.yaml: line .* not valid YAML"):
        load_scenario(bad)
    with pytest.raises(UserInputError, match="scenario not found: nope.yaml; accepted: a YAML file or a shipped"):
        load_scenario("nope.yaml")


def test_relative_data_paths_resolve_against_the_scenario_folder(tmp_path):
    path = tmp_path / "sub" / "s.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**BASE, "data": {"source": "vqa_jsonl", "path": "data/q.jsonl"}}))
    assert load_scenario(path).data.path == str(tmp_path / "sub" / "data" / "q.jsonl")


def test_shipped_scenarios_are_valid():
    names = shipped_scenarios()
    assert {"quickstart", "budget_sweep", "cage_vs_fulltoken"} <= set(names)
    for name in names:
        s = load_scenario(name)
        assert s.description and s.model in ("builtin", "builtin-deit"), name  # shipped, offline
    quick = load_scenario("quickstart")
    assert {a.name for a in quick.attacks} >= {"fulltoken", "cage"}


# ---------------------------------------------------------------- one schedule for the whole campaign
def test_attacks_without_overrides_share_one_schedule():
    """fulltoken (class default: random start) and cage (class default: 100 zero-start steps of 0.5/255)
    resolve to the same schedule in one campaign."""
    s = parse()
    assert s.schedule == {"steps": 10, "alpha": None, "random_start": True}
    assert [a.schedule() for a in s.attacks] == [s.schedule, s.schedule]
    assert schedule_differences({a.label: a.schedule() for a in s.attacks}, s.schedule) == []
    custom = parse(schedule={"steps": 30, "alpha": "1/255", "random_start": False})
    assert [a.schedule() for a in custom.attacks] == [{"steps": 30, "alpha": 1 / 255, "random_start": False}] * 2
    assert [a.schedule()["steps"] for a in parse(steps=4).attacks] == [4, 4]  # the shorthand


def test_schedule_reaches_the_attacks(tiny_adapter):
    from robustvtc.attacks import get_attack

    s = parse(eps=["4/255"])
    built = [get_attack(a.name, tiny_adapter, eps=a.eps[0], **a.options) for a in s.attacks]
    assert {(b.steps, b.alpha, b.random_start) for b in built} == {(10, 1 / 255, True)}


def test_a_per_attack_override_differs_and_is_named():
    s = parse(attacks=["fulltoken", "known_budget", {"name": "cage", "steps": 100, "random_start": False}],
              schedule={"steps": 20})
    schedules = {a.label: a.schedule() for a in s.attacks}
    assert schedules["fulltoken"] == schedules["known_budget"] == {"steps": 20, "alpha": None, "random_start": True}
    assert schedules["cage"] == {"steps": 100, "alpha": None, "random_start": False}
    assert schedule_differences(schedules, s.schedule) == ["cage"]
    # two attacks, one overridden: the one off the campaign schedule is named
    two = parse(attacks=[{"name": "fulltoken", "alpha": "2/255"}, "cage"])
    assert schedule_differences({a.label: a.schedule() for a in two.attacks}, two.schedule) == ["fulltoken"]


def test_manifest_lists_the_schedule_and_its_differences(tiny_adapter):
    from robustvtc.campaign.runner import Campaign, _manifest

    s = parse(compressors=["fastervlm"], budgets=[16], samples=2, eps=["4/255", "8/255"],
              attacks=["fulltoken", {"name": "cage", "label": "cage_official", "steps": 100, "alpha": "0.5/255",
                                     "random_start": False}])
    manifest = _manifest(Campaign(s, tiny_adapter))
    assert manifest["schedule"]["fulltoken"] == {"steps": 10, "alpha": "eps/4", "alpha_per_eps": [1 / 255, 2 / 255],
                                                 "random_start": True}
    assert manifest["schedule"]["cage_official"] == {"steps": 100, "alpha": 0.5 / 255,
                                                     "alpha_per_eps": [0.5 / 255] * 2, "random_start": False}
    assert manifest["attacks"]["cage_official"]["params"]["alpha"] == 0.5 / 255
    assert manifest["schedule_differences"] == ["cage_official"]
    assert _manifest(Campaign(parse(samples=2), tiny_adapter))["schedule_differences"] == []
