"""Data: readers of RGBNT201 / RGBNT100 / MSVR310, paired transforms, the P x K sampler and the run's loaders.

See docs/ARCHITECTURE.md (``stmi.data``) and docs/datasets.md (layouts, masks, captions). ``python -m stmi.data
synth|check|cache`` makes a synthetic dataset, validates a real one or prebuilds a node's decoded-frame cache.
"""

from stmi.data.batch_transforms import prepare_batch
from stmi.data.cached_dataset import CachedTripletDataset
from stmi.data.frame_cache import CacheError, ensure_cache
from stmi.data.layouts import (
    DatasetError,
    DatasetSplits,
    Triplet,
    dataset_dir,
    get_layout,
    load_captions,
    load_dataset,
    mask_path,
    read_split,
    truth_mask_path,
)
from stmi.data.loaders import Loaders, build_loaders, split_validation
from stmi.data.sampler import RandomIdentitySampler
from stmi.data.transforms import CLIP_MEAN, CLIP_STD, PairedTransform
from stmi.data.triplet_dataset import TripletDataset

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "CacheError", "CachedTripletDataset", "DatasetError", "DatasetSplits", "Loaders",
    "PairedTransform", "RandomIdentitySampler", "Triplet", "TripletDataset", "build_loaders", "dataset_dir",
    "ensure_cache", "get_layout", "load_captions", "load_dataset", "mask_path", "prepare_batch", "read_split",
    "split_validation", "truth_mask_path",
]
