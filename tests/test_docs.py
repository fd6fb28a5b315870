import json

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (ROOT / "README.md").read_text().splitlines()


def test_the_readme_shows_the_offload_config_it_ships():
    """The README's JSON block of the tutorial's recipe is ds_config_offload.json's fp16 and ZeRO sections."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```json\n", 1)[1].split("```", 1)[0]
    shipped = json.loads((ROOT / "ds_config_offload.json").read_text())
    assert json.loads("{" + block + "}") == {key: shipped[key] for key in ("fp16", "zero_optimization")}
    reference = json.loads((ROOT / "ds_config.json").read_text())
    assert {key: value for key, value in shipped.items() if key not in ("fp16", "zero_optimization")} == {
        key: value for key, value in reference.items() if key not in ("fp16", "zero_optimization")}
