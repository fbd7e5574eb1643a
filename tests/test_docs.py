"""Docs match the code: the documents comments cite are in docs/, with the sections they cite."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = ("deepseek-v4.md", "toolchain.md")  # the reference summaries code comments cite by section


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split()]


def _sections(doc: Path) -> set[str]:
    """Section numbers of `doc`'s headings ("## 3. KV" -> "3", "### 3.1 Bytes" -> "3.1")."""
    return {m.group(1) for m in re.finditer(r"^#+ (\d+(?:\.\d+)*)[. ]", doc.read_text(), re.M)}


def test_cited_sections_exist_in_docs():
    sections = {name: _sections(ROOT / "docs" / name) for name in CITED}
    missing = []
    for path in _tracked("*.py", "*.md", "*.sh"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in CITED:
                for m in re.finditer(re.escape(name) + r"([^)\"]*)", line):
                    for sec in re.findall(r"§(\d+(?:\.\d+)*)", m.group(1)):
                        if sec not in sections[name]:
                            missing.append(f"{path.relative_to(ROOT)}:{lineno}: {name} §{sec}")
    assert not missing, "cited sections missing from docs/:\n" + "\n".join(missing)


def test_no_citation_outside_the_repository():
    """The repository stands alone: nothing points at a reference folder outside it."""
    outside = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _tracked("*.py", "*.md", "*.sh", "*.yaml")
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "/work/shared" in line
    ]
    assert not outside, outside


def test_dotted_references_resolve():
    """Every `v4d.<module>[.<name>...]` the docs and code name in backticks exists (no stale module names)."""
    import importlib

    missing = set()
    for path in _tracked("*.py", "*.md"):
        for ref in re.findall(r"`(v4d\.[A-Za-z_][\w.]*)", path.read_text()):
            parts = ref.rstrip(".").split(".")
            if parts[1] == "dev":  # label keys such as `v4d.dev/pool`
                continue
            for i in range(len(parts), 1, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for name in parts[i:]:
                    obj = getattr(obj, name, None)
                break
            else:
                obj = None
            if obj is None:
                missing.add(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, sorted(missing)


def test_code_cites_the_documents_by_their_path_in_the_repository():
    """Code and scripts name `docs/deepseek-v4.md`, not a bare `deepseek-v4.md` a reader cannot find."""
    bare = re.compile(r"(?<![\w/.-])(" + "|".join(re.escape(n) for n in CITED) + ")")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _tracked("*.py", "*.sh")
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert not found, found
