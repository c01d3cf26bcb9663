"""The `richkd` command line.

Stage commands get one flag per field of the stage's config dataclass; `--config params.yaml` fills the
same fields from the file's section for that stage, and flags given on the command line win.
"""

from __future__ import annotations

import dataclasses
import inspect
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from richkd.pipeline.config import build_config, field_default, field_type
from richkd.pipeline.errors import UserError, is_out_of_space, one_line
from richkd.pipeline.runtime import console
from richkd.stages import demo, distill, evaluate, inspect_store, pack, precompute, report, train, train_clip

app = typer.Typer(
    name="richkd",
    help="Distil compact image classifiers from a teacher and CLIP at once, from a cache of their outputs.",
    no_args_is_help=True,
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


def add_stage_command(name: str, config_class: type, run: Callable, summary: str) -> None:
    """A command whose flags are `config_class`'s fields, plus `--config` for a params file."""

    def command(ctx: typer.Context, **values) -> None:
        params_file = values.pop("config")
        # typer bundles its own click, so the source enum is compared by name.
        given = {key: value for key, value in values.items()
                 if getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE"}
        config = build_config(config_class, name.replace("-", "_"), params_file, given)
        try:
            run(config)
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
    app.command(name, help=summary)(command)


# The stage commands, in pipeline order: (name, config dataclass, run function, summary).
STAGE_COMMANDS = (
    ("demo", demo.DemoConfig, demo.run,
     "Write the built-in demo dataset: small images of eight kinds of object, with a caption each."),
    ("pack", pack.PackConfig, pack.run,
     "Write a split of any dataset richkd reads into webdataset tar shards, the same bytes on every run."),
    ("train-clip", train_clip.TrainClipConfig, train_clip.run,
     "Train an open_clip model on a dataset's images and captions: a vision-language teacher of your own."),
    ("precompute", precompute.PrecomputeConfig, precompute.run,
     "Run the teacher and CLIP over every augmented view of a dataset and cache their outputs in a Zarr store."),
    ("train", train.TrainConfig, train.run,
     "Train a model on labels alone: a teacher for your own dataset, or the label-only baseline."),
    ("distill", distill.DistillConfig, distill.run,
     "Train a student against fused teacher and CLIP targets read from a cache (no teacher forward pass)."),
    ("evaluate", evaluate.EvaluateConfig, evaluate.run,
     "Accuracy, calibration and confident-correct / confidently-wrong rates of a checkpoint on a split."),
    ("report", report.ReportConfig, report.run,
     "Compare teacher, CLIP, fused targets and students: a markdown table and figures."),
)
for stage_command in STAGE_COMMANDS:
    add_stage_command(*stage_command)
app.command("inspect")(inspect_store.command)


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status: 2 with one line on stderr for a user error."""
    try:
        app(args=argv, prog_name="richkd")
    except Interrupted as interrupted:
        # --overwrite would throw away what was kept; the advice adds --resume where the stage needs it.
        args = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg not in ("--overwrite", "--resume")]
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
        else:  # a full disk outside the store and the checkpoints, which say themselves what they kept
            where = f" writing {error.filename}" if error.filename else ""
            message = f"no space left on the device{where}; free some space and run the command again"
        console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
        return 2
    return 0


def main() -> None:
    sys.exit(run_cli())

