"""The `richkd` command line.

Stage commands get one flag per field of the stage's config dataclass; `--config params.yaml` fills the
same fields from the file's section for that stage, and flags given on the command line win.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from richkd.pipeline.config import build_config, field_default, field_type
from richkd.pipeline.errors import UserError, is_out_of_space, one_line
from richkd.pipeline.runtime import DEVICE_CHOICES, console
from richkd.stages import options


class PlainHelp:
    """Help in plain text: typer's rich help takes longer to import and lay out than the rest of --help together."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        click.Command.format_help(self, ctx, formatter)


class PlainHelpGroup(PlainHelp, TyperGroup):
    """The `richkd` group, its help in plain text."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:  # typer 0.28 raises an error that prints nothing for a bare `richkd`
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit()
        return super().parse_args(ctx, args)


class SectionedCommand(PlainHelp, TyperCommand):
    """A command whose help is plain text, its options in the sections their `rich_help_panel` names."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                default = "Arguments" if param.param_type_name == "argument" else "Options"
                sections.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(records)


app = typer.Typer(
    name="richkd",
    help="Distil compact image classifiers from a teacher and CLIP at once, from a cache of their outputs.",
    cls=PlainHelpGroup,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# What an interrupted command that keeps nothing tells the user.
INTERRUPTED_ADVICE = "nothing is kept; run the command again"


class Interrupted(Exception):
    """Ctrl-C during a stage; the message says what the stage kept and how to go on."""


# Set by the --debug flag: show the traceback of user errors instead of one line.
debug_mode = {"enabled": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option(help="Show full tracebacks for errors.")] = False) -> None:
    debug_mode["enabled"] = debug


def import_interruptibly(module: str):
    """Import a stage's code (torch and the rest: seconds), which Ctrl-C stops with nothing begun."""
    try:
        return importlib.import_module(module)
    except KeyboardInterrupt:
        raise Interrupted(INTERRUPTED_ADVICE) from None


def add_stage_command(name: str, config_class: type, summary: str) -> None:
    """A command whose flags are `config_class`'s fields, plus `--config` for a params file; it runs the `run`
    function of its stage's module, imported only then (torch and the rest load when a command runs, not for
    --help)."""

    def command(ctx: typer.Context, **values) -> None:
        params_file = values.pop("config")
        # typer bundles its own click, so the source enum is compared by name.
        given = {key: value for key, value in values.items()
                 if getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE"}
        config = build_config(config_class, name.replace("-", "_"), params_file, given)
        stage = import_interruptibly(f"richkd.stages.{name.replace('-', '_')}")
        try:
            stage.run(config)
        except KeyboardInterrupt:
            raise Interrupted(getattr(config, "interruption_advice", lambda: INTERRUPTED_ADVICE)()) from None

    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for field in dataclasses.fields(config_class):
        flag_type = field_type(config_class, field.name)
        default = field_default(field)
        annotation = Annotated[Optional[flag_type] if default is None else flag_type,
                               typer.Option(help=field.metadata["help"], rich_help_panel=field.metadata["panel"])]
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=default, annotation=annotation))
    config_help = f"A params file whose '{name.replace('-', '_')}:' section sets these options; flags given here win."
    parameters.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[Path], typer.Option(help=config_help)]))
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    app.command(name, help=summary, cls=SectionedCommand)(command)


# The stage commands, in pipeline order: (name, config dataclass, summary); a command's
# code is the module richkd.stages.<name>.
STAGE_COMMANDS = (
    ("demo", options.DemoConfig,
     "Write the built-in demo dataset: small images of eight kinds of object, with a caption each."),
    ("pack", options.PackConfig,
     "Write a split of any dataset richkd reads into webdataset tar shards, the same bytes on every run."),
    ("train-clip", options.TrainClipConfig,
     "Train an open_clip model on a dataset's images and captions: a vision-language teacher of your own."),
    ("precompute", options.PrecomputeConfig,
     "Run the teacher and CLIP over every augmented view of a dataset and cache their outputs in a Zarr store."),
    ("train", options.TrainConfig,
     "Train a model on labels alone: a teacher for your own dataset, or the label-only baseline."),
    ("distill", options.DistillConfig,
     "Train a student against fused teacher and CLIP targets read from a cache (no teacher forward pass)."),
    ("evaluate", options.EvaluateConfig,
     "Accuracy, calibration and confident-correct / confidently-wrong rates of a checkpoint on a split."),
    ("report", options.ReportConfig,
     "Compare teacher, CLIP, fused targets and students: a markdown table and figures."),
)
for stage_command in STAGE_COMMANDS:
    add_stage_command(*stage_command)


@app.command("inspect", cls=SectionedCommand)
def inspect_command(
    store: Annotated[str, typer.Argument(metavar="STORE", help="The cache store (a path or fsspec URL).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    views: Annotated[int | None, typer.Option(help="Only evaluate the first N views (default: all).", min=1)] = None,
    verify_chunks: Annotated[bool, typer.Option(
        "--verify", help="Read every written chunk, check its checksum, and list every damaged or missing "
        "block (exit status 1 if there is one).")] = False,
    verify_view_count: Annotated[int | None, typer.Option(
        "--verify-views", min=1, help="Rebuild N stored views from the dataset (crop, flip, stored augmentation and "
        "mixing), "
        "run the teacher on them and print the largest difference from the stored logits (exit status 1 above "
        f"{options.VIEW_TOLERANCE:g} of a logit's size: float16 rounding is 5e-4).")] = None,
    data_root: Annotated[str | None, typer.Option(
        help="With --verify-views: the dataset's root, if not where precompute read it.")] = None,
    teacher_checkpoint: Annotated[str | None, typer.Option(
        help="With --verify-views: the teacher checkpoint, if not where precompute read it.")] = None,
    device: Annotated[str, typer.Option(help=f"With --verify-views: {DEVICE_CHOICES}.")] = "auto",
) -> None:
    """Show a cache's provenance, arrays and completeness, and the accuracy of its targets."""
    inspect_store = import_interruptibly("richkd.stages.inspect_store")
    try:
        inspect_store.run(store, json_output, views, verify_chunks, verify_view_count, data_root, teacher_checkpoint,
                          device)
    except KeyboardInterrupt:  # it only reads
        raise Interrupted(INTERRUPTED_ADVICE) from None


# Flags of other stages that a stage does without, and what it does instead (rather than the parser's guess of a
# flag spelt alike).
FLAGS_DONE_WITHOUT = {
    ("precompute", "--resume"): "it resumes by itself: run the same command again, and it keeps the "
                                "finished blocks of the store and computes the rest",
}


def refuse_flags_done_without(args: list[str]) -> None:
    command = next((arg for arg in args if not arg.startswith("-")), None)
    for flag in args:
        advice = FLAGS_DONE_WITHOUT.get((command, flag.split("=")[0]))
        if advice is not None:
            raise UserError(f"{command} has no {flag}: {advice}")


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status: 2 with one line on stderr for a user error."""
    args = sys.argv[1:] if argv is None else argv
    try:
        refuse_flags_done_without(args)
        app(args=args, prog_name="richkd")
    except Interrupted as interrupted:
        # --overwrite would throw away what was kept; the advice adds --resume where the stage needs it.
        args = [arg for arg in args if arg not in ("--overwrite", "--resume")]
        command = shlex.join(["richkd", *args])
        console.print(Text.assemble(("interrupted: ", "bold"), str(interrupted).replace("{command}", command)),
                      soft_wrap=True)
        return 130
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except (UserError, OSError) as error:
        if debug_mode["enabled"] or (isinstance(error, OSError) and not is_out_of_space(error)):
            raise
        if isinstance(error, UserError):
            message = one_line(error)
        else:  # a full disk outside the store and training runs, which say themselves what they kept
            where = f" writing {error.filename}" if error.filename else ""
            message = f"no space left on the device{where}; free some space and run the command again"
        console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
        return 2
    return 0


def main() -> None:
    sys.exit(run_cli())

