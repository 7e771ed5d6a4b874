"""The open_clip CLIP backbone: the ``stmi-tiny`` config, CLIP weight loading, and the SFM visual / text encoders.

As timm keeps ``checkpoint_filter_fn`` and ``resize_pos_embed`` beside its ViT, the weight adapter lives next to the
encoders: :func:`build_clip` creates an open_clip ``CLIP`` at ``ModelConfig.image_size`` and loads a checkpoint
(:func:`read_clip_checkpoint`, :func:`load_clip_state_dict`), resampling the visual positional embedding from the
checkpoint's square grid to the input grid (:func:`resize_pos_embed`; 256x128 at patch 16 -> 16x8).

:class:`VisualEncoder` reuses the open_clip ``VisionTransformer``'s modules and parameters unchanged (so CLIP
checkpoints load as they are) but runs every attention through :func:`stmi.model.sfm.sfm_attention` and sends every
token, not only CLS, through ``ln_post`` and ``proj``.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import open_clip.factory
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from stmi.config import ModelConfig
from stmi.model.sfm import SFMParams, sfm_attention

__all__ = [
    "DEMO_MODEL",
    "DEMO_MODEL_CONFIG",
    "TINY_MODEL",
    "TINY_MODEL_CONFIG",
    "TextEncoder",
    "VisualEncoder",
    "build_backbones",
    "build_clip",
    "load_clip_state_dict",
    "read_clip_checkpoint",
    "register_model_config",
    "resize_pos_embed",
]

TINY_MODEL = "stmi-tiny"
TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
"""A 2-layer, width-64 CLIP for tests and the demo (random init; seconds to build on a CPU)."""

_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def clip_tokenizer(context_length: int) -> open_clip.SimpleTokenizer:
    """open_clip's CLIP tokenizer at ``context_length``: the one tokenizer of the project (the model's ``tokenize``,
    the loaders' captions and serving all use it), built once per length. It is picklable, so loader workers can
    hold it."""
    tok = _TOKENIZERS.get(context_length)
    if tok is None:
        tok = _TOKENIZERS[context_length] = open_clip.SimpleTokenizer(context_length=context_length)
    return tok


def text_context_length(clip_model: str) -> int:
    """The text tower's context length of the open_clip config ``clip_model`` (77 when it does not say)."""
    return int(((open_clip.get_model_config(clip_model) or {}).get("text_cfg") or {}).get("context_length", 77))


_TOKENIZERS: dict[int, open_clip.SimpleTokenizer] = {}


def register_model_config(name: str, config: dict[str, Any]) -> None:
    """Add ``config`` to open_clip's model registry under ``name`` (so ``open_clip.create_model(name)`` works).

    open_clip only scans JSON files (``add_model_config``); its registry is the dict ``factory._MODEL_CONFIGS``,
    which a later rescan keeps, so the entry is written there directly. Re-registering the same name is a no-op.
    """
    registry = open_clip.factory._MODEL_CONFIGS
    if name not in registry:
        registry[name] = copy.deepcopy(config)


register_model_config(TINY_MODEL, TINY_MODEL_CONFIG)

DEMO_MODEL = "stmi-tiny-p8"
DEMO_MODEL_CONFIG: dict[str, Any] = {**TINY_MODEL_CONFIG,
                                     "vision_cfg": {**TINY_MODEL_CONFIG["vision_cfg"], "patch_size": 8}}
"""The demo recipe's model: ``stmi-tiny`` with 8-px patches, so the demo's 64x32 input is 8 x 4 = 32 tokens.

With 16-px patches that input is 4 x 2 = 8 tokens, and the object (25-45 % of the frame) covers no token on its own:
the token mask SFM works from marks little but background-mixed patches, and on the hard synthetic RGBNT201 the
full model learnt almost nothing in the demo's 4 epochs (0.12 test mAP, 1.6x the untrained 0.076; measured with
``benchmarks/ablation.py``). With 32 tokens it reaches 4.1x at the demo recipe's former lr 1e-3 and 6.2x at its lr
3e-3 (that benchmark's docstring), for about 1.4x the training time on a CPU (the full model, 40 ids, 4 epochs: 10 s
vs 7 s)."""
register_model_config(DEMO_MODEL, DEMO_MODEL_CONFIG)


# ----------------------------------------------------------------------------------------------- weight loading
def resize_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample a ViT positional embedding ``(prefix + gh*gw, C)`` to the grid ``new_grid`` (rows, cols).

    The prefix (CLS) rows are kept; the patch rows are treated as a ``C``-channel image and interpolated (bicubic
    with antialiasing, as open_clip and timm do). ``old_grid`` defaults to the square grid implied by the length.
    Resampling to the same grid is the identity.
    """
    prefix, grid = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(grid.shape[0])
        if side * side != grid.shape[0]:
            raise ValueError(f"resize_pos_embed: {grid.shape[0]} patch positions are not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != grid.shape[0]:
        raise ValueError(f"resize_pos_embed: old_grid {old_grid} does not match {grid.shape[0]} patch positions")
    dtype = pos_embed.dtype
    img = grid.float().reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=tuple(new_grid), mode=interpolation, antialias=antialias, align_corners=False)
    grid = img.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1).to(dtype)
    return torch.cat([prefix, grid], dim=0)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` zips have none."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any("/code/" in name for name in zf.namelist())
    except zipfile.BadZipFile:
        return False


def read_clip_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], bool]:
    """Read a CLIP checkpoint into a plain open_clip-layout state dict.

    Accepted: OpenAI's TorchScript archives (``ViT-B-16.pt``) and state dicts, open_clip state dicts, either bare
    or wrapped in ``{"state_dict": ...}`` / ``{"model": ...}`` (training checkpoints) and with or without a
    ``module.`` (DDP) prefix; ``.safetensors`` files. OpenAI and open_clip ``CLIP`` use the same key names; the
    OpenAI extras (``input_resolution``, ``context_length``, ``vocab_size``) are dropped.

    Returns:
        (state dict, whether it is in OpenAI's format; OpenAI weights were trained with QuickGELU).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist (ModelConfig.pretrained / --pretrained): "
                                "pass the path of a local CLIP checkpoint, 'openai', or None for random weights")
    openai_format = False
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    elif _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but OpenAI ships TorchScript
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        openai_format = True
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file and the fix
            raise ValueError(f"cannot read CLIP checkpoint {path}: {e}. Save the weights as a plain state dict "
                             "(torch.save(model.state_dict(), path)) or pass OpenAI's TorchScript file") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"CLIP checkpoint {path} does not hold a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k in sd for k in _OPENAI_EXTRA_KEYS):
        openai_format = True
    for k in _OPENAI_EXTRA_KEYS:
        sd.pop(k, None)
    return sd, openai_format


def load_clip_state_dict(model: nn.Module, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
    """Load CLIP weights into an open_clip ``CLIP`` built at any input size (strict: every key must match).

    The visual positional embedding is resampled from the checkpoint's grid to ``model.visual.grid_size``;
    open_clip's ``CustomTextCLIP`` layout (``text.`` prefix) is mapped back to ``CLIP``'s flat text keys.
    """
    sd = dict(state_dict)
    if any(k.startswith("text.") for k in sd) and not hasattr(model, "text"):
        sd = {k.removeprefix("text."): v for k, v in sd.items()}
    key = "visual.positional_embedding"
    if key in sd and hasattr(model.visual, "grid_size"):
        grid = tuple(model.visual.grid_size)
        if sd[key].shape[0] != grid[0] * grid[1] + 1:
            sd[key] = resize_pos_embed(sd[key], grid)
    if "logit_scale" in sd and sd["logit_scale"].shape != model.logit_scale.shape:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    own = model.state_dict()
    # TorchScript state dicts also carry non-persistent buffers (the text causal mask); the model rebuilds them.
    for name, _ in model.named_buffers():
        if name not in own:
            sd.pop(name, None)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")

        raise ValueError(
            f"CLIP weights from {source} do not fit this open_clip model: missing [{head(missing)}], unexpected "
            f"[{head(unexpected)}], wrong shape [{head(wrong)}]. Set ModelConfig.clip_model to the architecture "
            "the checkpoint was trained with (e.g. ViT-B-16)"
        )
    model.load_state_dict(sd, strict=True)


def _openai_cache_file(model_name: str) -> Path:
    """The OpenAI weights of ``model_name`` in the user's open_clip caches (no download is attempted)."""
    pcfg = open_clip.get_pretrained_cfg(model_name, "openai")
    if not pcfg:
        raise ValueError(f"ModelConfig.pretrained='openai' but open_clip has no OpenAI weights for clip_model="
                         f"{model_name!r}; choose e.g. ViT-B-16 or pass a local checkpoint path")
    candidates: list[Path] = []
    if pcfg.get("url"):
        candidates.append(Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(pcfg["url"]))
    hub = pcfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for name in names:
                hit = try_to_load_from_cache(repo_id=repo, filename=name, cache_dir=os.environ.get("HF_HUB_CACHE"))
                if isinstance(hit, str):
                    candidates.insert(0, Path(hit))
        except ImportError:
            pass
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"ModelConfig.pretrained='openai': no cached OpenAI weights for {model_name} (looked in "
        f"{', '.join(str(c) for c in candidates) or 'the open_clip caches'}, and the Hugging Face cache for "
        f"{hub or 'nothing'}). This machine cannot download weights: copy the checkpoint (e.g. OpenAI's "
        f"ViT-B-16.pt) here and pass its path with --pretrained PATH (ModelConfig.pretrained)"
    )


def build_clip(cfg: ModelConfig) -> nn.Module:
    """An fp32 open_clip ``CLIP`` for ``cfg.clip_model`` at ``cfg.image_size``, with weights per ``cfg.pretrained``.

    ``pretrained``: ``None`` random init; ``"openai"`` the user's open_clip cache (never downloads); or a path
    (see :func:`read_clip_checkpoint`). OpenAI-format weights switch the towers to QuickGELU, the activation they
    were trained with (as open_clip's ``openai`` tag does); for OpenAI weights re-saved in open_clip's layout
    choose a ``-quickgelu`` model name. The visual tower is built for the non-square grid directly
    (``force_image_size``), so its ``image_size``/``grid_size`` match the input.
    """
    name = cfg.clip_model
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"ModelConfig.clip_model={name!r} is not an open_clip model config; known ones include "
                         f"{TINY_MODEL}, ViT-B-16 (see open_clip.list_models())")
    state_dict, quick_gelu, source = None, False, ""
    if cfg.pretrained:
        if cfg.pretrained == "openai":
            path = _openai_cache_file(name)
            state_dict, _ = read_clip_checkpoint(path)
            quick_gelu = True
        else:
            path = Path(cfg.pretrained).expanduser()
            state_dict, quick_gelu = read_clip_checkpoint(path)
        source = str(path)
    model = open_clip.create_model(
        name, pretrained=None, force_image_size=tuple(cfg.image_size), force_quick_gelu=quick_gelu
    )
    if state_dict is not None:
        load_clip_state_dict(model, state_dict, source)
    return model.float()


# --------------------------------------------------------------------------------------------------- encoders
class VisualEncoder(nn.Module):
    """open_clip ViT with SFM attention; returns every token in the CLIP embedding space ``(B, N+1, D)``.

    The open_clip ``VisionTransformer`` is kept as the submodule ``clip_visual`` (its parameter names are those
    of a CLIP checkpoint's ``visual.`` part); the new parameters are ``sfm.sfm_alpha`` / ``sfm.sfm_beta``
    (:class:`SFMParams`, absent with ``use_sfm=False``) and ``sie_embed``.

    SIE: a learnable camera table (``num_cameras x width``, trunc-normal std 0.02) scaled by ``sie_coef`` is added
    to the CLS token after the positional embedding and before ``ln_pre``. TransReID adds it to every token; we
    put it on CLS only (docs/design.md), which leaves the patch tokens (and so the SFM logits between patches)
    camera-agnostic.
    Without ``camid`` no SIE term is added, so inference without a camera id works.

    The token mask is used as given: perturbation (training only) is the caller's job (``STMI`` perturbs once per
    forward and passes the same mask to every layer, docs/design.md "SFM").

    Args:
        clip_visual: an open_clip ``VisionTransformer`` with standard blocks (as in every OpenAI/open_clip ViT).
        cfg: ``use_sfm``, ``sfm_sharing``, ``sfm_layers``, ``alpha_init``, ``beta_init``, ``use_sie``,
            ``num_cameras``, ``sie_coef``, ``sfm_kernel`` are read.
        num_cameras: overrides ``cfg.num_cameras`` when given.
    """

    def __init__(self, clip_visual: VisionTransformer, cfg: ModelConfig, num_cameras: int | None = None) -> None:
        super().__init__()
        if not isinstance(clip_visual, VisionTransformer):
            raise TypeError(f"VisualEncoder needs an open_clip VisionTransformer (ModelConfig.clip_model "
                            f"{cfg.clip_model!r} built a {type(clip_visual).__name__}); choose a ViT model")
        blocks = clip_visual.transformer.resblocks
        if not all(isinstance(b, ResidualAttentionBlock) and isinstance(b.attn, nn.MultiheadAttention)
                   for b in blocks):
            raise TypeError(f"ModelConfig.clip_model {cfg.clip_model!r} uses custom attention blocks; SFM supports "
                            "standard CLIP ViT blocks (nn.MultiheadAttention)")
        if clip_visual.attn_pool is not None or not isinstance(clip_visual.patch_dropout, nn.Identity):
            raise TypeError(f"ModelConfig.clip_model {cfg.clip_model!r} uses attentional pooling or patch dropout, "
                            "which drop the token-to-patch alignment SFM needs; choose a plain CLIP ViT")
        self.clip_visual = clip_visual
        ps = tuple(clip_visual.patch_size)
        self.patch_size: int | tuple[int, int] = ps[0] if ps[0] == ps[1] else ps
        self.grid_size: tuple[int, int] = tuple(clip_visual.grid_size)
        self.image_size: tuple[int, int] = tuple(clip_visual.image_size)
        self.output_dim = int(clip_visual.proj.shape[1])
        self.width = int(clip_visual.conv1.out_channels)
        self.num_layers = len(blocks)
        self.num_heads = int(blocks[0].attn.num_heads)
        self.sfm_kernel = cfg.sfm_kernel
        self.sfm: SFMParams | None = None
        if cfg.use_sfm:
            self.sfm = SFMParams(self.num_layers, self.num_heads, cfg.sfm_sharing, cfg.sfm_layers,
                                 cfg.alpha_init, cfg.beta_init)
        n_cam = cfg.num_cameras if num_cameras is None else num_cameras
        self.num_cameras = n_cam if cfg.use_sie else 0
        self.sie_coef = float(cfg.sie_coef)
        self.sie_embed: nn.Parameter | None = None
        if self.num_cameras > 0:
            self.sie_embed = nn.Parameter(torch.empty(self.num_cameras, self.width))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)

    def _attention(self, block: ResidualAttentionBlock, x: Tensor, token_mask: Tensor | None,
                   alpha: Tensor | None, beta: Tensor | None) -> Tensor:
        attn = block.attn
        bsz, length, width = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.view(bsz, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if token_mask is None or alpha is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = sfm_attention(q, k, v, token_mask, alpha, beta, kernel=self.sfm_kernel)
        return attn.out_proj(out.transpose(1, 2).reshape(bsz, length, width))

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        camid: Tensor | None = None,
        sfm_active: Tensor | None = None,
    ) -> Tensor:
        """Encode images.

        Args:
            x: ``(B, 3, H, W)`` CLIP-normalised, ``(H, W)`` = the encoder's ``image_size``.
            token_mask: ``(B, N+1)`` in {0, 1} (CLS first), or None for plain attention everywhere.
            camid: ``(B,)`` 0-based camera ids, or None (no SIE term).
            sfm_active: ``(B,)`` bool; samples marked False (no mask) get S = 0. None = all active.

        Returns:
            ``(B, N+1, D)``: CLS then the patches in row-major order, all after ``ln_post`` and ``proj``.
        """
        vis = self.clip_visual
        if x.shape[-2:] != self.image_size:
            raise ValueError(f"VisualEncoder: input size {tuple(x.shape[-2:])} != the encoder's image size "
                             f"{self.image_size}; resize the images or set ModelConfig.image_size")
        bsz = x.shape[0]
        t = vis.conv1(x).flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(t.dtype).view(1, 1, -1).expand(bsz, 1, -1)
        if camid is not None and self.sie_embed is not None:
            if camid.shape != (bsz,) or int(camid.min()) < 0 or int(camid.max()) >= self.num_cameras:
                raise ValueError(f"VisualEncoder: camid must be (B,) in [0, {self.num_cameras}) "
                                 f"(ModelConfig.num_cameras); got shape {tuple(camid.shape)}, "
                                 f"range [{int(camid.min())}, {int(camid.max())}]")
            cls = cls + self.sie_coef * self.sie_embed[camid].to(t.dtype).unsqueeze(1)
        elif self.sie_embed is not None and self.training and torch.is_grad_enabled():
            cls = cls + 0.0 * self.sie_embed.sum().to(t.dtype)  # a zero gradient, so DDP sees every parameter
        t = torch.cat([cls, t], dim=1) + vis.positional_embedding.to(t.dtype)
        t = vis.ln_pre(t)

        mask = token_mask if self.sfm is not None else None
        if mask is not None and mask.shape != t.shape[:2]:
            raise ValueError(f"VisualEncoder: token_mask must be (B, N+1) = {tuple(t.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        gate = None
        if mask is not None and sfm_active is not None:
            gate = sfm_active.to(device=t.device, dtype=t.dtype).view(bsz, 1)
            if not bool(sfm_active.any()):
                mask = None
        if mask is None and self.sfm is not None and self.training and torch.is_grad_enabled():
            # No sample of this batch is modulated: alpha/beta still get a (zero) gradient, so a DDP rank with
            # such a batch does not leave them out (DDP runs without find_unused_parameters).
            t = t + 0.0 * (self.sfm.sfm_alpha.sum() + self.sfm.sfm_beta.sum()).to(t.dtype)
        for i, block in enumerate(vis.transformer.resblocks):
            ab = self.sfm.get(i) if mask is not None else None
            alpha = beta = None
            if ab is not None:
                alpha, beta = ab
                if gate is not None:
                    alpha, beta = alpha.reshape(1, -1) * gate, beta.reshape(1, -1) * gate
            t = t + block.ls_1(self._attention(block, block.ln_1(t), mask, alpha, beta))
            t = t + block.ls_2(block.mlp(block.ln_2(t)))
        return vis.ln_post(t) @ vis.proj

    def clip_parameters(self) -> list[nn.Parameter]:
        """Parameters that come from the CLIP checkpoint (everything but SFM alpha/beta and SIE)."""
        return list(self.clip_visual.parameters())


class TextEncoder(nn.Module):
    """The CLIP text tower: token ids -> the EOT token's feature after ``ln_final`` and ``text_projection``.

    Holds only the text modules of the CLIP model (same parameter names as a CLIP checkpoint's text part), so the
    visual weights are not duplicated. The computation is open_clip's ``CLIP.encode_text`` (unnormalised).
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        if not hasattr(clip_model, "token_embedding"):
            raise TypeError("TextEncoder needs an open_clip CLIP with the built-in text tower (not CustomTextCLIP)")
        self.transformer = clip_model.transformer
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.pool_type = clip_model.text_pool_type
        self.eos_id = getattr(clip_model, "text_eos_id", None)
        self.context_length = int(clip_model.context_length)
        self.output_dim = int(
            self.text_projection.out_features if isinstance(self.text_projection, nn.Linear)
            else self.text_projection.shape[1]
        )

    def tokenize(self, texts: list[str]) -> Tensor:
        """``(len(texts), context_length)`` token ids with :func:`clip_tokenizer` (empty strings allowed)."""
        return clip_tokenizer(self.context_length)(list(texts))

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, context_length)`` ids -> ``(B, D)`` text features."""
        from open_clip.transformer import text_global_pool

        dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding.to(dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def build_backbones(cfg: ModelConfig) -> tuple[nn.Module, TextEncoder]:
    """(visual, text): one shared :class:`VisualEncoder`, or a ``ModuleList`` of three (RGB, NIR, TIR) when
    ``cfg.separate_backbones``, each initialised from the same CLIP weights; and the :class:`TextEncoder`."""
    clip = build_clip(cfg)
    if cfg.separate_backbones:
        visual: nn.Module = nn.ModuleList(
            [VisualEncoder(clip.visual if i == 0 else copy.deepcopy(clip.visual), cfg) for i in range(3)]
        )
    else:
        visual = VisualEncoder(clip.visual, cfg)
    return visual, TextEncoder(clip)
