"""The documentation: the CLI reference is what the CLI says, and every link resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = [line.lstrip("#").strip() for line in outside_code(markdown).splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def outside_code(markdown: str) -> str:
    return re.sub(r"```.*?```", "", markdown, flags=re.S)


def test_the_cli_reference_is_generated_from_the_cli(tmp_path):
    generated = tmp_path / "cli.md"
    subprocess.run([str(Path(sys.executable).parent / "typer"), "richkd.cli", "utils", "docs", "--name", "richkd",
                    "--title", "richkd command reference", "--output", str(generated)], check=True,
                   capture_output=True)
    assert generated.read_text() == (PROJECT / "docs" / "cli.md").read_text(), (
        'docs/cli.md is stale: typer richkd.cli utils docs --name richkd --title "richkd command reference" '
        "--output docs/cli.md")


def test_every_link_of_the_readme_and_the_docs_resolves():
    pages = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
    links = 0
    for page in pages:
        for target in LINK.findall(outside_code(page.read_text())):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in heading_anchors(linked.read_text()), f"{page.name} links to a missing {target}"
            links += 1
    assert links >= 8  # the README's table of documents at least
    readme = (PROJECT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
