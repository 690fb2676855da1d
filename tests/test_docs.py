"""The repository is self-contained: it points at its own design document, never outside itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN_DOC = ROOT / "docs" / "design.md"
# Spelled in pieces so that this file does not match itself.
FOREIGN = ("DESIGN" + ".md", ".." + "/shared")


def tracked_text_files() -> dict[str, str]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    files = {}
    for name in filter(None, names.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        files[name] = data.decode("utf-8", errors="replace")
    return files


def test_no_tracked_file_refers_outside_the_repository() -> None:
    files = tracked_text_files()
    assert "docs/design.md" in files and "README.md" in files  # the listing really covers the repo
    hits = [
        f"{name}:{n}: {line.strip()}"
        for name, text in files.items()
        for n, line in enumerate(text.splitlines(), 1)
        if any(s in line for s in FOREIGN)
    ]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_design_pointers_name_existing_sections() -> None:
    # "docs/design.md section N" anywhere must name a numbered heading of the document
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN_DOC.read_text(), re.M)}
    assert {1, 3, 4, 5, 6} <= sections  # method, frame rate, layer indices, stage graph, formats
    pointers = [
        (name, int(n))
        for name, text in tracked_text_files().items()
        for n in re.findall(r"design\.md,? section (\d+)", text)
    ]
    assert pointers, "nothing points at docs/design.md"
    assert not [p for p in pointers if p[1] not in sections], pointers
