"""The package as a user meets it: ``python -m hybridmask``, the README and the docs pages."""
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))   # docs/*.md and the pages of its subfolders
MAX_README_LINES = 300

# [text](target) and ![alt](target), with an optional "title" after the target
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def test_python_m_hybridmask_help_exits_0():
    r = subprocess.run([sys.executable, "-m", "hybridmask", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: hybridmask" in r.stdout and "train" in r.stdout


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move detail to docs/"


def _local_targets(text):
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, in-page anchors
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if path:
            yield target, path


def test_readme_relative_links_exist():
    text = README.read_text(encoding="utf-8")
    targets = list(_local_targets(text))
    assert targets, "README.md links no local file"
    missing = [t for t, p in targets if not (README.parent / p).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=[p.relative_to(ROOT / "docs").as_posix() for p in DOCS])
def test_docs_relative_links_exist(page):
    """Every relative link of every docs page resolves (relative to the page's own folder)."""
    targets = list(_local_targets(page.read_text(encoding="utf-8")))
    missing = [t for t, p in targets if not (page.parent / p).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links files that do not exist: {missing}"


def test_docs_pages_are_found():
    assert len(DOCS) >= 10 and (ROOT / "docs" / "DESIGN.md") in DOCS


def test_link_pattern_finds_links_and_images():
    text = "see [a](docs/a.md#x) and ![b](img/b.png \"t\") not [c](https://x.org) nor [d](#top)"
    assert list(_local_targets(text)) == [("docs/a.md#x", "docs/a.md"), ("img/b.png", "img/b.png")]
