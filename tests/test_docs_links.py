"""The facts the code relies on live in docs/, inside the repository: no file cites the developers' private
reference folder, and every `docs/<page>.md#<anchor>` a file names is a heading of that page (GitHub's anchor
rule), so a comment's pointer cannot silently go stale when a page is edited."""
from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".lint",
             "node_modules", "demo_output", "demo_face", "tokenizers"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".js", ".css", ".html", ".tsv",
                 ".json", ".sh"}
SECTION = "\u00a7"  # the section sign, spelled out so this file does not match its own patterns
PRIVATE = re.compile("|".join([
    "shared" + r"/reference",
    r"reference\s*(?:spec\b|section\s*\d|" + SECTION + ")",
    SECTION + r"\s*\d",
    r"\b(?:dataset_tools|face_recipes|face_swap|lora_trainer|merge_and_grid|style_and_ui)\.md\b",
    r"\bsd_scripts_flags\.tsv\b",
]), re.IGNORECASE)
# docs/<page>.md, optionally with #anchor, named anywhere; inside docs/, also markdown links to a sibling page or #anchor
DOCS_LINK = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
SIBLING_LINK = re.compile(r"\]\((?:([\w.-]+\.md))?(?:#([\w-]+))?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a markdown page: its headings' slugs (repeats get -1, -2, ... as on GitHub) and <a id>s."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        out.update(HTML_ANCHOR.findall(line))
        m = None if fenced else HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def text_files(root: Path) -> list[Path]:
    """The repository's text files, this one left out (its own test writes links to pages that do not exist)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES and path.resolve() != Path(__file__).resolve() and not path.is_symlink() \
                    and path.stat().st_size < 2_000_000:
                out.append(path)
    return out


def private_citations(root: Path) -> list[str]:
    """`file:line: text` of every line citing the private reference folder."""
    found = []
    for path in text_files(root):
        for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{path.relative_to(root)}:{no}: {line.strip()}")
    return found


def broken_links(root: Path) -> list[str]:
    """`file:line: link (why)` of every docs link whose page or anchor does not exist."""
    docs = root / "docs"
    cache: dict[Path, set[str]] = {}
    found = []
    for path in text_files(root):
        in_docs = path.parent == docs and path.suffix == ".md"
        for no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            links = [(docs / page, anchor) for page, anchor in DOCS_LINK.findall(line)]
            if in_docs:
                links += [(docs / page if page else path, anchor) for page, anchor in SIBLING_LINK.findall(line) if page or anchor]
            for page, anchor in links:
                where = f"{path.relative_to(root)}:{no}: {page.relative_to(root)}" + (f"#{anchor}" if anchor else "")
                if not page.is_file():
                    found.append(f"{where} (no such page)")
                elif anchor and anchor not in cache.setdefault(page, anchors(page)):
                    found.append(f"{where} (no such heading)")
    return found


def test_slugs_follow_githubs_rule():
    assert slug("Merger colour transfer") == "merger-colour-transfer"
    assert slug("The `t` modifier") == "the-t-modifier"
    assert slug("DF and LIAE wiring") == "df-and-liae-wiring"
    assert slug("Debiased estimation and v-prediction scaling") == "debiased-estimation-and-v-prediction-scaling"
    assert slug("A [linked](other.md) title: (IA)3, x/y") == "a-linked-title-ia3-xy"


def test_the_checks_find_private_citations_and_stale_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Real section\n\nSee [there](#real-section), [gone](#gone).\n"
                                               "```\n## not a heading\n```\n## Twice\n## Twice\n", encoding="utf-8")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        f'"""Losses (reference {SECTION}3) and docs/page.md#real-section."""\n'
        "# docs/page.md#not-a-heading, docs/page.md#twice-1, docs/missing.md\n"
        "# see shared/" + "reference/face_" + "swap.md\n", encoding="utf-8")
    assert [c.split(":")[1] for c in private_citations(tmp_path)] == ["1", "3"]
    assert broken_links(tmp_path) == [
        "docs/page.md:5: docs/page.md#gone (no such heading)",
        "pkg/a.py:2: docs/page.md#not-a-heading (no such heading)",
        "pkg/a.py:2: docs/missing.md (no such page)",
    ]


def test_nothing_cites_the_private_reference_folder():
    found = private_citations(ROOT)
    assert not found, "cite docs/*.md (our words, public sources) instead:\n" + "\n".join(found)


def test_every_docs_link_names_an_existing_page_and_heading():
    found = broken_links(ROOT)
    assert not found, "\n".join(found)


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md does not link: {', '.join(missing)}"
