"""The docs hold together: every relative link and anchor resolves, the README stays short and starts with the two
commands CI runs, the "Where to change what" table names files that exist (the same table in README.md and
CONTRIBUTING.md), the docs that configs and messages point at exist, and no user doc uses a setting that is gone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import REPO

USER_DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS = [*USER_DOCS, REPO / "CONTRIBUTING.md"]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
README_LIMIT = 200  # lines: a README a newcomer reads in five minutes; the rest is in docs/


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    found: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks."""
    text = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.S | re.M)
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


# A file of this repository named in a doc's text, e.g. `src/finetune/callbacks/unfreeze.py` or `tests/test_ddp.py`.
NAMED_FILE = re.compile(r"(?<![\w/.<])((?:src/|tests/|scripts/|conf/|finetune/)[\w/.-]+\.(?:py|yaml))")


def test_every_file_a_doc_names_exists():
    named = {
        (doc.name, "src/" + path if path.startswith("finetune/") else path)
        for doc in DOCS
        for path in NAMED_FILE.findall(doc.read_text())
    }
    assert len(named) > 20 and not [(doc, path) for doc, path in named if not (REPO / path).exists()]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in links(REPO / "README.md")}
    assert {p.resolve() for p in (REPO / "docs").glob("*.md")} <= linked


def test_the_readme_is_short_and_starts_with_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_LIMIT
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == [
        'pip install -e ".[dev]" && python -m finetune.train',
        'pip install -e ".[dev]" && python -m pytest -q -n auto',
    ]
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[dev]"' in ci and "\npython -m pytest -q -n auto\n" in ci


def where_to_change(doc: Path) -> list[list[str]]:
    section = re.search(r"^## Where to change what\n(.*?)(?=^## )", doc.read_text(), re.S | re.M)
    assert section, f"{doc.name} has no '## Where to change what' section"
    rows = [line.strip().strip("|").split(" | ") for line in section.group(1).splitlines() if line.startswith("|")]
    return rows[2:]


def test_the_where_to_change_table_is_the_same_in_readme_and_contributing_and_names_real_files():
    rows = where_to_change(REPO / "README.md")
    assert rows == where_to_change(REPO / "CONTRIBUTING.md")
    assert len(rows) == 6
    for task, files, _ in rows:
        paths = re.findall(r"`((?:src|conf)/[^`]+)`", files)
        assert 1 <= len(paths) <= 3, task  # at most two files to change (a row may name a third it could need)
        for path in paths:
            known = REPO / path.split("<")[0]  # conf/model/criterion/<name>.yaml: its folder must exist
            assert known.exists(), f"{task}: {path}"
    tests = (REPO / "tests" / "test_extending.py").read_text()
    assert tests.count("\n# --- ") >= len(rows)  # one test section per row


# A reference from the code or the configs to a doc, e.g. ``docs/configuration.md, 'Working offline'`` or
# ``docs/scaling.md#streaming-shards``: the page, and the section it names, exist.
REFERENCE = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+)|, ['\"]([^'\"]+)['\"])?")


def test_docs_named_by_the_code_and_the_configs_exist():
    missing = []
    sources = [*(REPO / "src").rglob("*.py"), *(REPO / "conf").rglob("*.yaml"), *(REPO / "scripts").glob("*.py")]
    for source in sources:
        for page, anchor, heading in REFERENCE.findall(source.read_text()):
            doc = REPO / "docs" / page
            if not doc.exists():
                missing.append(f"{source.name}: docs/{page}")
            elif anchor and anchor not in anchors(doc):
                missing.append(f"{source.name}: docs/{page}#{anchor}")
            elif heading and not any(a.startswith(slug(heading)) for a in anchors(doc)):
                missing.append(f"{source.name}: docs/{page}, {heading!r}")
    assert not missing


# Settings that were renamed: docs, configs and scripts use the new ones (README, docs, --help, docstrings).
GONE = {
    r"model\.cache_features": "features=cached",
    r"model\.unfreeze_at_epoch": "+callbacks=unfreeze callbacks.unfreeze.epoch=N",
    r"model\.ema_decay": "+callbacks=ema callbacks.ema.decay=X",
    r"model\.(mixup|cutmix)_alpha": "+callbacks=mixup callbacks.mixup.mixup_alpha=A",
    r"model\.label_smoothing": "model.criterion.label_smoothing",
    r"model\.compile\b": "+callbacks=compile",
    r"model\.channels_last": "+callbacks=channels_last",
    r"data\.augment=": "data.augmentation=null or data.augmentation.policy=...",
    r"data\.(crop_scale|random_erasing)": "data.augmentation.crop_scale, data.augmentation.random_erasing",
    r"(?<!scheduler\.)scheduler\.T_max": "scheduler.scheduler.T_max",
}


def test_no_doc_config_or_script_uses_a_renamed_setting():
    files = [*DOCS, *(REPO / "conf").rglob("*.yaml"), *(REPO / "scripts").glob("*.py"), *(REPO / "src").rglob("*.py")]
    files += sorted((REPO / "docs").rglob("*.csv"))
    found = [
        f"{path.relative_to(REPO)}: {match.group(0)} (now {new})"
        for path in files
        for pattern, new in GONE.items()
        for match in re.finditer(pattern, path.read_text())
    ]
    assert not found


def test_user_docs_name_no_machine_paths():
    for doc in USER_DOCS:
        text = doc.read_text()
        assert "../shared" not in text and "/work/" not in text, doc.name
