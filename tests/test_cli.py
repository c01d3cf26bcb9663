"""The command line: every option documented, defaults from the config dataclasses."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from richkd.cli import STAGE_COMMANDS, run_cli


@pytest.mark.parametrize("command, config_class", [(name, config) for name, config, _, _ in STAGE_COMMANDS])
def test_every_field_of_every_command_is_a_documented_flag(command, config_class, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one help line per option
    assert run_cli([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(config_class):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert " ".join(field.metadata["help"].split())[:30] in text, field.name
    assert "--config" in text


def test_inspect_help_documents_its_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    assert run_cli(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("The cache store (a path or fsspec URL)", "--verify", "--json", "--views",
                   "Only evaluate the first N views"):
        assert option in text, option


def test_top_level_help_lists_the_commands(capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for command in [name for name, *_ in STAGE_COMMANDS] + ["inspect"]:
        assert command in out, command


def test_unknown_flag_is_a_usage_error(capsys):
    assert run_cli(["precompute", "--viewz", "3"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_shipped_params_files_fill_valid_configs():
    """params.yaml (the demo), the study's and the recipes name only real fields and flags with valid values."""
    import shlex

    import typer
    import yaml

    from richkd.cli import STAGE_COMMANDS, app
    from richkd.pipeline.config import build_config
    from richkd.stages import distill

    configs = {name.replace("-", "_"): config_class for name, config_class, _, _ in STAGE_COMMANDS}
    distill_command = typer.main.get_command(app).commands["distill"]
    defaults = {parameter.name: parameter.default for parameter in distill_command.params}
    root = Path(__file__).parents[1]
    for path in (root / "params.yaml", root / "study" / "params.yaml", *sorted((root / "recipes").glob("*.yaml"))):
        sections = yaml.safe_load(path.read_text())
        for section in set(sections) & set(configs):
            overrides = {"checkpoint": "x.pt"} if section == "evaluate" else {}
            config = build_config(configs[section], section, path, overrides)
            for key, value in sections[section].items():
                # One name where a list is expected is the list of that name, as the flag given once.
                assert getattr(config, key) in (value, [value]), (path.name, section, key)
        for name, student in [*sections.get("students", {}).items(), ("label_only", sections.get("label_only"))]:
            if student is None:
                continue
            # A student's flags (the study's) are distill's own command-line flags.
            given = distill_command.make_context("distill", shlex.split(student.get("flags", ""))).params
            flags = {key: value for key, value in given.items() if value != defaults[key]}
            fields = {key: value for key, value in student.items() if key != "flags"}
            config = build_config(distill.DistillConfig, "distill", path, {**fields, **flags})
            for key, value in {**fields, **flags}.items():
                assert getattr(config, key) == value, (path.name, name, key)


def test_the_layers_import_only_downward():
    """The cache and the pipeline under it never reach up to a stage or the CLI, which are built on them."""
    root = Path(__file__).parents[1]
    for folder in ("cache", "pipeline"):
        for path in (root / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
            modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
            upward = [module for module in modules if module.startswith("richkd.stages") or module == "richkd.cli"]
            assert not upward, f"{path.relative_to(root)} imports {upward}"
