"""stmi.engine and stmi.recipes: schedule values, optimiser groups, exact checkpoint round-trips, the tokenizer and
exported-checkpoint owners, and ``prepare_run`` + ``fit`` on synthetic data (selection policy, exact resume)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from stmi.config import ModelConfig, OptimConfig, STMIConfig, apply_overrides, from_dict, to_dict
from stmi.engine import (
    Callback,
    build_optimizer,
    build_scheduler,
    build_tokenizer,
    checkpoint_state,
    export_model,
    fit,
    load_exported,
    load_exported_model,
    load_fit_checkpoint,
    prepare_run,
    restore_state,
    save_fit_checkpoint,
    seed_everything,
    train_one_epoch,
)
from stmi.model.backbone import DEMO_MODEL, DEMO_MODEL_CONFIG
from stmi.recipes import RECIPES, recipe


def lrs_over(cfg: OptimConfig, steps_per_epoch: int, n: int, model: nn.Module | None = None) -> list[list[float]]:
    """The lr of every param group at iterations 0..n-1 (stepping optimiser then scheduler, as the engine)."""
    model = model or nn.Linear(3, 2)
    opt = build_optimizer(model, cfg)
    sch = build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sch.step()
    return out


def test_scheduler_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_epochs=2, warmup_factor=0.1, epochs=10)
    lr = [v[0] for v in lrs_over(cfg, steps_per_epoch=5, n=56)]
    assert lr[0] == pytest.approx(1e-4)  # start: warmup_factor * lr
    assert lr[5] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way through warmup (linear)
    assert lr[10] == pytest.approx(1e-3)  # end of warmup: the peak
    assert lr[30] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half-way through the cosine
    assert lr[50] == pytest.approx(1e-5)  # end: min_lr
    assert lr[55] == pytest.approx(1e-5)  # and it stays there
    assert all(a <= b + 1e-15 for a, b in zip(lr[:10], lr[1:11]))  # warmup increases
    assert all(a >= b - 1e-15 for a, b in zip(lr[10:50], lr[11:51]))  # cosine decreases


def test_scheduler_without_warmup_starts_at_lr():
    cfg = OptimConfig(lr=2e-4, min_lr=2e-6, warmup_epochs=0, epochs=4)
    lr = [v[0] for v in lrs_over(cfg, steps_per_epoch=1, n=5)]
    assert lr[0] == pytest.approx(2e-4)
    assert lr[2] == pytest.approx(2e-6 + (2e-4 - 2e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[4] == pytest.approx(2e-6)


@pytest.fixture(scope="module")
def tiny_model() -> nn.Module:
    from stmi.model.network import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(clip_model="stmi-tiny", image_size=(64, 32), num_classes=5, num_cameras=3,
                                   sfm_sharing="head", K=2))


def test_optimizer_groups_lrs_and_weight_decay(tiny_model):
    cfg = OptimConfig(lr=1e-4, head_lr_mult=10.0, weight_decay=0.05, min_lr=1e-6, warmup_epochs=1, epochs=3)
    opt = build_optimizer(tiny_model, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"clip", "clip_no_decay", "head", "head_no_decay"}
    assert by_name["clip"]["lr"] == by_name["clip_no_decay"]["lr"] == pytest.approx(1e-4)
    assert by_name["head"]["lr"] == by_name["head_no_decay"]["lr"] == pytest.approx(1e-3)
    assert by_name["clip"]["weight_decay"] == by_name["head"]["weight_decay"] == 0.05
    assert by_name["clip_no_decay"]["weight_decay"] == by_name["head_no_decay"]["weight_decay"] == 0.0

    name_of = {id(p): n for n, p in tiny_model.named_parameters()}
    group_of = {id(p): g["name"] for g in opt.param_groups for p in g["params"]}
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    assert len(group_of) == sum(len(g["params"]) for g in opt.param_groups) == len(trainable)  # each exactly once
    families = tiny_model.parameter_groups()
    for fam, params in families.items():
        assert all(group_of[id(p)].startswith(fam) for p in params)
    for pid, gname in group_of.items():
        name, p = name_of[pid], dict(tiny_model.named_parameters())[name_of[pid]]
        if "sfm_alpha" in name or "sfm_beta" in name or name.endswith(".bias") or p.ndim < 2:
            assert gname.endswith("no_decay"), name
        else:
            assert not gname.endswith("no_decay"), name
    # alpha/beta are 2-D with per-head sharing, and still undecayed
    ab = [n for n in name_of.values() if "sfm_alpha" in n]
    assert ab and dict(tiny_model.named_parameters())[ab[0]].ndim == 2
    # the head family follows the schedule with the same shape, ending at min_lr * head_lr_mult
    lr = lrs_over(cfg, steps_per_epoch=2, n=7, model=tiny_model)
    names = [g["name"] for g in opt.param_groups]
    head = names.index("head")
    assert lr[0][head] == pytest.approx(1e-3 * cfg.warmup_factor)
    assert lr[6][head] == pytest.approx(1e-5)


def _train_steps(model, opt, sch, n):
    for _ in range(n):
        x = torch.randn(8, 6)
        y = torch.from_numpy(np.random.randint(0, 3, 8))
        drop = random.random() < 0.5
        loss = nn.functional.cross_entropy(nn.functional.dropout(model(x), 0.3, training=drop), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sch.step()


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    cfg = OptimConfig(lr=1e-2, min_lr=1e-4, warmup_epochs=1, epochs=4)
    opt = build_optimizer(model, cfg)
    return model, opt, build_scheduler(opt, cfg, steps_per_epoch=3)


def test_checkpoint_round_trip_continues_exactly(tmp_path):
    cfg = apply_overrides(STMIConfig(), {"optim.lr": 1e-2, "model.K": 3})
    # Uninterrupted run: 6 steps.
    seed_everything(123)
    m_a, o_a, s_a = _fresh()
    _train_steps(m_a, o_a, s_a, 6)

    # Interrupted run: 3 steps, checkpoint (through a file, loaded weights_only), scramble everything, restore.
    seed_everything(123)
    m_b, o_b, s_b = _fresh()
    _train_steps(m_b, o_b, s_b, 3)
    gen = torch.Generator().manual_seed(7)
    gen_next = torch.rand(1, generator=torch.Generator().set_state(gen.get_state()))
    torch.save(checkpoint_state(m_b, o_b, s_b, sampler_epoch=2, epoch=1, cfg=cfg, generator=gen,
                                extra={"best": 0.5}), tmp_path / "ck.pt")
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())
    state = torch.load(tmp_path / "ck.pt", weights_only=True)

    seed_everything(999)
    _ = torch.rand(10), np.random.rand(10), [random.random() for _ in range(5)]
    gen.manual_seed(1234)
    m_c, o_c, s_c = _fresh(seed=5)  # different initial weights
    next_epoch = restore_state(state, m_c, o_c, s_c, generator=gen)
    assert next_epoch == 2 and state["sampler_epoch"] == 2 and state["extra"] == {"best": 0.5}
    assert from_dict(state["config"]) == cfg
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0])
    np.testing.assert_array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]
    assert torch.equal(torch.rand(1, generator=gen), gen_next)
    for a, b in zip(o_b.state_dict()["state"].values(), o_c.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert s_c.last_epoch == 3 and [g["lr"] for g in o_c.param_groups] == [g["lr"] for g in o_b.param_groups]

    # Continuing from the restored state (with the RNG rewound to the checkpoint) reproduces the uninterrupted run.
    restore_state(state, m_c, o_c, s_c)
    _train_steps(m_c, o_c, s_c, 3)
    for pa, pc in zip(m_a.parameters(), m_c.parameters()):
        assert torch.equal(pa, pc)


def test_restore_rejects_foreign_state():
    model, opt, sch = _fresh()
    with pytest.raises(ValueError, match="not an STMI checkpoint"):
        restore_state({"model": model.state_dict()}, model)
    state = checkpoint_state(model, opt, sch, 1, 0, STMIConfig())
    other = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="do not fit the model"):
        restore_state(state, other)


@pytest.mark.parametrize("dataset", ["rgbnt201", "rgbnt100", "msvr310"])
def test_recipes(dataset):
    p = recipe("paper", dataset)
    assert p.recipe == "paper" and p.data.dataset == dataset
    assert (p.model.clip_model, p.model.pretrained) == ("ViT-B-16", "openai")
    assert p.model.image_size == ((256, 128) if dataset == "rgbnt201" else (128, 256))
    assert (p.data.batch_size, p.data.num_instances) == {"rgbnt201": (72, 8), "msvr310": (64, 8),
                                                         "rgbnt100": (128, 16)}[dataset]
    assert (p.optim.lr, p.optim.min_lr, p.optim.seed, p.optim.epochs) == (3.5e-6, 3.5e-7, 1111, 50)
    assert p.model.use_sie and p.model.num_cameras > 0
    d = recipe("demo", dataset)
    assert d.model.clip_model == DEMO_MODEL and d.model.pretrained is None
    h, w = d.model.image_size
    patch = DEMO_MODEL_CONFIG["vision_cfg"]["patch_size"]
    assert (h > w) == (dataset == "rgbnt201") and h % patch == 0 and w % patch == 0
    assert (h // patch) * (w // patch) == 32  # tokens small enough for the object's mask to mark some of its own
    assert d.data.batch_size % d.data.num_instances == 0 and d.data.num_workers == 0
    assert d.optim.lr > 10 * p.optim.lr and d.optim.head_lr_mult > 1
    assert set(RECIPES) == {"paper", "demo"}


def test_recipe_errors_name_the_choices():
    with pytest.raises(ValueError, match="paper, demo"):
        recipe("fancy", "rgbnt201")
    with pytest.raises(ValueError, match="rgbnt201, rgbnt100, msvr310"):
        recipe("paper", "market1501")


@pytest.mark.timeout(600)
def test_demo_recipe_learns_on_synthetic_rgbnt201(tmp_path):
    """End to end: demo recipe, synthetic RGBNT201, 2 epochs -> validation mAP well above the untrained model's."""
    from stmi.data.loaders import build_loaders
    from stmi.data.synth import make_synthetic
    from stmi.eval import evaluate
    from stmi.model.network import build_model

    root = make_synthetic("rgbnt201", tmp_path / "data", ids=20, images_per_id=8, seed=0, difficulty="easy")
    cfg = apply_overrides(recipe("demo", "rgbnt201"), {"data.root": str(root), "optim.epochs": 2})
    seed_everything(cfg.optim.seed)
    loaders = build_loaders(cfg, build_tokenizer(cfg.model))
    assert loaders.val_query is not None and loaders.num_classes >= cfg.data.batch_size // cfg.data.num_instances
    cfg = apply_overrides(cfg, {"model.num_classes": loaders.num_classes, "model.num_cameras": loaders.num_cameras})
    seed_everything(cfg.optim.seed)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    sch = build_scheduler(opt, cfg.optim, len(loaders.train))
    before = evaluate(model, loaders.val_query, loaders.val_gallery, "cpu")
    stats = []
    for epoch in range(cfg.optim.epochs):
        stats.append(train_one_epoch(model, loaders.train, opt, sch, cfg.loss, "cpu", epoch, progress=False))
        assert loaders.train_sampler.epoch == epoch
    after = evaluate(model, loaders.val_query, loaders.val_gallery, "cpu")
    assert {"loss", "G_ce", "G_tri", "U_ce", "U_tri", "T_ce", "T_tri", "lr", "lr_head", "triplets_per_s"} <= set(
        stats[0])
    assert stats[0]["steps"] == len(loaders.train) and stats[0]["triplets"] == len(loaders.train) * 16
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert stats[0]["lr_head"] == pytest.approx(stats[0]["lr"] * cfg.optim.head_lr_mult)
    assert sch.last_epoch == 2 * len(loaders.train)
    assert after["mAP"] > before["mAP"] + 0.1, (before["mAP"], after["mAP"])


# ------------------------------------------------------------------------------------- tokenizer, exported format


@pytest.mark.parametrize("use_text", [True, False])
def test_tokenizer_gives_the_models_ids(use_text):
    from stmi.model.network import build_model

    cfg = ModelConfig(clip_model="stmi-tiny", image_size=(64, 32), num_classes=3, use_text=use_text)
    captions = ["a man in a red coat with a backpack", "", "x " * 200]
    ids = build_tokenizer(cfg)(captions)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert torch.equal(ids, build_model(cfg).tokenize(captions))


def test_exported_checkpoint_round_trip_and_errors(tmp_path, tiny_model):
    cfg = STMIConfig(model=tiny_model.cfg)
    path = export_model(tiny_model, cfg, tmp_path / "best.pt")
    assert sorted(load_exported(path)) == ["config", "state_dict"]
    model, got = load_exported_model(path)
    assert got.model == dataclasses.replace(cfg.model, pretrained=None) and not model.training
    x = [torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    tiny_model.eval()
    cams = torch.tensor([0, 2])
    torch.testing.assert_close(model.embed(*x, camid=cams), tiny_model.embed(*x, camid=cams))

    torch.save({"model": tiny_model.state_dict()}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match=r"not an exported STMI checkpoint.*found \['model'\]"):
        load_exported(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read STMI checkpoint .*garbage.pt"):
        load_exported(tmp_path / "garbage.pt")
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, K=3))
    torch.save({"state_dict": tiny_model.state_dict(), "config": to_dict(other)}, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match="do not fit the model"):
        load_exported_model(tmp_path / "mismatch.pt")


# ------------------------------------------------------------------------------------------- prepare_run and fit


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    from stmi.data.synth import make_synthetic

    return make_synthetic("rgbnt201", tmp_path_factory.mktemp("fit201"), ids=18, images_per_id=6, seed=2)


class Recorder(Callback):
    """Records every hook call, and saves a fit checkpoint per epoch into ``root/epoch_<n>``."""

    def __init__(self, root=None):
        self.calls, self.epochs, self.root = [], [], root

    def on_untrained(self, run, metrics):
        self.calls.append("untrained")
        self.untrained = metrics

    def on_test_end(self, run, result, weights):
        self.calls.append("test")
        self.test_weights = {k: v.clone() for k, v in weights.items()}
        self.loaded_during_test = all(torch.equal(v, weights[k]) for k, v in run.core.state_dict().items())

    def on_epoch_end(self, run, end):
        self.calls.append(f"epoch{end.epoch}")
        self.epochs.append(dict(end.metrics))
        if self.root is not None:
            d = self.root / f"epoch_{end.epoch}"
            d.mkdir()
            save_fit_checkpoint(run, end.state, d)


def _cfg(root, **extra):
    return apply_overrides(recipe("demo", "rgbnt201"), {"data.root": str(root), "optim.epochs": 3, **extra})


@pytest.mark.timeout(600)
def test_fit_selects_validates_tests_and_resumes_exactly(small_root, tmp_path):
    run = prepare_run(_cfg(small_root, **{"optim.eval_every": 2}))
    assert run.cfg.model.num_classes == run.loaders.num_classes > 0
    assert run.cfg.model.num_cameras == run.loaders.num_cameras > 0 and run.core is run.model
    assert len(run.loaders.train) >= 2
    rec = Recorder(tmp_path)
    state = fit(run, callbacks=[rec], evaluate_untrained=True, progress=False)
    # hooks: the untrained reference first, the test inside the last epoch before its epoch end
    assert rec.calls == ["untrained", "epoch0", "epoch1", "test", "epoch2"]
    assert 0.0 <= rec.untrained["untrained_val_mAP"] <= 1.0
    # validation every 2 epochs and at the last one; best = the argmax; test only after the last epoch
    assert ["val_mAP" in m for m in rec.epochs] == [False, True, True]
    vals = {m["epoch"]: m["val_mAP"] for m in rec.epochs if "val_mAP" in m}
    best_epoch = max(vals, key=vals.get)
    assert state.best["epoch"] == rec.epochs[-1]["best_epoch"] == best_epoch
    assert rec.epochs[-1]["best_val_mAP"] == vals[best_epoch]
    assert ["test_mAP" in m for m in rec.epochs] == [False, False, True]
    assert {"test_R1", "test_R5", "test_R10"} <= set(rec.epochs[-1])
    assert [h["epoch"] for h in state.history] == [0, 1, 2] and state.epoch == 3
    # the test ran on the selected weights, then the trained weights came back
    assert rec.loaded_during_test
    assert all(torch.equal(rec.test_weights[k], v) for k, v in state.best_weights.items())
    final = {k: v.clone() for k, v in run.core.state_dict().items()}
    if best_epoch != 2:
        assert any(not torch.equal(final[k], v) for k, v in state.best_weights.items())

    # A fresh process-like run restored from epoch 1's checkpoint ends with exactly the same weights and history.
    seed_everything(12345)
    run2 = prepare_run(_cfg(small_root, **{"optim.eval_every": 2}))
    resumed = load_fit_checkpoint(run2, tmp_path / "epoch_1")
    assert resumed.epoch == 2 and [h["epoch"] for h in resumed.history] == [0, 1]
    rec2 = Recorder()
    state2 = fit(run2, resumed, callbacks=[rec2], evaluate_untrained=True, progress=False)
    assert rec2.calls == ["test", "epoch2"]  # no untrained evaluation on a resumed run
    for k, v in run2.core.state_dict().items():
        assert torch.equal(v, final[k]), k
    timing = ("train_time_s", "train_triplets_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in state2.history] == \
        [{k: v for k, v in h.items() if k not in timing} for h in state.history]
    assert state2.best == state.best and rec2.epochs[-1]["test_mAP"] == rec.epochs[-1]["test_mAP"]


@pytest.mark.timeout(600)
def test_fit_without_validation_keeps_the_last_epoch(small_root):
    run = prepare_run(_cfg(small_root, **{"data.val_fraction": 0.0, "optim.epochs": 2}))
    assert run.loaders.val_query is None
    rec = Recorder()
    state = fit(run, callbacks=[rec], evaluate_untrained=True, progress=False)
    assert rec.calls == ["epoch0", "test", "epoch1"]  # no validation split: no untrained reference either
    assert state.best["epoch"] == 1 and math.isnan(rec.epochs[-1]["best_val_mAP"])
    assert all(torch.equal(v, run.core.state_dict()[k]) for k, v in state.best_weights.items())
    assert 0.0 <= rec.epochs[-1]["test_mAP"] <= 1.0


def test_load_fit_checkpoint_names_a_wrong_folder(tmp_path, small_root):
    run = prepare_run(_cfg(small_root))
    with pytest.raises(ValueError, match="has no state.pt"):
        load_fit_checkpoint(run, tmp_path)


@pytest.mark.timeout(600)
def test_deterministic_mode_gives_bit_identical_runs(small_root):
    """``optim.deterministic``: two fresh runs of the demo give the same metrics and weights, bit for bit."""
    cfg = _cfg(small_root, **{"optim.deterministic": True, "optim.epochs": 2, "data.num_workers": 1})
    timing = ("train_time_s", "train_triplets_per_s")
    results = []
    try:
        for _ in range(2):
            seed_everything(987)  # whatever the process drew before: the run's own seeding decides
            run = prepare_run(cfg)
            assert torch.are_deterministic_algorithms_enabled() and run.cfg.model.sfm_kernel == "explicit"
            state = fit(run, callbacks=[], evaluate_untrained=True, progress=False)
            results.append(([{k: v for k, v in h.items() if k not in timing} for h in state.history],
                            {k: v.clone() for k, v in run.core.state_dict().items()}))
    finally:
        torch.use_deterministic_algorithms(False)
        for name in ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp"):
            getattr(torch.backends.cuda, name, lambda _: None)(True)
    (h1, w1), (h2, w2) = results
    assert h1 == h2 and "val_mAP" in h1[-1] and "test_mAP" in h1[-1]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_the_untrained_evaluation_leaves_training_as_it_was(small_root):
    """A run that evaluates the untrained model (every tracked run does) trains exactly as one that does not."""
    cfg = _cfg(small_root, **{"optim.epochs": 1})
    timing = ("train_time_s", "train_triplets_per_s")
    histories, untrained = [], []
    for evaluate_untrained in (False, True):
        rec = Recorder()
        state = fit(prepare_run(cfg), callbacks=[rec], evaluate_untrained=evaluate_untrained, progress=False)
        histories.append([{k: v for k, v in h.items() if k not in timing} for h in state.history])
        untrained.append(rec.calls[0] == "untrained")
    assert untrained == [False, True]
    assert histories[0] == histories[1]


def test_random_state_kept_restores_every_generator():
    from stmi.engine import random_state_kept

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with random_state_kept("cpu"):
        torch.rand(5), np.random.rand(5), random.random()
        torch.utils.data.DataLoader(list(range(4))).__iter__()  # draws its base seed from torch's generator
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
