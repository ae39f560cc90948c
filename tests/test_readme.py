"""The README's code runs: the plug-in example registers a working compressor, the API names exist."""
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(after: str) -> str:
    """The first ```python block after the heading ``after``."""
    return re.search(r"```python\n(.*?)```", README[README.index(after):], re.S).group(1)


def test_extending_example_registers_a_compressor_that_runs(tiny_adapter):
    from robustvtc.compression.registry import COMPRESSORS
    from robustvtc.data.synthetic import generate_dataset, to_pixels
    from robustvtc.target import Target

    namespace: dict = {}
    try:
        exec(compile(_block("## Extending"), "README.md", "exec"), namespace)
        target = Target(tiny_adapter, "norm_topk", 16)
        plan = target.forward(to_pixels(generate_dataset(2, "test"))).plan
        assert plan.weights.shape[:2] == (2, 16) and bool((plan.weights.sum(-1) == 1).all())
    finally:
        COMPRESSORS._items.pop("norm_topk", None)  # other tests list every registered compressor


def test_api_example_runs_up_to_the_campaign():
    code = _block("## Python API")
    head = code[:code.index("out = run_campaign")]  # the campaign lines run in the campaign tests
    namespace: dict = {}
    exec(compile(head, "README.md", "exec"), namespace)
    adv, pixels = namespace["adv"], namespace["pixels"]
    assert adv.shape == pixels.shape and float((adv - pixels).abs().max()) <= 2 / 255 + 1e-6


@pytest.mark.parametrize("command", sorted(set(re.findall(r"^robustvtc (\w[\w-]*)", README, re.M))))
def test_tour_commands_exist(command):
    from click.testing import CliRunner

    from robustvtc.cli import main

    assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0
