"""Offline preprocessing: foreground masks and multi-modal captions (``python -m stmi.preprocess masks|captions``).

Neither runs during training; both write the formats of docs/datasets.md next to the dataset, read back by
``stmi.data``. Modules: ``thermal`` (weight-free thermal masks), ``sam2_predictor`` (optional SAM2 refinement),
``masks`` (the masks command), ``attributes`` (schemas, prompt, reply parsing, fusion, template), ``chat_client``
(OpenAI-compatible chat-completions over urllib, retries), ``captions`` (the captions command).
"""

from stmi.preprocess.attributes import fuse, load_schema, parse_reply, render_description
from stmi.preprocess.thermal import ThermalParams, mask_iou, thermal_mask

__all__ = ["ThermalParams", "fuse", "load_schema", "mask_iou", "parse_reply", "render_description", "thermal_mask"]
