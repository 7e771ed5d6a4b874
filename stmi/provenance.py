"""What code and software a run ran on: the code version, the library versions, the device.

:func:`code_version` identifies the code two ways, whichever applies:

- a git checkout (``.git`` above the package): the commit, whether the tree is dirty, and a hash of ``git diff HEAD``
  (so two dirty trees with the same edits get the same value);
- anything else, e.g. a ``ray job submit --working-dir`` upload (Ray skips ``.git``) or an installed wheel: a content
  hash of the project's source files (``*.py``, ``*.yaml``, ``*.json``, ``*.toml`` under ``stmi/``,
  ``orchestration/``, ``infra/``, ``search_spaces/`` and ``pyproject.toml``), with the package version. The same code
  uploaded twice gets the same hash; a one-line change gets another.

The content hash is always computed, so a run from a checkout and a run from an upload of that checkout can be
compared by it. Pure Python: no Ray, MLflow or git library (git is called as a program when present).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import stmi

SOURCE_DIRS = ("stmi", "orchestration", "infra", "search_spaces")
SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml")
SOURCE_FILES = ("pyproject.toml",)
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "ray", "mlflow", "optuna", "numpy")


def project_root() -> Path:
    """The folder that holds the imported ``stmi`` package (a checkout, an upload, or site-packages)."""
    return Path(stmi.__file__).resolve().parent.parent


def source_files(root: Path | None = None) -> list[Path]:
    """The files :func:`source_hash` covers, sorted by relative path (caches and bytecode excluded)."""
    root = root or project_root()
    out: list[Path] = [root / f for f in SOURCE_FILES if (root / f).is_file()]
    for d in SOURCE_DIRS:
        base = root / d
        if not base.is_dir():
            continue
        for p in base.rglob("*"):
            if (p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)):
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def source_hash(root: Path | None = None) -> str:
    """sha256 over the relative paths and contents of :func:`source_files` (first 16 hex characters)."""
    root = root or project_root()
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def _git(root: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.decode(errors="replace") if r.returncode == 0 else None


@dataclass(frozen=True)
class CodeVersion:
    """How the code of a run is identified (see the module docstring)."""

    source_hash: str
    package_version: str
    git_commit: str | None = None
    git_dirty: bool | None = None
    git_diff_hash: str | None = None
    """sha256 (16 hex) of ``git diff HEAD`` when the tree is dirty, else None."""

    @property
    def label(self) -> str:
        """One short string: ``git:<commit12>[+dirty:<diffhash>]`` or ``src:<hash>`` (with the version)."""
        if self.git_commit:
            dirty = f"+dirty:{self.git_diff_hash}" if self.git_dirty else ""
            return f"git:{self.git_commit[:12]}{dirty}"
        return f"src:{self.source_hash} (stmi {self.package_version})"

    def tags(self) -> dict[str, str]:
        """As run tags (``stmi.code.*``); MLflow's own ``mlflow.source.git.commit`` where a commit is known."""
        t = {"stmi.code.version": self.label, "stmi.code.source_hash": self.source_hash,
             "stmi.code.package_version": self.package_version}
        if self.git_commit:
            t.update({"stmi.code.git_commit": self.git_commit, "stmi.code.git_dirty": str(bool(self.git_dirty)),
                      "mlflow.source.git.commit": self.git_commit})
            if self.git_diff_hash:
                t["stmi.code.git_diff_hash"] = self.git_diff_hash
        return t


def code_version(root: Path | None = None) -> CodeVersion:
    """The :class:`CodeVersion` of the imported project (git facts only inside a git work tree)."""
    root = root or project_root()
    src = source_hash(root)
    version = getattr(stmi, "__version__", "unknown")
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root:
        return CodeVersion(src, version)
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    if commit is None:  # a repository without commits
        return CodeVersion(src, version)
    status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
    dirty = bool(status.strip())
    diff_hash = None
    if dirty:
        diff = _git(root, "diff", "HEAD", "--binary") or ""
        diff_hash = hashlib.sha256(diff.encode()).hexdigest()[:16]
    return CodeVersion(src, version, commit, dirty, diff_hash)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on (``missing`` where not installed), without importing
    them, plus Python's."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def device_facts(device: str | None = None, world_size: int = 1) -> dict[str, str]:
    """Torch's CUDA / cuDNN build, the device model and the world size."""
    import torch

    facts = {"cuda": str(torch.version.cuda or "none"),
             "cudnn": str(torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none"),
             "world_size": str(world_size)}
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(dev)
    else:
        facts["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return facts


def run_tags(device: str | None = None, world_size: int = 1, root: Path | None = None) -> dict[str, str]:
    """Everything above as flat run tags: ``stmi.code.*``, ``stmi.version.<lib>``, ``stmi.device.*``."""
    tags = code_version(root).tags()
    tags.update({f"stmi.version.{k}": v for k, v in library_versions().items()})
    tags.update({f"stmi.device.{k}": v for k, v in device_facts(device, world_size).items()})
    return tags
