"""The repository stands on its own: no tracked file cites a document that does not ship with it,
and every relative link in the docs points at a file that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
OUTSIDE = re.compile(r"DESIGN\.md|PEER_NOTES|STYLE\.md|\.\./shared")


def tracked() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in names if (ROOT / name).suffix in {".py", ".md", ".yaml", ".toml", ".sh", ".txt"}]


def test_no_file_cites_a_document_outside_the_repository():
    citing = [str(path.relative_to(ROOT)) for path in tracked()
              if path.name != Path(__file__).name and OUTSIDE.search(path.read_text(errors="replace"))]
    assert not citing, citing


def published(doc: Path, target: str) -> bool:
    """A docs page's link to a figure under ``bench/``, which the site's hook publishes at that path."""
    return doc.parent == ROOT / "docs" and target.startswith("bench/") and (ROOT / target).exists()


def test_relative_links_in_the_docs_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists() and not published(doc, target):
                broken.append(f"{doc.name}: {target}")
    assert not broken, broken
