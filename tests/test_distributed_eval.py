"""Sharded evaluation feature extraction: 2 real gloo processes gather exactly the single-process features."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from stmi.distributed_eval import extract_features_sharded, shard_range
from stmi.eval import extract_features
from stmi.model.network import build_model
from tests.test_model import H, W, tiny_cfg

N = 11  # uneven: shards of 5 and 6

pytestmark = pytest.mark.slow  # minutes on 2 CPUs: kept out of `make test-fast`


class _Records(Dataset):
    """Evaluation records in the TripletDataset batch format (images, mask, camid, pid, sceneid, index)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        mask = torch.zeros(1, H, W)
        mask[:, 16:48, 8:24] = 1.0
        return {"rgb": torch.randn(3, H, W, generator=g), "nir": torch.randn(3, H, W, generator=g),
                "tir": torch.randn(3, H, W, generator=g), "mask": mask, "has_mask": True, "camid": i % 2,
                "pid": 100 + i // 2, "sceneid": i % 3, "index": i}


def _loader() -> DataLoader:
    return DataLoader(_Records(), batch_size=4, shuffle=False)


def _worker(rank: int, world: int, port: int, weights: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = build_model(tiny_cfg())
        model.load_state_dict(torch.load(weights))
        f = extract_features_sharded(model, _loader(), "cpu", rank, world)
        torch.save({"feats": f.feats, "pids": f.pids, "camids": f.camids, "sceneids": f.sceneids},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_ranges_cover_the_dataset_contiguously() -> None:
    for n, w in [(11, 2), (3, 4), (0, 2), (100, 7)]:
        parts = [shard_range(n, r, w) for r in range(w)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_gloo_ranks_gather_the_single_process_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    torch.save(model.state_dict(), tmp_path / "w.pt")
    ref = extract_features(model, _loader(), "cpu")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "w.pt"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["feats"].shape == ref.feats.shape == (N, model.embedding_dim)
        torch.testing.assert_close(got["feats"], ref.feats, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["pids"], ref.pids)
        np.testing.assert_array_equal(got["camids"], ref.camids)
        np.testing.assert_array_equal(got["sceneids"], ref.sceneids)
    assert list(ref.pids) == [100 + i // 2 for i in range(N)]  # dataset order
