"""The command line: every option documented, defaults from the config dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from richkd.cli import STAGE_COMMANDS, run_cli


@pytest.mark.parametrize("command, config_class", [(name, config) for name, config, _ in STAGE_COMMANDS])
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


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], ["inspect", "--help"], ["precompute", "--bogus"]])
def test_help_and_usage_errors_import_no_heavy_library(argv):
    """--help answers at once: no torch, torchvision, numpy, zarr, open_clip or pydantic (typer >= 0.29 imports it
    to parse any flag); benchmarks/startup.py times it."""
    heavy = ("torch", "torchvision", "numpy", "zarr", "open_clip", "pydantic", "PIL")
    probe = (f"import sys; from richkd.cli import run_cli; status = run_cli({argv!r}); "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(heavy)!r}), status, file=sys.stderr)")
    finished = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    imported, status = finished.stderr.strip().splitlines()[-1].rsplit(" ", 1)
    assert imported == "[]", f"richkd {' '.join(argv)} imported {imported}"
    assert int(status) in (0, 2)


@pytest.mark.parametrize("argv", [["--help"], []])
def test_top_level_help_lists_the_commands(argv, capsys):
    assert run_cli(argv) == 0
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

    configs = {name.replace("-", "_"): config_class for name, config_class, _ in STAGE_COMMANDS}
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


def test_precompute_resume_says_how_precompute_resumes(capsys):
    assert run_cli(["precompute", "--teacher-checkpoint", "t.pt", "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: precompute has no --resume: it resumes by itself: run the same command again" in err


def test_ctrl_c_while_a_stage_imports_or_inspect_reads_is_one_line(monkeypatch, capsys):
    """Ctrl-C in the seconds a command imports torch, or while inspect reads a store: exit 130 and one line."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("richkd.cli.importlib.import_module", interrupted)
    for argv in (["distill", "--epochs", "1"], ["inspect", "store.zarr"]):
        assert run_cli(argv) == 130
        assert capsys.readouterr().err.strip() == "interrupted: nothing is kept; run the command again"
    monkeypatch.undo()
    monkeypatch.setattr("richkd.stages.inspect_store.run", interrupted)
    assert run_cli(["inspect", "store.zarr"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: nothing is kept; run the command again"
