"""How long richkd takes to start: `--help` of every command, the heaviest imports, and the demo's total start-up.

    python benchmarks/startup.py                                  # this checkout's environment
    python benchmarks/startup.py --python OTHER/.venv/bin/python  # another checkout's, e.g. an older commit

A command's start-up is what it pays before its stage does any work: importing the command line and the code of
its stage (torch for most). `dvc repro` of the demo runs every command of dvc.yaml once per student where a stage
loops over them; the total is the sum of their start-ups. Each time is the least of --repeats runs (the others
were slowed by something else), wall clock, one process at a time.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "pack", "train-clip", "precompute", "train", "distill", "evaluate", "report", "inspect")
# The module of a command's own code.
STAGE_MODULES = {command: f"richkd.stages.{command.replace('-', '_')}" for command in COMMANDS}
STAGE_MODULES["inspect"] = "richkd.stages.inspect_store"
RUN_CLI = "import sys; from richkd.cli import run_cli; sys.exit(run_cli(sys.argv[1:]))"
# Where the probes run: `python -c` imports from its working directory first, and a checkout's richkd/ folder there
# would stand in for the richkd installed beside --python.
NEUTRAL = "/"


def least_seconds(argv: list[str], repeats: int) -> float:
    """The least wall-clock time of `repeats` runs of `argv`, which must succeed."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=NEUTRAL)
        best = min(best, time.perf_counter() - start)
    return best


def heaviest_imports(python: str, statement: str, count: int) -> list[tuple[float, str]]:
    """The `count` packages that `statement` or richkd's modules spend longest importing, each with all it imports
    (`python -X importtime`, whose lines list every module after those it imported, indented one deeper)."""
    finished = subprocess.run([python, "-X", "importtime", "-c", statement], check=True, capture_output=True,
                              text=True, cwd=NEUTRAL)
    lines = [match for line in finished.stderr.splitlines()
             if (match := re.fullmatch(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line))]
    packages: dict[str, float] = {}
    enclosing: list[tuple[int, str]] = []  # (depth, package) of the imports the current line is inside
    for match in reversed(lines):  # each module before those it imported
        depth, package = len(match[2]), match[3].split(".")[0]
        while enclosing and enclosing[-1][0] >= depth:
            enclosing.pop()
        if package != "richkd" and all(outer == "richkd" for _, outer in enclosing):  # not inside another package
            packages[package] = packages.get(package, 0.0) + int(match[1]) / 1e6
        enclosing.append((depth, package))
    return sorted(((seconds, name) for name, seconds in packages.items()), reverse=True)[:count]


def demo_commands(pipeline: Path) -> list[str]:
    """The richkd command of every stage `dvc repro` runs for `pipeline`, a stage looping over the students once
    for each."""
    stages = yaml.safe_load(pipeline.read_text())["stages"]
    params = yaml.safe_load((pipeline.parent / "params.yaml").read_text())
    commands = []
    for stage in stages.values():
        loop = stage.get("foreach")
        runs = len(params[loop.strip("${}")]) if isinstance(loop, str) else len(loop) if loop else 1
        command = (stage["do"] if loop else stage)["cmd"].split()[1]
        commands += [command] * runs
    return commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="The interpreter of the richkd to time.")
    parser.add_argument("--repeats", type=int, default=5, help="Runs of each command; the least time counts.")
    parser.add_argument("--pipeline", type=Path, default=PROJECT / "dvc.yaml", help="The demo's dvc.yaml.")
    options = parser.parse_args()
    python, repeats = options.python, options.repeats
    print(f"richkd of {python}; least of {repeats} runs each, wall clock\n")

    print(f"{'command':<28} seconds")
    print(f"{'python -c pass':<28} {least_seconds([python, '-c', 'pass'], repeats):7.3f}")
    for command in ("", *COMMANDS):
        argv = [command, "--help"] if command else ["--help"]
        seconds = least_seconds([python, "-c", RUN_CLI, *argv], repeats)
        print(f"{'richkd ' + ' '.join(argv):<28} {seconds:7.3f}")

    print("\nheaviest imports of `import richkd.cli` (seconds, each package with what it imports):")
    for seconds, package in heaviest_imports(python, "import richkd.cli", 6):
        print(f"  {package:<24} {seconds:6.3f}")
    print("heaviest imports of `richkd distill` before it trains (the command line and richkd.stages.distill):")
    for seconds, package in heaviest_imports(python, "import richkd.cli, richkd.stages.distill", 6):
        print(f"  {package:<24} {seconds:6.3f}")

    commands = demo_commands(options.pipeline)
    startup = {command: least_seconds([python, "-c", f"import richkd.cli, {STAGE_MODULES[command]}"], repeats)
               for command in sorted(set(commands))}
    total = sum(startup[command] for command in commands)
    print(f"\nthe demo's start-up: {len(commands)} commands, {total:.1f} s in all")
    for command, seconds in startup.items():
        print(f"  {command:<12} {commands.count(command):2d} x {seconds:.2f} s")


if __name__ == "__main__":
    main()
