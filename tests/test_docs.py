"""Docs that cannot rot: every relative link and image in README.md and docs/
exists (and the heading an anchor names), and every `python train.py ...`
example composes, so a renamed file, heading or option breaks this test and
not a reader's command. Composition checks names and values, not data folders
(an example that needs one says so in its text)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from vqtrain.config import check_config, compose

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
TRAIN = re.compile(r"(?:^|[\s`$])(?:\S*/)?python3? train\.py(?=\s|$)(.*)")
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-name", "-cn", "--config-dir", "-cd"}


def without_code_blocks(text: str) -> str:
    """The text with fenced and indented code blocks blanked, line numbers kept."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    return re.sub(r"^(?: {4}|\t).*$", "", text, flags=re.M)


def prose(text: str) -> str:
    """The text outside code blocks and inline code (links there are not links)."""
    return re.sub(r"`[^`]*`", "", without_code_blocks(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M):
        base, n = slug(heading), 0
        while (name := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(name)
    return found


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    return problems


def train_examples(page: Path) -> list[tuple[str, str]]:
    """(where, command line) for every `python train.py ...` in a code block or inline code span."""
    text = page.read_text()
    examples = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(("    ", "\t")) or in_fence(text, number):
            if match := TRAIN.search(line):
                examples.append((f"{page.relative_to(REPO)}:{number}", match.group(1)))
    blanked = without_code_blocks(text)
    for span in re.finditer(r"`([^`]*)`", blanked):  # inline code, possibly over two lines
        if match := TRAIN.search(" ".join(span.group(1).split())):
            number = blanked[: span.start()].count("\n") + 1
            examples.append((f"{page.relative_to(REPO)}:{number}", match.group(1)))
    return examples


def in_fence(text: str, number: int) -> bool:
    return sum(line.startswith("```") for line in text.splitlines()[: number - 1]) % 2 == 1


def override_sets(arguments: str) -> list[list[str]]:
    """The overrides a command line composes: a sweep (`-m a=1,2 b=x,y`) gives one
    set per swept value (the other sweeps at their first value), not every combination."""
    words = shlex.split(arguments, comments=True)
    overrides, skip = [], False
    for word in words:
        if skip or word.startswith("-"):
            skip = word in FLAGS_WITH_VALUE
            continue
        overrides.append(word)
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [
        o.input_line if not o.is_sweep_override() else f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
        for o in parsed
    ]
    sets = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            sets += [
                first[:i] + [f"{o.get_key_element()}={value}"] + first[i + 1 :]
                for value in list(o.sweep_string_iterator())[1:]
            ]
    return sets


# `python train.py ...` alone is the generic form, not an example
EXAMPLES = [(where, args) for page in PAGES for where, args in train_examples(page) if args.strip() != "..."]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_images_exist(page: Path):
    problems = broken_links(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("where, arguments", EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_train_example_composes(where: str, arguments: str, tmp_path: Path):
    problem = None
    try:
        for overrides in override_sets(arguments):
            check_config(compose(overrides, tmp_path))
    except Exception as error:  # any failure to compose or check is the finding
        problem = f"{where}: python train.py {arguments.strip()}\n{type(error).__name__}: {error}"
    if problem:
        pytest.fail(problem, pytrace=False)


def test_the_docs_have_examples_and_links():
    """The extraction itself works: a test that finds nothing checks nothing."""
    assert len(EXAMPLES) >= 20
    assert sum(len(LINK.findall(prose(page.read_text()))) for page in PAGES) >= 30
    assert slug("LFQ's inverse temperature: 5") == "lfqs-inverse-temperature-5"
    assert slug("Residual LFQ (`rlfq`)") == "residual-lfq-rlfq"
    assert override_sets("-m quantizer=vq,fsq trainer.max_steps=5  # a sweep") == [
        ["quantizer=vq", "trainer.max_steps=5"],
        ["quantizer=fsq", "trainer.max_steps=5"],
    ]
