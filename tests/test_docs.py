"""The docs live in the repository and say true things about it.

- nothing points at files outside the repository (the team's private notes, which a user who clones it lacks);
- every repository path a doc names exists, every relative link resolves, every ``#anchor`` is a heading;
- the Mermaid diagrams of docs/ARCHITECTURE.md name functions that are defined in the files they name;
- docs/config.md is the current list of config fields, and the unknown-field error points at it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stmi.config import FIELDS_DOC, ConfigError, STMIConfig, apply_overrides, fields_reference

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([*(REPO / "docs").glob("*.md"), REPO / "README.md", REPO / "infra/cluster/README.md"])
SKIP_DIRS = {".git", ".venv", ".stmi", ".ruff_cache", ".pytest_cache", "__pycache__", "node_modules"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ".json", ".ini", ""}

# Written so that the pattern does not match itself: references to notes that are not part of the repository.
_SPEC, _STYLE, _DATASETS = "S" "PEC", "ST" "YLE", "DATA" "SETS"
FORBIDDEN = re.compile(rf"\.\./shared|\b(?:{_SPEC}|{_DATASETS}|{_STYLE})\.md\b|\b{_SPEC}\b|\b{_STYLE} (?:section|\d)")
# Files another branch still has to clean up while branches are merged; each entry fails the test once its file is
# clean, so the list cannot go stale. Empty: stmi/eval.py was cleaned on its own branch (merged in main).
PENDING_REFS: set[str] = set()
# Files another branch adds; each entry fails the test once the file exists. Empty: orchestration/report.py is in
# main (branch h-bench).
PENDING_FILES: set[str] = set()

REPO_PATH = re.compile(r"(?<![\w./-])((?:stmi|orchestration|infra|search_spaces|benchmarks|tests|docs)/[\w./-]*"
                       r"\.(?:py|md|yaml|yml|json|toml))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _repo_files() -> list[Path]:
    out = []
    for p in REPO.rglob("*"):
        rel = p.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or not p.is_file():
            continue
        if p.suffix in TEXT_SUFFIXES:
            out.append(p)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def test_nothing_points_outside_the_repository() -> None:
    found: dict[str, list[str]] = {}
    for p in _repo_files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                found.setdefault(p.relative_to(REPO).as_posix(), []).append(f"{n}: {line.strip()}")
    clean_now = sorted(PENDING_REFS - set(found))
    assert not clean_now, f"{clean_now} no longer point outside the repository: remove them from PENDING_REFS"
    stray = {k: v for k, v in found.items() if k not in PENDING_REFS}
    assert not stray, ("references to files that are not in the repository (point at docs/datasets.md, "
                       f"docs/design.md or docs/ARCHITECTURE.md instead): {stray}")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_paths_and_links_in_docs_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = sorted({m for m in REPO_PATH.findall(text) if not (REPO / m).exists()} - PENDING_FILES)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        assert dest.exists(), f"{doc.name}: link to {target} but {dest} does not exist"
        if anchor and dest.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(encoding="utf-8"), flags=re.M)}
            assert anchor in slugs, f"{doc.name}: link to {target} but {dest.name} has no heading #{anchor}"


def test_pending_files_are_still_pending() -> None:
    arrived = sorted(f for f in PENDING_FILES if (REPO / f).exists())
    assert not arrived, f"{arrived} exist now: remove them from PENDING_FILES in {Path(__file__).name}"


def test_architecture_names_python_files_by_their_repository_path() -> None:
    """A bare ``config.py`` once meant ``orchestration/settings.py``: every ``.py`` named must be a full path."""
    text = (REPO / "docs/ARCHITECTURE.md").read_text(encoding="utf-8")
    bare = sorted(set(re.findall(r"(?<![\w/.-])[\w-]+\.py\b", text)))
    assert not bare, f"docs/ARCHITECTURE.md names .py files without their path: {bare}"


def test_architecture_diagrams_name_functions_defined_where_they_say() -> None:
    text = (REPO / "docs/ARCHITECTURE.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```mermaid\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "docs/ARCHITECTURE.md needs the layer diagram and the path of tau"
    assert "hypergraph_incidence" in blocks[1] and "search_spaces/paper.yaml" in blocks[1]
    checked = 0
    for label in re.findall(r'\w+\["([^"]*)"\]', "\n".join(blocks)):
        files = [REPO / p for p in REPO_PATH.findall(label)]
        if not files:
            continue
        sources = "\n".join(f.read_text(encoding="utf-8") for f in files if f.exists())
        for name in re.findall(r"(\w+)\(", label):
            assert re.search(rf"^\s*(?:def|class) {name}\b", sources, flags=re.M), (
                f"the diagram says {name}() is in {[f.relative_to(REPO).as_posix() for f in files]}")
            checked += 1
    assert checked >= 8


def test_config_fields_doc_is_current() -> None:
    doc = REPO / FIELDS_DOC
    assert doc.read_text(encoding="utf-8") == fields_reference() + "\n", (
        f"{FIELDS_DOC} is stale: regenerate it with `make docs`")


def test_unknown_field_names_close_matches_and_where_every_field_is() -> None:
    with pytest.raises(ConfigError) as e:
        apply_overrides(STMIConfig(), {"model.taus": 0.3})
    assert "did you mean model.tau?" in str(e.value) and FIELDS_DOC in str(e.value)
    with pytest.raises(ConfigError) as e:
        apply_overrides(STMIConfig(), {"model.nope": 1})
    assert str(e.value).startswith("unknown config field 'model.nope'") and FIELDS_DOC in str(e.value)
    with pytest.raises(ConfigError, match="did you mean model.alpha_init"):
        apply_overrides(STMIConfig(), {"model.alhpa_init": 0.3})
