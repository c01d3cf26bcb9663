"""The command line: every option documented, defaults from the config dataclasses."""

from __future__ import annotations

import dataclasses

from richkd.pipeline.cli import run_cli
from richkd.stages.precompute import PrecomputeConfig


def test_every_precompute_field_is_a_documented_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one help line per option
    assert run_cli(["precompute", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(PrecomputeConfig):
        assert f"--{field.name.replace('_', '-')}" in text
        assert " ".join(field.metadata["help"].split())[:30] in text
    assert "--config" in text


def test_top_level_help_lists_the_commands(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert "precompute" in out and "inspect" in out


def test_unknown_flag_is_a_usage_error(capsys):
    assert run_cli(["precompute", "--viewz", "3"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_shipped_params_files_fill_valid_configs():
    """params.yaml (the demo) and the recipes name only real fields with valid values."""
    from pathlib import Path

    import yaml

    from richkd.pipeline.cli import STAGE_COMMANDS
    from richkd.pipeline.config import build_config
    from richkd.stages import distill

    configs = {name.replace("-", "_"): config_class for name, config_class, _, _ in STAGE_COMMANDS}
    root = Path(__file__).parents[1]
    for path in (root / "params.yaml", *sorted((root / "recipes").glob("*.yaml"))):
        sections = yaml.safe_load(path.read_text())
        for section in set(sections) & set(configs):
            overrides = {"checkpoint": "x.pt"} if section == "evaluate" else {}
            build_config(configs[section], section, path, overrides)
        for name, student in sections.get("students", {}).items():
            build_config(distill.DistillConfig, "distill", path, student)
