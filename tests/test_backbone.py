"""CLIP backbone: checkpoint formats, positional-embedding resizing, equality with stock open_clip, SIE, SFM."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed as open_clip_resize_pos_embed
from open_clip.transformer import QuickGELU

from stmi.config import ModelConfig
from stmi.model.backbone import (
    TINY_MODEL,
    TextEncoder,
    VisualEncoder,
    build_backbones,
    build_clip,
    load_clip_state_dict,
    read_clip_checkpoint,
    resize_pos_embed,
)

BASE = ModelConfig(clip_model=TINY_MODEL, image_size=(224, 224), use_sfm=True, alpha_init=0.0, beta_init=0.0,
                   num_cameras=0)


def stock(state_dict: dict[str, torch.Tensor], quick_gelu: bool = False) -> torch.nn.Module:
    """Unmodified open_clip model with the given weights (the reference)."""
    model = open_clip.create_model(TINY_MODEL, pretrained=None, force_quick_gelu=quick_gelu)
    model.load_state_dict(state_dict)
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_MODEL, pretrained=None).eval()
    with torch.no_grad():  # move every weight away from its init so a missed key would show
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    d = tmp_path_factory.mktemp("ckpt")
    # open_clip training-checkpoint layout: {"state_dict": {"module." + key: ...}, "epoch": ...}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, d / "open_clip.pt")
    # OpenAI layout 1: TorchScript archive, as OpenAI distributes ViT-B-16.pt
    img, txt = torch.ones(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and torch.jit deprecation warnings: the archive is only a fixture
        traced = torch.jit.trace_module(model, dict(forward=(img, txt), encode_text=(txt,), encode_image=(img,)),
                                        check_trace=False)
    traced.save(str(d / "openai_jit.pt"))
    # OpenAI layout 2: fp16 state dict with the extra integer entries
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    half.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(half, d / "openai_sd.pt")
    return {"sd": sd, "dir": d, "half": {k: v.float() for k, v in half.items() if k in sd}}


def images(h: int = 224, w: int = 224, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def random_token_mask(b: int, n: int) -> torch.Tensor:
    m = (torch.rand(b, n, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    m[:, 0] = 1
    return m


def test_open_clip_layout_matches_stock_encode_image_and_text(ckpts: dict) -> None:
    cfg = dataclasses.replace(BASE, pretrained=str(ckpts["dir"] / "open_clip.pt"))
    visual, text = build_backbones(cfg)
    visual.eval()
    ref = stock(ckpts["sd"])
    x = images()
    with torch.no_grad():
        tokens = visual(x, random_token_mask(2, 197), None, None)  # SFM path with alpha = beta = 0
        plain = visual(x)
        want = ref.encode_image(x)
    assert tokens.shape == (2, 197, 64)
    torch.testing.assert_close(tokens[:, 0], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain[:, 0], want, rtol=0, atol=1e-5)
    # every patch token also went through ln_post and proj: compare with open_clip's own token output
    ref.visual.output_tokens = True
    with torch.no_grad():
        _, ref_tokens = ref.visual(x)
    torch.testing.assert_close(plain[:, 1:], ref_tokens @ ref.visual.proj, rtol=0, atol=1e-5)

    tok = text.tokenize(["a person in a red coat", ""])
    assert tok.shape == (2, 77) and tok.dtype == torch.long
    with torch.no_grad():
        torch.testing.assert_close(text(tok), ref.encode_text(tok), rtol=0, atol=1e-5)
    # differently seeded model -> the loaded weights really came from the file
    assert not torch.allclose(open_clip.create_model(TINY_MODEL).visual.conv1.weight,
                              visual.clip_visual.conv1.weight)


@pytest.mark.parametrize("name", ["openai_jit.pt", "openai_sd.pt"])
def test_openai_layouts_load_with_quickgelu(ckpts: dict, name: str) -> None:
    sd, is_openai = read_clip_checkpoint(ckpts["dir"] / name)
    assert is_openai and "input_resolution" not in sd
    clip = build_clip(dataclasses.replace(BASE, pretrained=str(ckpts["dir"] / name))).eval()
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    ref = stock(ckpts["sd"] if name.endswith("jit.pt") else ckpts["half"], quick_gelu=True)
    enc = VisualEncoder(clip.visual, BASE).eval()
    x = images()
    tok = open_clip.tokenize(["a car", "a white van"])
    with torch.no_grad():
        torch.testing.assert_close(enc(x, random_token_mask(2, 197))[:, 0], ref.encode_image(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(TextEncoder(clip)(tok), ref.encode_text(tok), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size,grid", [((256, 128), (16, 8)), ((128, 256), (8, 16))])
def test_non_square_input_interpolates_pos_embed(ckpts: dict, size: tuple[int, int], grid: tuple[int, int]) -> None:
    cfg = dataclasses.replace(BASE, pretrained=str(ckpts["dir"] / "open_clip.pt"), image_size=size)
    visual, _ = build_backbones(cfg)
    src = ckpts["sd"]["visual.positional_embedding"]
    pe = visual.clip_visual.positional_embedding
    assert pe.shape == (1 + grid[0] * grid[1], 64)
    assert visual.grid_size == grid and tuple(visual.clip_visual.grid_size) == grid
    torch.testing.assert_close(pe.detach(), resize_pos_embed(src, grid))
    torch.testing.assert_close(pe[0].detach(), src[0])  # CLS position kept
    # independent implementation: open_clip's own resizer on a state dict
    sd = {"visual.positional_embedding": src.clone()}
    open_clip_resize_pos_embed(sd, type("Holder", (), {"visual": visual.clip_visual})())
    torch.testing.assert_close(pe.detach(), sd["visual.positional_embedding"], rtol=0, atol=1e-6)
    with torch.no_grad():
        out = visual(images(*size), random_token_mask(2, pe.shape[0]))
    assert out.shape == (2, pe.shape[0], 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="image_size"):
        visual(images(224, 224))


def test_resize_to_same_grid_is_identity() -> None:
    pe = torch.randn(1 + 14 * 14, 32)
    torch.testing.assert_close(resize_pos_embed(pe, (14, 14)), pe, rtol=0, atol=1e-6)
    assert not torch.allclose(resize_pos_embed(pe, (16, 8))[1:9], pe[1:9])
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1 + 12, 8), (4, 4))


def test_sfm_modulates_only_with_mask_nonzero_strength_and_active_samples() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(BASE, alpha_init=0.5, beta_init=0.5)
    clip = build_clip(cfg)
    enc = VisualEncoder(clip.visual, cfg).eval()
    x, m = images(b=3), random_token_mask(3, 197)
    with torch.no_grad():
        plain = enc(x)
        mod = enc(x, m)
        gated = enc(x, m, None, torch.tensor([True, False, True]))
        off = enc(x, m, None, torch.tensor([False, False, False]))
    assert (mod - plain).abs().amax(dim=(1, 2)).min() > 1e-3
    torch.testing.assert_close(gated[1], plain[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(gated[[0, 2]], mod[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-5)

    no_sfm = VisualEncoder(clip.visual, dataclasses.replace(cfg, use_sfm=False)).eval()
    assert no_sfm.sfm is None and not any("sfm" in n for n, _ in no_sfm.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(no_sfm(x, m), plain, rtol=0, atol=1e-5)

    enc.train()
    enc(x, m)[:, 0].sum().backward()
    assert enc.sfm.sfm_alpha.grad.abs().sum() > 0 and enc.sfm.sfm_beta.grad.abs().sum() > 0
    assert enc.sfm.sfm_alpha.shape == (enc.num_layers, 1)


def test_sie_changes_output_only_with_camid() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(BASE, num_cameras=3, use_sie=True, sie_coef=1.5)
    clip = build_clip(cfg)
    with_sie = VisualEncoder(clip.visual, cfg).eval()
    without = VisualEncoder(clip.visual, dataclasses.replace(cfg, use_sie=False)).eval()
    assert with_sie.sie_embed.shape == (3, 64) and without.sie_embed is None
    assert 0 < with_sie.sie_embed.std() < 0.05
    x = images()
    with torch.no_grad():
        base = without(x)
        no_cam = with_sie(x)
        cam = with_sie(x, None, torch.tensor([0, 2]))
        cam_other = with_sie(x, None, torch.tensor([1, 2]))
        manual = with_sie.clip_visual.class_embedding + 1.5 * with_sie.sie_embed[0]
    torch.testing.assert_close(no_cam, base, rtol=0, atol=0)
    assert (cam - base).abs().max() > 1e-4
    assert (cam_other[0] - cam[0]).abs().max() > 1e-4
    torch.testing.assert_close(cam_other[1], cam[1], rtol=0, atol=1e-6)  # same camera, same output
    # the term lands on the CLS token before ln_pre: recompute sample 0 with a shifted class embedding
    with torch.no_grad():
        ref_clip = dataclasses.replace(cfg, use_sie=False)
        shifted = VisualEncoder(clip.visual, ref_clip).eval()
        old = shifted.clip_visual.class_embedding.clone()
        shifted.clip_visual.class_embedding.copy_(manual)
        try:
            torch.testing.assert_close(shifted(x[:1]), cam[:1], rtol=0, atol=1e-5)
        finally:
            shifted.clip_visual.class_embedding.copy_(old)
    with pytest.raises(ValueError, match="num_cameras"):
        with_sie(x, None, torch.tensor([0, 3]))


def test_separate_backbones_give_three_independent_encoders(ckpts: dict) -> None:
    cfg = dataclasses.replace(BASE, separate_backbones=True, pretrained=str(ckpts["dir"] / "open_clip.pt"))
    visual, _ = build_backbones(cfg)
    assert isinstance(visual, torch.nn.ModuleList) and len(visual) == 3
    assert all(isinstance(v, VisualEncoder) for v in visual)
    w = [v.clip_visual.conv1.weight for v in visual]
    assert w[0] is not w[1] and w[1] is not w[2] and w[0].data_ptr() != w[1].data_ptr()
    assert torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])
    assert visual[0].sfm is not visual[1].sfm
    single, _ = build_backbones(dataclasses.replace(cfg, separate_backbones=False))
    assert isinstance(single, VisualEncoder)
    assert (single.patch_size, single.grid_size, single.output_dim, single.num_layers) == (16, (14, 14), 64, 2)


def test_checkpoint_errors_name_the_file_and_the_fix(ckpts: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_clip(dataclasses.replace(BASE, pretrained=str(tmp_path / "missing.pt")))
    broken = dict(ckpts["sd"])
    broken.pop("visual.proj")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken\.pt.*visual\.proj.*clip_model"):
        build_clip(dataclasses.replace(BASE, pretrained=str(tmp_path / "broken.pt")))
    clip = open_clip.create_model(TINY_MODEL)
    with pytest.raises(ValueError, match="wrong shape"):
        load_clip_state_dict(clip, {**ckpts["sd"], "visual.proj": torch.zeros(3, 3)})
    # 'openai' with empty caches: a clear error, no download attempt
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="cannot download.*--pretrained PATH"):
        build_clip(dataclasses.replace(BASE, clip_model="ViT-B-16", pretrained="openai"))
    with pytest.raises(ValueError, match="clip_model"):
        build_clip(dataclasses.replace(BASE, clip_model="no-such-model"))
