"""The README is the front door and docs/ the reference: the README stays short, every relative link in either
points to a file (and heading) that exists, and every command the README tells a newcomer to type exists: each
`raytune-ft` command and option in the command line, each `make` target in the Makefile, each job file in jobs/."""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest
from test_cli import command_tree

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted([README, *DOCS.rglob("*.md")])

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def prose(text: str) -> str:
    """TEXT without its fenced code blocks, where a bracket pair is code, not a link."""
    return FENCE.sub("", text)


def code_blocks(text: str) -> list[str]:
    return [block.split("\n", 1)[1] for block in FENCE.findall(text)]


def slug(heading: str) -> str:
    """The id Python-Markdown's toc extension gives a heading (MkDocs' default): an explicit `{#id}`, else the
    text without markup, lower case, punctuation dropped, spaces as hyphens."""
    explicit = re.search(r"\{#([^}]+)\}\s*$", heading)
    if explicit:
        return explicit.group(1)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    found = {slug(line.lstrip("#").strip()) for line in prose(text).splitlines() if re.match(r"#{1,6} ", line)}
    return found | set(re.findall(r'id="([^"]+)"', text))


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_readme_is_at_most_300_lines():
    assert len(README.read_text().splitlines()) <= 300


def test_the_readme_points_into_each_reference_page():
    links = {t.split("#")[0] for t in relative_links(README)}
    for page in ("config", "cli", "benchmarks", "architecture", "extending", "index"):
        assert f"docs/{page}.md" in links, page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} -> {file} does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: {target}: no heading or id '{anchor}' in {file.name}"


def test_the_heading_ids_are_computed_as_mkdocs_computes_them():
    assert slug("GPU-scale throughput (`bench lm`)") == "gpu-scale-throughput-bench-lm"
    assert slug("`data` {#data}") == "data"
    assert slug("## A [link](x.md) here") == "a-link-here"


def commands_in(text: str, program: str) -> list[list[str]]:
    """Each `PROGRAM ...` the code blocks of TEXT run, as words, comments dropped; a line may hold several commands
    joined by && or ;."""
    found = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ").split(" #")[0]
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part)
                if words and words[0] == program:
                    found.append(words[1:])
    return found


def tour() -> str:
    text = README.read_text()
    return text[text.index("## A five-minute tour") :].split("\n## ", 1)[0]


CLICK = dict(command_tree())


def resolve(words: list[str]) -> tuple[tuple[str, ...], object]:
    """The deepest command WORDS name (`bench serve URL` -> ("bench", "serve")) and its click command."""
    path: tuple[str, ...] = ()
    for word in words:
        if (*path, word) not in CLICK:
            break
        path = (*path, word)
    return path, CLICK.get(path)


def test_every_raytune_ft_command_and_option_the_readme_shows_exists():
    shown = commands_in(README.read_text(), "raytune-ft")
    assert len(shown) >= 8
    for words in shown:
        path, command = resolve(words)
        assert path, f"`raytune-ft {' '.join(words)}`: no such command"
        options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for word in words[len(path) :]:
            if word.startswith("--"):
                assert word.split("=")[0] in options | {"--help"}, f"`raytune-ft {' '.join(path)}` has no {word}"


def test_the_tour_walks_validate_train_tune_serve_bench_report_on_a_shipped_quick_job():
    used = [resolve(words)[0] for words in commands_in(tour(), "raytune-ft")]
    steps = [("validate",), ("train",), ("tune",), ("serve",), ("bench", "serve"), ("report",)]
    positions = [used.index(step) for step in steps]
    assert positions == sorted(positions), used
    jobs = set(re.findall(r"jobs/[\w.-]+\.yaml", tour()))
    assert jobs and all(job.endswith("-quick.yaml") and (ROOT / job).is_file() for job in jobs), jobs


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", (ROOT / "Makefile").read_text(), re.M))


def test_every_make_target_the_readme_names_exists():
    text = README.read_text()
    named = {words[0] for words in commands_in(text, "make") if words}
    named |= set(re.findall(r"`make ([a-z][\w-]*)", text))
    assert {"run", "test", "setup"} <= named
    assert named <= makefile_targets(), named - makefile_targets()


def test_the_readme_says_what_make_run_runs():
    """The experiment the Makefile's `run` target defaults to is the one the README describes."""
    default = re.search(r"^EXPERIMENT \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"raytune-ft run {default}" in README.read_text()
    assert "$(BIN)/raytune-ft run $(EXPERIMENT)" in (ROOT / "Makefile").read_text()


def test_every_job_file_the_readme_names_is_shipped():
    for job in set(re.findall(r"jobs/[\w.-]+\.yaml", README.read_text())) - {"jobs/other.yaml"}:
        assert (ROOT / job).is_file(), job
