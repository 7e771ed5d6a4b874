"""The README's Python example runs as written (a README that drifts from the code fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its Python example"
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)  # noqa: S102 - our own README
    emb = scope["emb"]
    assert emb.shape == (2, scope["model"].embedding_dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert set(scope["out"].feats) >= {"G", "U", "T"}
