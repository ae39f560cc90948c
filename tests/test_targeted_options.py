"""Targeted whitebox and stealth as options: reachable from scenarios and from the pytest checks."""
import pytest
import torch

from robustvtc.attacks import get_attack
from robustvtc.campaign import parse_scenario
from robustvtc.data.synthetic import to_pixels
from robustvtc.errors import UserInputError
from robustvtc.target import Target

from test_pytest_plugin import PLUGIN, model_dir  # noqa: F401  (fixture)

pytest_plugins = ["pytester"]


def test_target_answer_option_equals_call_time_targets(tiny_adapter, samples):
    clean, chunk = to_pixels(samples[:2]), samples[:2]
    q, a = [s.question for s in chunk], [s.answer for s in chunk]
    target = Target(tiny_adapter, "fastervlm", 16)
    by_option = get_attack("whitebox", target, steps=2, target_answer="no")(clean, q, a)
    by_call = get_attack("whitebox", target, steps=2)(clean, q, a, target_answers=["no", "no"])
    assert torch.equal(by_option.adv, by_call.adv) and by_option.metadata["targeted"]
    stealth = get_attack("stealth", target, steps=1, target_answer="no")(clean, q, a)
    assert stealth.metadata["targeted"] and (stealth.adv - clean).abs().max() <= 8 / 255 + 1e-6
    with pytest.raises(UserInputError, match="target_answer"):
        get_attack("whitebox", target, target_answer="")
    with pytest.raises(UserInputError, match="loss='nll'"):
        get_attack("stealth", target, loss="kl", target_answer="no", steps=1)(clean, q, a)


def test_targeted_attacks_from_a_scenario():
    s = parse_scenario({"compressors": ["fastervlm"], "budgets": [16], "attacks": [
        {"name": "whitebox", "label": "wb_to_no", "target_answer": "no"},
        {"name": "stealth", "target_answer": "yes"}]})
    assert s.attacks[0].options["target_answer"] == "no" and s.attacks[1].options["target_answer"] == "yes"
    with pytest.raises(UserInputError, match=r"attacks\[0\].target_answers: unknown key"):
        parse_scenario({"compressors": ["fastervlm"], "budgets": [16],
                        "attacks": [{"name": "whitebox", "target_answers": "no"}]})


def test_targeted_attack_in_a_pytest_check(pytester, model_dir):  # noqa: F811
    pytester.makepyfile(f"""
        from robustvtc.pytest_plugin import assert_robust

        def test_targeted(make_target):
            target = make_target(model={model_dir!r}, compressor="fastervlm", budget=16)
            robust = assert_robust(target, attack={{"name": "whitebox", "target_answer": "no"}}, eps="4/255",
                                   min_accuracy=0.0, steps=1)
            assert 0 <= robust.value <= 1
    """)
    result = pytester.runpytest_inprocess(*PLUGIN, "--robustvtc-samples", "2")
    result.assert_outcomes(passed=1)
    assert "whitebox(target_answer=no)" in result.stdout.str()
