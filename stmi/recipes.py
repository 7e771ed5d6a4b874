"""Named recipes: functions returning a complete :class:`~stmi.config.STMIConfig` for a dataset.

One function per recipe, not copied YAML files (STYLE.md: recipes are code so they cannot drift). A recipe is the
starting point; command-line overrides and search spaces are applied on top with :func:`stmi.config.apply_overrides`.

``paper``: the STMI paper / anchor settings (DATASETS.md "Training recipes of the anchors").
    ViT-B-16 with OpenAI weights, inputs 256x128 (RGBNT201, persons) or 128x256 (RGBNT100, MSVR310, vehicles);
    P x K batches 72/8 (RGBNT201, the paper), 64/8 (MSVR310), 128/16 (RGBNT100) as the anchors; Adam, weight decay
    1e-4, lr 3.5e-6 with 5 warmup epochs then cosine down to 3.5e-7, the same lr for every parameter (IDEA's
    habit: ``head_lr_mult`` 1); 50 epochs for every dataset (the anchors' ~50; none of the public configs of the
    three datasets trains longer, and a fixed budget keeps the sweep's trials comparable); seed 1111; SIE on
    with the dataset's camera count (the data pipeline overwrites ``num_cameras`` with the count it reads).

``demo``: the tiny random-init ``stmi-tiny`` model on small inputs (64x32 persons, 32x64 vehicles: 8 patches
    of 16 px), so that a few epochs on a synthetic dataset run in well under a minute on two CPU cores and
    visibly learn. A random-init model cannot use CLIP's fine-tuning lr: towers 3e-4 and new modules 1e-3
    (``head_lr_mult`` 10/3), one warmup epoch, cosine to 1e-5. Batches of 16 = 4 ids x 4 instances suit a
    synthetic training split of ~10 identities; ``val_fraction`` 0.3 keeps a few validation identities; no
    loader workers (they cost more than they bring at this size); smaller padding and erasing for the small
    images.
"""

from __future__ import annotations

from collections.abc import Callable

from stmi.config import DATASETS, STMIConfig, apply_overrides

#: Input (H, W) per dataset kind for the paper recipe.
PAPER_IMAGE_SIZE = {"rgbnt201": (256, 128), "rgbnt100": (128, 256), "msvr310": (128, 256)}
#: (batch size, instances per identity) of the anchors.
PAPER_BATCH = {"rgbnt201": (72, 8), "msvr310": (64, 8), "rgbnt100": (128, 16)}
#: Cameras per dataset (DATASETS.md): RGBNT201 cam1-4, RGBNT100 c1-8, MSVR310 0-7.
NUM_CAMERAS = {"rgbnt201": 4, "rgbnt100": 8, "msvr310": 8}
PAPER_EPOCHS = {"rgbnt201": 50, "rgbnt100": 50, "msvr310": 50}
DEMO_IMAGE_SIZE = {"rgbnt201": (64, 32), "rgbnt100": (32, 64), "msvr310": (32, 64)}


def _check_dataset(dataset: str) -> str:
    d = dataset.lower()
    if d not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    return d


def paper(dataset: str) -> STMIConfig:
    """The paper's recipe for ``dataset`` (see the module docstring for every choice)."""
    d = _check_dataset(dataset)
    batch, k = PAPER_BATCH[d]
    return apply_overrides(STMIConfig(), {
        "recipe": "paper",
        "model.clip_model": "ViT-B-16",
        "model.pretrained": "openai",
        "model.image_size": PAPER_IMAGE_SIZE[d],
        "model.use_sie": True,
        "model.num_cameras": NUM_CAMERAS[d],
        "data.dataset": d,
        "data.batch_size": batch,
        "data.num_instances": k,
        "optim.lr": 3.5e-6,
        "optim.min_lr": 3.5e-7,
        "optim.head_lr_mult": 1.0,
        "optim.weight_decay": 1e-4,
        "optim.warmup_epochs": 5,
        "optim.warmup_factor": 0.1,
        "optim.epochs": PAPER_EPOCHS[d],
        "optim.seed": 1111,
    })


def demo(dataset: str) -> STMIConfig:
    """The demo recipe: tiny model, small inputs, synthetic-data-sized batches, a fast-learning lr."""
    d = _check_dataset(dataset)
    return apply_overrides(STMIConfig(), {
        "recipe": "demo",
        "model.clip_model": "stmi-tiny",
        "model.pretrained": None,
        "model.image_size": DEMO_IMAGE_SIZE[d],
        "model.use_sie": True,
        "model.num_cameras": NUM_CAMERAS[d],
        "model.K": 2,
        "data.dataset": d,
        "data.batch_size": 16,
        "data.num_instances": 4,
        "data.num_workers": 0,
        "data.val_fraction": 0.3,
        "data.pad": 4,
        "data.erasing_p": 0.25,
        "optim.lr": 3e-4,
        "optim.min_lr": 1e-5,
        "optim.head_lr_mult": 10 / 3,
        "optim.weight_decay": 1e-4,
        "optim.warmup_epochs": 1,
        "optim.warmup_factor": 0.1,
        "optim.epochs": 4,
        "optim.seed": 1111,
        "optim.amp": True,
    })


RECIPES: dict[str, Callable[[str], STMIConfig]] = {"paper": paper, "demo": demo}
"""Recipe name -> function(dataset) -> STMIConfig."""


def recipe(name: str, dataset: str) -> STMIConfig:
    """The config of recipe ``name`` (``paper`` | ``demo``) for ``dataset`` (rgbnt201 | rgbnt100 | msvr310).

    Raises:
        ValueError: unknown recipe or dataset (the message lists the valid names).
    """
    fn = RECIPES.get(name.lower())
    if fn is None:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    return fn(dataset)
