"""The assembled STMI model on the tiny random-init CLIP (stmi-tiny) on CPU: shapes of every ablation, gradient
paths, mask/perturbation semantics, the embedding contract, parameter groups and that training fits a batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from stmi.config import LossConfig, ModelConfig
from stmi.losses import stmi_loss
from stmi.model.network import STMI, STMIOutput, build_model

H, W = 64, 32
NUM_CLASSES = 4


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(clip_model="stmi-tiny", pretrained=None, image_size=(H, W), num_classes=NUM_CLASSES, use_sie=True,
                num_cameras=2, str_heads=4, K=2)
    base.update(kw)
    return ModelConfig(**base)


def make_batch(p_ids: int = 4, k_inst: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """P x K triplets; the mask marks a central box as foreground (the rest is background)."""
    g = torch.Generator().manual_seed(seed)
    b = p_ids * k_inst
    mask = torch.zeros(b, 1, H, W)
    mask[:, :, 16:48, 8:24] = 1.0
    return {
        "rgb": torch.randn(b, 3, H, W, generator=g),
        "nir": torch.randn(b, 3, H, W, generator=g),
        "tir": torch.randn(b, 3, H, W, generator=g),
        "mask": mask,
        "camid": torch.arange(b) % 2,
        "pids": torch.arange(p_ids).repeat_interleave(k_inst),
    }


def run(model: STMI, batch: dict[str, torch.Tensor], **kw) -> STMIOutput:
    args = {k: batch[k] for k in ("mask", "camid")}
    args.update(kw)
    return model(batch["rgb"], batch["nir"], batch["tir"], **args)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.mark.parametrize("fusion", ["chi", "concat", "mlp", "mhsa"])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_shapes_every_fusion_and_k(fusion: str, k: int, batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(K=k, fusion=fusion)).train()
    d = model.dim
    text = model.tokenize(["a person in a red coat"] * 8)
    out = run(model, batch, text=text)
    assert set(out.feats) == set(out.bn_feats) == set(out.logits) == {"G", "U", "T"}
    assert out.feats["G"].shape == out.feats["U"].shape == (8, 3 * d)
    assert out.feats["T"].shape == (8, d)
    assert all(lg.shape == (8, NUM_CLASSES) for lg in out.logits.values())
    assert model.embedding_dim == 6 * d and out.embedding.shape == (8, 6 * d)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(8))
    # STR gives K + 1 tokens per modality (queries + text)
    seen = {}
    hook = model.token_fusion.register_forward_hook(lambda m, inp, o: seen.update(h=inp[0], out=o))
    run(model, batch, text=text)
    hook.remove()
    assert seen["h"].shape == seen["out"].shape == (8, 3 * (k + 1), d)
    if fusion == "concat":
        assert seen["out"] is seen["h"]
    else:
        assert not torch.allclose(seen["out"], seen["h"])


def test_baseline_is_concatenated_cls_tokens(batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(use_sfm=False, use_str=False, fusion="concat"))
    assert model.str_module is None and model.token_fusion is None and model.global_fusion is None
    out = run(model.train(), batch)
    assert set(out.feats) == {"G", "T"}
    assert model.embedding_dim == 3 * model.dim
    # the retrieval feature is exactly the L2-normalised post-BN concatenation of the three CLS tokens
    model.eval()
    with torch.no_grad():
        tokens = model._encode_images([batch["rgb"], batch["nir"], batch["tir"]], None, None, batch["camid"])
        g = torch.cat([t[:, 0] for t in tokens], dim=1)
        expected = F.normalize(model.heads["G"].bn(g), dim=1)
    torch.testing.assert_close(model.embed(batch["rgb"], batch["nir"], batch["tir"], camid=batch["camid"]), expected)
    no_text = build_model(tiny_cfg(use_sfm=False, use_str=False, fusion="concat", use_text=False))
    assert no_text.text is None
    assert set(run(no_text.train(), batch).feats) == {"G"}


@pytest.mark.parametrize("fusion", ["chi", "mhsa"])
def test_fusion_without_str_runs_over_cls_tokens(fusion: str, batch: dict[str, torch.Tensor]) -> None:
    model = build_model(tiny_cfg(use_str=False, fusion=fusion)).train()
    out = run(model, batch)
    assert set(out.feats) == {"G", "U", "T"} and model.str_module is None


def test_variants_separate_backbones_unshared_str_no_text_no_global_fusion(batch: dict[str, torch.Tensor]) -> None:
    m = build_model(tiny_cfg(separate_backbones=True, str_share_weights=False, use_text=False)).train()
    assert isinstance(m.visual, torch.nn.ModuleList) and len(m.visual) == 3 and len(m.str_module.blocks) == 3
    out = run(m, batch)
    assert set(out.feats) == {"G", "U"} and out.embedding.shape == (8, 6 * m.dim)
    m2 = build_model(tiny_cfg(use_global_fusion=False, retrieval_feature="U"))
    assert m2.str_module is None and set(run(m2.train(), batch).feats) == {"G", "T"} and m2.embedding_dim == 3 * m2.dim


def _nontrivial_tau(model: STMI, batch: dict[str, torch.Tensor]) -> float:
    """A tau that splits the node similarities, so the hypergraph is neither diagonal nor complete."""
    seen = {}
    hook = model.token_fusion.register_forward_hook(lambda m, inp, o: seen.update(h=inp[0]))
    with torch.no_grad():
        run(model, batch)
    hook.remove()
    n = F.normalize(seen["h"], dim=-1)
    sim = n @ n.transpose(1, 2)
    off = sim[:, ~torch.eye(sim.shape[1], dtype=torch.bool)]
    return off.median().item()


def test_gradients_reach_sfm_str_and_hyperedge_weights(batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(K=4, p=0.0)).train()
    model.token_fusion.tau = _nontrivial_tau(model, batch)
    model.zero_grad()
    out = run(model, batch, text=model.tokenize(["a caption"] * 8))
    total, _ = stmi_loss(out, batch["pids"], LossConfig())
    total.backward()
    named = dict(model.named_parameters())
    sfm = [p for n, p in named.items() if n.endswith(("sfm_alpha", "sfm_beta"))]
    assert len(sfm) == 2 * (1 if not isinstance(model.visual, torch.nn.ModuleList) else 3)
    for p in sfm + [model.str_module.queries, model.token_fusion.layers[0].edge_weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    text_params = [p for p in model.text.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in text_params)  # text tower fine-tuned
    assert all(h.bn.bias.grad is None for h in model.heads.values())  # frozen BNNeck bias


def test_embed_without_caption_mask_camera(batch: dict[str, torch.Tensor]) -> None:
    model = build_model(tiny_cfg()).train()
    emb = model.embed(batch["rgb"], batch["nir"], batch["tir"])
    assert emb.shape == (8, model.embedding_dim) and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(8))
    assert model.training  # mode restored
    # eval forward: no logits
    model.eval()
    assert run(model, batch).logits == {}


def test_eval_is_deterministic_and_perturbation_only_with_a_mask(batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(p=1.0)).eval()
    with torch.no_grad():
        e1, e2 = run(model, batch).embedding, run(model, batch).embedding
        torch.testing.assert_close(e1, e2, rtol=0, atol=0)
        model.train()
        with_mask_p1 = run(model, batch).embedding
        no_mask_p1 = run(model, batch, mask=None).embedding
        model.cfg = dataclasses.replace(model.cfg, p=0.0)
        with_mask_p0 = run(model, batch).embedding
        no_mask_p0 = run(model, batch, mask=None).embedding
        with_mask_p0_again = run(model, batch).embedding
    torch.testing.assert_close(with_mask_p0, with_mask_p0_again, rtol=0, atol=0)
    assert (with_mask_p1 - with_mask_p0).abs().max() > 1e-4
    torch.testing.assert_close(no_mask_p1, no_mask_p0, rtol=0, atol=0)
    # p = 1 turns every background token into foreground: the same as an all-foreground mask without perturbation
    with torch.no_grad():
        full = run(model, batch, mask=torch.ones_like(batch["mask"])).embedding
    torch.testing.assert_close(with_mask_p1, full)


def test_samples_without_mask_get_plain_attention(batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(alpha_init=2.0, beta_init=2.0)).eval()
    has = torch.tensor([True, False] * 4)
    with torch.no_grad():
        plain = run(model, batch, mask=None).embedding
        masked = run(model, batch).embedding
        mixed = run(model, batch, has_mask=has).embedding
        none = run(model, batch, has_mask=torch.zeros(8, dtype=torch.bool)).embedding
    torch.testing.assert_close(mixed[~has], plain[~has])
    torch.testing.assert_close(mixed[has], masked[has])
    assert (masked[has] - plain[has]).abs().max() > 1e-4
    torch.testing.assert_close(none, plain)


def test_camera_embedding_changes_features_and_is_optional(batch: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        a = run(model, batch, camid=torch.zeros(8, dtype=torch.long)).embedding
        b = run(model, batch, camid=torch.ones(8, dtype=torch.long)).embedding
        c = run(model, batch, camid=None).embedding
    assert (a - b).abs().max() > 1e-5 and c.shape == a.shape


def test_parameter_groups_partition_trainable_parameters() -> None:
    model = build_model(tiny_cfg())
    groups = model.parameter_groups()
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert ids["clip"].isdisjoint(ids["head"]) and ids["clip"] | ids["head"] == trainable
    named = {id(p): n for n, p in model.named_parameters()}
    head_names = {named[i] for i in ids["head"]}
    clip_names = {named[i] for i in ids["clip"]}
    assert any(n.endswith("sfm_alpha") for n in head_names) and any(n.endswith("sfm_beta") for n in head_names)
    assert "str_module.queries" in head_names
    assert any(n.startswith("token_fusion.") for n in head_names)
    assert any(n.startswith("heads.") for n in head_names)
    assert any("sie" in n for n in head_names)
    assert any(n.startswith("text.") for n in clip_names) and any(n.startswith("visual.") for n in clip_names)
    assert not any("sfm" in n or "sie" in n for n in clip_names)


def test_tiny_model_fits_a_batch() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(K=2, p=0.1)).train()
    data = make_batch(seed=1)
    text = model.tokenize([f"person {int(i)}" for i in data["pids"]])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        out = run(model, data, text=text)
        total, terms = stmi_loss(out, data["pids"], LossConfig())
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert set(terms) == {"G_ce", "G_tri", "U_ce", "U_tri", "T_ce", "T_tri"}
    assert losses[-1] < 0.25 * losses[0], losses
    for name in ("G", "U", "T"):  # every head classifies the batch it was fitted on
        assert torch.equal(out.logits[name].argmax(dim=1), data["pids"]), name


def test_str_shared_equals_unshared_with_the_same_weights() -> None:
    """The batched shared path computes the per-modality eq. 12-13, and each modality sees only its patches."""
    from stmi.model.str_module import SemanticTokenReallocation

    torch.manual_seed(0)
    d, k, n, b = 16, 3, 10, 2
    shared = SemanticTokenReallocation(d, k, heads=4, share_weights=True)
    unshared = SemanticTokenReallocation(d, k, heads=4, share_weights=False)
    with torch.no_grad():
        unshared.queries.copy_(shared.queries)
        for blk in unshared.blocks:
            blk.load_state_dict(shared.blocks[0].state_dict())
    patches = [torch.randn(b, n, d) for _ in range(3)]
    text = torch.randn(b, d)
    out = shared(patches, text)
    assert out.shape == (b, 3 * (k + 1), d)
    torch.testing.assert_close(out, unshared(patches, text))
    # eq. 12-13 by hand for modality 1 (NIR), query token 0
    blk = shared.blocks[0]
    q = torch.cat([shared.queries[1], text[0:1]], dim=0).unsqueeze(0)
    kv = blk.norm_kv(patches[1][0:1])
    z = blk.attn(blk.norm_q(q), kv, kv)[0] + q
    ref = blk.ffn(blk.norm_ffn(z)) + z
    torch.testing.assert_close(out[0:1, k + 1 : 2 * (k + 1)], ref)
    # the text token is the last of each modality's group; changing NIR patches leaves RGB and TIR tokens alone
    patches2 = [patches[0], patches[1] + 1.0, patches[2]]
    out2 = shared(patches2, text)
    torch.testing.assert_close(out2[:, : k + 1], out[:, : k + 1])
    torch.testing.assert_close(out2[:, 2 * (k + 1) :], out[:, 2 * (k + 1) :])
    assert not torch.allclose(out2[:, k + 1 : 2 * (k + 1)], out[:, k + 1 : 2 * (k + 1)])
    assert shared(patches, None).shape == (b, 3 * k, d)


def test_global_fusion_is_residual_cross_attention() -> None:
    from stmi.model.fusion import GlobalFusion

    torch.manual_seed(0)
    gf = GlobalFusion(16, 4)
    g, h = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    blk = gf.block
    kv = blk.norm_kv(h)
    torch.testing.assert_close(gf(g, h), blk.attn(blk.norm_q(g), kv, kv)[0] + g)
    assert blk.ffn is None
