"""torchattacks in campaigns: any class by name, options checked against its signature, the matrix of the
classes the issue names (ran / refused and why), and a campaign crafting per cell."""
import pytest
import torch

torchattacks = pytest.importorskip("torchattacks")

from robustvtc.attacks import attack_class, get_attack  # noqa: E402
from robustvtc.campaign import parse_scenario, run_campaign  # noqa: E402
from robustvtc.campaign.metrics import attack_roles, load_records  # noqa: E402
from robustvtc.data.synthetic import ANSWERS, to_pixels  # noqa: E402
from robustvtc.errors import UserInputError  # noqa: E402
from robustvtc.target import Target  # noqa: E402

BASE = {"compressors": ["fastervlm"], "budgets": [16]}

RUNS = [("PGD", {}), ("APGD", {"loss": "ce"}), ("APGD", {"loss": "dlr"}), ("APGDT", {}), ("FAB", {}),
        ("Square", {"n_queries": 5}), ("AutoAttack", {"version": "standard", "n_queries": 5}),
        ("AutoAttack", {"version": "plus", "n_queries": 5}), ("AutoAttack", {"version": "rand"}), ("MIFGSM", {})]
REFUSED = {"CW": "no radius", "DeepFool": "no radius", "MultiAttack": "needs attack objects"}


@pytest.mark.parametrize("name,options", RUNS, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in RUNS])
def test_matrix_runs_inside_the_ball(tiny_adapter, samples, name, options):
    chunk = samples[:2]
    clean = to_pixels(chunk).permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # a non-contiguous batch
    assert not clean.is_contiguous()
    attack = get_attack(f"torchattacks.{name}", Target(tiny_adapter, "fastervlm", 16), eps="8/255", steps=1,
                        candidates=ANSWERS, **options)
    result = attack(clean, [s.question for s in chunk], [s.answer for s in chunk])
    assert (result.adv - clean).abs().max() <= 8 / 255 + 1e-6 and result.adv.min() >= 0 and result.adv.max() <= 1
    assert result.metadata["threat_model"]["gradients"] == "model"


def test_autoattack_budget_is_shrunk(tiny_adapter):
    attack = get_attack("torchattacks.AutoAttack", tiny_adapter, steps=3, n_queries=7, candidates=ANSWERS)
    built = attack._build(torch.nn.Linear(1, 1))
    subs = built._autoattack.attacks
    assert {s.steps for s in subs if hasattr(s, "steps")} == {3} and [s.n_queries for s in subs
                                                                        if hasattr(s, "n_queries")] == [7]
    assert all(getattr(s, "n_classes", len(ANSWERS)) == len(ANSWERS) for s in subs)


@pytest.mark.parametrize("name,why", sorted(REFUSED.items()))
def test_refused_in_one_line(name, why):
    with pytest.raises(UserInputError, match=why) as info:
        parse_scenario({**BASE, "attacks": [{"name": f"torchattacks.{name}"}]})
    assert "\n" not in str(info.value)


def test_scenario_validation_against_the_signature():
    s = parse_scenario({**BASE, "steps": 4, "attacks": [{"name": "torchattacks.PGD", "eps": "8/255", "steps": 10},
                                                         {"name": "torchattacks.APGD", "loss": "dlr"}]})
    assert s.attacks[0].eps == (8 / 255,) and s.attacks[0].options["steps"] == 10
    assert s.attacks[1].options["loss"] == "dlr" and s.attacks[1].options["steps"] == 4
    with pytest.raises(UserInputError, match=r"attacks\[0\].lossy: unknown key; accepted: .*n_restarts"):
        parse_scenario({**BASE, "attacks": [{"name": "torchattacks.APGD", "lossy": "dlr"}]})
    with pytest.raises(UserInputError, match=r"attacks\[0\].n_restarts: 'x' is not a number"):
        parse_scenario({**BASE, "attacks": [{"name": "torchattacks.APGD", "n_restarts": "x"}]})
    with pytest.raises(UserInputError, match=r"attacks\[0\].name: 'torchattacks.Nope' is not a torchattacks attack"):
        parse_scenario({**BASE, "attacks": [{"name": "torchattacks.Nope"}]})
    assert attack_class("torchattacks.PGD").role == "whitebox"


def test_campaign_crafts_per_cell_and_records_the_threat(tiny_adapter, tmp_path):
    scenario = parse_scenario({**BASE, "samples": 2, "steps": 1, "eps": ["4/255"],
                               "attacks": [{"name": "torchattacks.PGD"}]})
    out = run_campaign(scenario, output=tmp_path / "run", adapter=tiny_adapter, quiet=True)
    df = load_records(out)
    attacked = df[df["attack"] == "torchattacks.PGD"]
    assert set(attacked["compressor"]) == {"none", "fastervlm"} and (attacked["linf"] <= 4 / 255 + 1e-6).all()
    assert attacked["attack_threat"].iloc[0].startswith("whole-model gradients")
    assert attack_roles(["torchattacks.PGD"]) == {"torchattacks.PGD": "whitebox"}
