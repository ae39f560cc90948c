"""Third-party compressors, attacks and defenses: entry points (read lazily) and ``module.path:ClassName`` names,
with one-line errors for a bad module, class or option; the example learned scorer run from a scenario."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from robustvtc.attacks import ATTACKS, Attack
from robustvtc.campaign.scenario import load_scenario, parse_scenario
from robustvtc.compression import COMPRESSORS, Compressor, get_compressor
from robustvtc.defenses import DEFENSES, Defense
from robustvtc.errors import UserInputError
from robustvtc.registry import Registry
from robustvtc.target import Target

ROOT = Path(__file__).resolve().parents[1]
SCORER = "examples.learned_scorer.scorer:LearnedScorer"
BASE = {"budgets": [16], "attacks": [], "samples": 2}

PLUGIN = '''
from robustvtc.compression import KeepPlan, PreLLMCompressor
LOADED = True

class Strided(PreLLMCompressor):
    paper = "test plug-in"
    native_knob = "every (N // K)-th token"

    def __init__(self, offset: int = 0):
        self.offset = offset

    def plan(self, tokens, budget, projected=None):
        import torch
        n = tokens.num_tokens
        idx = (torch.arange(budget) * (n // budget) + self.offset) % n
        return KeepPlan.from_indices(idx.sort().values.expand(tokens.batch_size, -1), n)

class NotACompressor:
    pass
'''


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def weights(tmp_path):
    from examples.learned_scorer.scorer import ScorerNet

    torch.manual_seed(0)
    path = tmp_path / "scorer.safetensors"
    ScorerNet(128, 16).save(str(path))
    return path


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution installed on sys.path declaring entry points in the three groups (one of them broken)."""
    (tmp_path / "my_plugin_pkg.py").write_text(PLUGIN)
    info = tmp_path / "my_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[robustvtc.compressors]\nstrided = my_plugin_pkg:Strided\nbroken = my_plugin_missing:Nothing\n"
        "wrong_kind = my_plugin_pkg:NotACompressor\nvisionzip = my_plugin_pkg:Strided\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("my_plugin_pkg", None)


def test_registries_read_their_entry_point_groups():
    assert (COMPRESSORS.group, ATTACKS.group, DEFENSES.group) == (
        "robustvtc.compressors", "robustvtc.attacks", "robustvtc.defenses")
    assert (COMPRESSORS.base, ATTACKS.base, DEFENSES.base) == (Compressor, Attack, Defense)


def test_entry_points_are_listed_without_import_and_loaded_on_first_use(installed_plugin, tiny_adapter):
    registry = Registry("compressor", group="robustvtc.compressors", base=Compressor)
    registry.register()(type("Builtin", (Compressor,), {"name": "visionzip"}))
    assert {"strided", "broken", "wrong_kind", "visionzip"} <= set(registry.names())
    assert "my_plugin_pkg" not in sys.modules  # listing imports nothing
    cls = registry.get("strided")
    assert "my_plugin_pkg" in sys.modules and cls.name == "strided"  # named after its entry point
    assert registry.get("visionzip").__name__ == "Builtin"  # a built-in name is never shadowed
    plan = Target(tiny_adapter, cls(offset=1), 36).forward(torch.rand(1, 3, 96, 96)).plan
    assert plan.weights.shape[1] == 36
    with pytest.raises(UserInputError) as err:
        registry.get("broken")
    assert str(err.value).count("\n") == 0
    assert "compressor plug-in 'broken' (my_plugin_missing:Nothing, entry point group robustvtc.compressors) failed " \
           "to load: ModuleNotFoundError" in str(err.value)
    with pytest.raises(UserInputError, match="'wrong_kind' .* is a class NotACompressor, not a subclass of Compressor"):
        registry.get("wrong_kind")
    names = [n for n, _ in registry.items()]  # broken plug-ins are left out of items(), with a warning
    assert "strided" in names and "broken" not in names


def test_import_path_names_a_compressor_with_options(at_root, weights, builtin_adapter):
    from robustvtc.data.synthetic import generate_dataset, to_pixels

    comp = get_compressor(SCORER, weights=str(weights))
    assert comp.name == "learned_scorer" and COMPRESSORS.get(SCORER) is type(comp)
    assert SCORER in COMPRESSORS and "examples.nothing:Here" not in COMPRESSORS
    pixels = to_pixels(generate_dataset(2, "test"))
    fwd = Target(builtin_adapter, comp, 16).forward(pixels)
    tokens = builtin_adapter.encode(pixels)
    expected = comp.scores(tokens).topk(16, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(fwd.plan.primary_sources(), expected)


@pytest.mark.parametrize("name,needle", [
    ("examples.learned_scorer.nope:LearnedScorer",
     "compressors[1]: compressor 'examples.learned_scorer.nope:LearnedScorer': no module named "
     "'examples.learned_scorer.nope'"),
    ("examples.learned_scorer.scorer:LearnedScorr",
     "compressors[1]: compressor 'examples.learned_scorer.scorer:LearnedScorr': module examples.learned_scorer.scorer "
     "has no 'LearnedScorr'; accepted: examples.learned_scorer.scorer:LearnedScorer"),
    ("examples.learned_scorer.scorer:ScorerNet",
     "is a class ScorerNet, not a subclass of Compressor; accepted: a class deriving from robustvtc.compression.base"),
    ("examples.learned_scorer.scorer.LearnedScorer",
     "compressors[1]: 'examples.learned_scorer.scorer.LearnedScorer' is not accepted; accepted: "),
])
def test_bad_import_paths_fail_in_one_line(at_root, name, needle):
    with pytest.raises(UserInputError) as err:
        parse_scenario({**BASE, "compressors": ["fastervlm", name]}, source="s.yaml")
    assert str(err.value).startswith("s.yaml: ") and needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("entry,needle", [
    ({"name": SCORER, "wieghts": "x"}, "s.yaml: compressors[0].wieghts: unknown key; accepted: name, label, weights, "
                                       "relaxation, temperature"),
    ({"name": SCORER, "temperature": "hot"}, "s.yaml: compressors[0].temperature: 'hot' is not a number"),
    ({"name": "fastervlm", "label": "visionzip"}, "compressors[0].label: 'visionzip' is a registered compressor's name"),
    ({"name": SCORER}, None),
])
def test_bad_options_fail_in_one_line(at_root, entry, needle):
    if needle is None:  # default weights: the file next to the class, read when the campaign builds it
        s = parse_scenario({**BASE, "compressors": [entry]}, source="s.yaml")
        assert s.compressor_spec("learned_scorer") == (SCORER, {})
        return
    with pytest.raises(UserInputError) as err:
        parse_scenario({**BASE, "compressors": [entry]}, source="s.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_missing_weights_fail_in_one_line(at_root, tmp_path):
    with pytest.raises(UserInputError, match=r"learned_scorer: weights file not found: .*nope.safetensors; accepted"):
        get_compressor(SCORER, weights=str(tmp_path / "nope.safetensors"))


def test_attacks_and_defenses_by_import_path(at_root):
    s = parse_scenario({**BASE, "compressors": ["fastervlm"], "attacks": [{"name": "robustvtc.attacks.fulltoken:FullToken",
                                                                          "label": "ft"}],
                        "defenses": [{"robustvtc.defenses.jpeg:JPEG": {"quality": 50}}]}, source="s.yaml")
    assert s.attacks[0].name == "robustvtc.attacks.fulltoken:FullToken" and s.defenses[0].options == {"quality": 50}
    with pytest.raises(UserInputError, match=r"defenses\[0\]: defense 'robustvtc.defenses.jpeg:Jpg': module "
                                             r"robustvtc.defenses.jpeg has no 'Jpg'; accepted: robustvtc.defenses.jpeg:JPEG"):
        parse_scenario({**BASE, "compressors": ["fastervlm"], "defenses": ["robustvtc.defenses.jpeg:Jpg"]}, source="s.yaml")


def test_example_scenario_runs_the_plugin(at_root, weights, tmp_path, builtin_adapter):
    """The shipped example scenario, with its weights path resolved against its own folder, through the runner."""
    from robustvtc.campaign import run_campaign

    s = load_scenario(ROOT / "examples/learned_scorer/scenario.yaml",
                      {"samples": 4, "attacks": [], "budgets": [16], "compressors": [
                          "fastervlm", {"name": SCORER, "label": "mine", "weights": str(weights)}]})
    assert s.compressors == ("none", "fastervlm", "mine")
    assert s.compressor_spec("mine") == (SCORER, {"weights": str(weights)})
    default = load_scenario(ROOT / "examples/learned_scorer/scenario.yaml")
    assert default.compressor_spec("learned_scorer")[1]["weights"] == str(
        ROOT / "examples/learned_scorer/scorer.safetensors")
    out = run_campaign(s, output=tmp_path / "run", adapter=builtin_adapter, quiet=True)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["compressor"], r["budget"]) for r in records} == {("none", 144), ("fastervlm", 16), ("mine", 16)}
