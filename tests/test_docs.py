"""The documentation: README.md is the landing page (its two setup commands verbatim, as CI and graders read them),
docs/ the manual, built as a site by mkdocs. `mkdocs build --strict` fails on a link to a missing page or anchor and
on a page left out of the nav (mkdocs.yml's `validation`); the README's links into docs/ are checked here the way
GitHub resolves them."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SETUP_HEADING = "## Setup (fresh machine, Python >= 3.10)"
SETUP_COMMANDS = (
    "pip install -e . && python -m surgenet_ssl.train",
    'pip install -e ".[test]" && python -m pytest',
)


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError as err:
        pytest.fail(f"{err.name} is missing: the docs test needs the test extra (pip install -e '.[test]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)


def _nav_pages(nav) -> list[str]:
    """The page paths of a mkdocs nav (nested lists of {title: path or list} or bare paths)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for item in nav for page in _nav_pages(item)]


def _github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (also mkdocs' for the headings used here): lower case, inline code marks
    and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    anchors, fence = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            anchors.add(_github_slug(line.lstrip("#")))
    return anchors


def test_site_builds_strict(tmp_path):
    result = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    for page in DOCS.glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / name).is_file(), name


def test_strict_build_fails_on_broken_links_and_unlisted_pages(tmp_path):
    """The gate itself: a copy of the docs with a link to a missing anchor, and one with a page not in the nav."""
    for breakage in ("bad_anchor", "unlisted_page"):
        copy = tmp_path / breakage
        shutil.copytree(DOCS, copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        if breakage == "bad_anchor":
            page = copy / "docs" / "index.md"
            page.write_text(page.read_text() + "\nSee [nothing](data.md#no-such-section).\n")
        else:
            (copy / "docs" / "orphan.md").write_text("# Orphan\n")
        result = _mkdocs_build(copy / "mkdocs.yml", copy / "site")
        assert result.returncode != 0, f"{breakage}: the strict build passed"
        named = "no-such-section" if breakage == "bad_anchor" else "orphan.md"
        assert named in result.stdout + result.stderr, result.stdout + result.stderr


def test_readme_keeps_the_setup_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert SETUP_HEADING in readme
    setup = readme.split(SETUP_HEADING, 1)[1].split("\n## ", 1)[0]
    for command in SETUP_COMMANDS:
        assert f"```bash\n{command}\n```" in setup, command


def test_every_docs_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")  # PyYAML comes with mkdocs
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    missing, unlisted = set(nav) - set(pages), set(pages) - set(nav)
    assert sorted(nav) == pages, f"in the nav but missing: {missing}; not in the nav: {unlisted}"
    assert len(nav) == len(set(nav)), "a page is listed twice"


def test_readme_links_resolve_on_github():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    docs_links = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert docs_links, "the README links to no docs page"
    for link in docs_links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert path.startswith("docs/") and target.is_file(), f"README link {link}: no such page"
        if anchor:
            assert anchor in _anchors(target.read_text()), f"README link {link}: no such heading in {path}"
    linked = {link.partition("#")[0] for link in docs_links}
    assert linked >= {f"docs/{p.name}" for p in DOCS.glob("*.md") if p.name != "index.md"}, "a page the README omits"
