"""Code versions (git checkout or content hash of an upload) and data fingerprints."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from stmi.data import load_dataset
from stmi.data.fingerprint import fingerprint_dataset
from stmi.data.synth import make_synthetic
from stmi.provenance import SOURCE_DIRS, code_version, library_versions, project_root, run_tags, source_hash


def _upload(dst: Path) -> Path:
    """What ``ray job submit --working-dir`` ships: the sources without ``.git``."""
    root = project_root()
    for d in SOURCE_DIRS:
        shutil.copytree(root / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(root / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_same_code_uploaded_twice_same_hash_and_a_one_line_change_differs(tmp_path: Path) -> None:
    a, b = _upload(tmp_path / "a"), _upload(tmp_path / "b")
    (b / "stmi" / "__pycache__").mkdir(exist_ok=True)
    (b / "stmi" / "__pycache__" / "junk.pyc").write_bytes(b"bytecode is not code")
    assert source_hash(a) == source_hash(b)
    va = code_version(a)
    assert va.git_commit is None and va.label.startswith(f"src:{va.source_hash}")
    f = b / "stmi" / "losses.py"
    f.write_text(f.read_text() + "\n# one more line\n")
    assert source_hash(a) != source_hash(b)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_checkout_commit_dirty_and_diff_hash(tmp_path: Path) -> None:
    repo = _upload(tmp_path / "repo")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env, capture_output=True)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    clean = code_version(repo)
    assert clean.git_commit == head and clean.git_dirty is False and clean.git_diff_hash is None
    assert clean.tags()["mlflow.source.git.commit"] == head
    f = repo / "stmi" / "losses.py"
    f.write_text(f.read_text() + "\n# edit\n")
    dirty = code_version(repo)
    assert dirty.git_dirty is True and dirty.git_diff_hash and dirty.label.endswith(dirty.git_diff_hash)
    assert dirty.source_hash != clean.source_hash
    f.write_text(f.read_text() + "# another edit\n")
    assert code_version(repo).git_diff_hash != dirty.git_diff_hash


def test_run_tags_name_versions_and_device() -> None:
    tags = run_tags(device="cpu", world_size=2)
    assert tags["stmi.device.world_size"] == "2" and tags["stmi.device.device"].startswith("cpu")
    assert tags["stmi.version.torch"] == library_versions()["torch"] != "missing"
    assert "stmi.code.version" in tags and "stmi.version.mlflow" in tags


def test_data_fingerprint_changes_on_touch_replace_and_not_on_move(tmp_path: Path) -> None:
    root = make_synthetic("rgbnt201", tmp_path / "d", ids=4, seed=0, images_per_id=2, cameras=2)
    splits = load_dataset("rgbnt201", root)
    before = fingerprint_dataset(splits)
    assert before["query"].digest == before["gallery"].digest  # RGBNT201 shares its test list
    assert before["train"].files == len({p for t in splits.train for p in (t.rgb, t.nir, t.tir, t.mask)}) + 1
    content = fingerprint_dataset(splits, content=True)
    from stmi.data.check import check_dataset  # `stmi-data check` prints the digests the runs log

    assert check_dataset("rgbnt201", root).fingerprints == {s: f.digest for s, f in before.items()}

    mask = splits.train[0].mask
    st = os.stat(mask)
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: mtime changes, bytes do not
    touched = fingerprint_dataset(load_dataset("rgbnt201", root))
    assert touched["train"].digest != before["train"].digest and touched["query"].digest == before["query"].digest
    assert fingerprint_dataset(load_dataset("rgbnt201", root), content=True)["train"].digest == \
        content["train"].digest

    caption = next((splits.root / "text").glob("train*.json"))
    caption.write_text(caption.read_text().replace("a ", "an ", 1))  # a caption edited
    assert fingerprint_dataset(load_dataset("rgbnt201", root), content=True)["train"].digest != \
        content["train"].digest

    here = fingerprint_dataset(load_dataset("rgbnt201", root))
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "d"), str(moved))  # a move keeps mtimes, and paths are relative
    again = fingerprint_dataset(load_dataset("rgbnt201", moved))
    assert {s: f.digest for s, f in again.items()} == {s: f.digest for s, f in here.items()}
    assert fingerprint_dataset(load_dataset("rgbnt201", moved), content=True)["query"].digest == \
        content["query"].digest
