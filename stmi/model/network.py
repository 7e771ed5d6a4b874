"""The STMI model: CLIP backbone with SFM, STR, token fusion (CHI), global fusion and BNNeck heads.

Data flow of one forward (docs/ARCHITECTURE.md, docs/design.md)::

    mask --patch_token_mask--> m --perturb (training)--> m'  (one per triplet, shared by modalities and layers)
    rgb/nir/tir --VisualEncoder(m', camid)--> (B, N+1, D) each: CLS -> g_m, patches -> F_m
    caption --TextEncoder--> T (B, D)
    [F_m], T --STR--> H (B, 3(K+1), D) --fusion (chi|concat|mlp|mhsa)--> H'
    G = [g_RGB; g_NIR; g_TIR] (B, 3, D);  U = CrossAttn(G, H', H') + G
    G, U (flattened, 3D) and T (D) --BNNeck--> post-BN features, logits; embedding = L2(cat(post-BN G, U))

Ablation switches (paper table 3 / table 4):

- A, baseline: ``use_sfm=False, use_str=False, fusion="concat"``: the modality CLS tokens only. There is no
  token interaction and no global fusion (U would equal G), so the output has ``G`` (and ``T`` when
  ``use_text``) only, and the retrieval feature is the concatenated post-BN CLS tokens, as the paper's
  baseline "retrieval on concatenated class tokens".
- B, +SFM: ``use_sfm=True`` with the same ``use_str=False, fusion="concat"``.
- C, +SFM+STR: ``use_str=True, fusion="concat"``: the STR tokens are used as they are (H' = H) by the global
  fusion, so ``U`` exists.
- D, full: ``use_str=True, fusion="chi"``. Table 4 B/C: ``fusion="mlp" | "mhsa"``.
- ``use_str=False`` with a non-concat fusion: the fusion runs over the CLS tokens (+ T as a fourth node when
  ``use_text``) and U = CrossAttn(G, H', H') + G.
- ``use_global_fusion=False``: U = G, so U is dropped like in the baseline; STR and the token fusion would then
  reach no loss and are not built (unused parameters would also break DDP).

Whenever ``U`` is absent, ``retrieval_feature`` ``U`` or ``GU`` falls back to ``G`` (for ``GU`` this ranks
identically to the L2-normalised ``[G; G]``).

Text: with ``use_text`` the caption feature T is appended to the STR queries and supervised; ``text=None``
means empty captions (a triplet without a caption uses the empty caption, docs/design.md). Camera: ``camid=None``
runs without the SIE term. Masks: samples with ``has_mask=False`` (or no mask at all) get plain attention.

Missing modalities (``presence`` (B, 3) bool, columns RGB, NIR, TIR; docs/design.md "Missing modalities"). A sample
may lack one or two modalities; one that lacks all three is an error. Each stage:

- Encoder: the absent frame is replaced by zeros and encoded with the others (the shared encoder keeps its one
  batch of 3B). Nothing reads its tokens afterwards; the zeros only guarantee that whatever tensor the caller put
  in the absent slot (noise, a stale frame, NaN) cannot reach any output. Skipping the frame instead would save
  its compute, but changes the batch per modality from step to step and, with ``separate_backbones`` or unshared
  STR blocks, leaves a whole encoder out of the graph when no sample of a rank's batch has that modality, which
  DDP without ``find_unused_parameters`` cannot handle. A learned placeholder frame or token is not needed:
  no stage reads the absent tokens, so it would receive no gradient and carry nothing.
- STR runs on every modality; the K (+1) tokens of an absent modality are marked absent in the node mask.
- Token fusion: absent tokens are excluded from CHI's hypergraph (incidence rows and columns, degrees recomputed),
  masked as keys in ``mhsa``, zeros in the ``mlp`` token mixing; they leave the fusion unchanged
  (:mod:`stmi.model.fusion`). Without STR the nodes are the CLS tokens (+ T): an absent modality's CLS is masked.
- Global fusion: absent tokens are masked keys, so every slot of U attends to present tokens only.
- G and U: an absent modality's slot of G (before the global fusion) and of U (after it) is the mean of the
  sample's present modalities' slots, before the BNNeck. The retrieval embedding therefore has the full dimension,
  goes through the same BNNeck and lives in the space of complete samples. The mean (rather than zeros) because
  (1) a query and a gallery item with disjoint subsets (RGB-only against TIR-only, MDReID's any-to-any) still
  compare features in every slot, where zero slots would make every similarity 0; (2) a zero slot is far from
  the per-slot statistics the BNNeck normalises with (and with modality dropout would drag its running mean and
  variance towards 0, shifting complete samples too), while the mean of present CLS/U features is a feature of the
  same kind; (3) trained with modality dropout, the filled slots are supervised by the same CE and triplet losses,
  so each modality's feature learns to stand in for a missing one. The baseline ablation (no U) fills G the same
  way. T is unchanged.
- ``presence=None`` or all True: no mask is built anywhere and the outputs are bit-identical to a forward without
  the argument (a test checks it for every ablation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stmi.config import ModelConfig
from stmi.model.backbone import build_backbones, clip_tokenizer
from stmi.model.fusion import GlobalFusion, build_token_fusion
from stmi.model.heads import BNNeck
from stmi.model.sfm import patch_token_mask, perturb_token_mask
from stmi.model.str_module import SemanticTokenReallocation

__all__ = ["STMI", "STMIOutput", "build_model", "check_presence", "fill_absent", "needs_find_unused_parameters"]

NUM_MODALITIES = 3


@dataclass
class STMIOutput:
    """What one forward returns (features absent in an ablation are absent from the dicts).

    Attributes:
        feats: ``"G"`` (B, 3D), ``"U"`` (B, 3D), ``"T"`` (B, D) pre-BN features (triplet loss).
        bn_feats: the same keys after their BNNeck (classifier input, retrieval).
        logits: classifier logits per key; only in training mode and with ``num_classes > 0``.
        embedding: (B, E) L2-normalised retrieval feature (``ModelConfig.retrieval_feature``).
    """

    feats: dict[str, torch.Tensor]
    bn_feats: dict[str, torch.Tensor]
    embedding: torch.Tensor
    logits: dict[str, torch.Tensor] = field(default_factory=dict)


def fill_absent(x: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """``x`` (B, 3, D) with each absent modality's slot (``presence`` (B, 3) False) set to the mean of the sample's
    present slots (module docstring). Absent slots never enter the mean, whatever their value (NaN included)."""
    p = presence.unsqueeze(-1)
    mean = x.masked_fill(~p, 0.0).sum(dim=1, keepdim=True) / presence.sum(dim=1).view(-1, 1, 1).to(x.dtype)
    return torch.where(p, x, mean)


def check_presence(presence: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """Validate ``presence`` and return it on ``device``, or None when it is None or all True (every stage then runs
    its unmasked path, which is what keeps complete samples bit-identical).

    Raises:
        ValueError: not a (batch, 3) bool tensor, or a sample has no modality at all (names the samples).
    """
    if presence is None:
        return None
    if not isinstance(presence, torch.Tensor) or presence.dtype != torch.bool:
        raise ValueError(f"presence must be a bool tensor of shape ({batch}, 3) (columns rgb, nir, tir), got "
                         f"{getattr(presence, 'dtype', type(presence).__name__)}; pass presence.bool()")
    if tuple(presence.shape) != (batch, NUM_MODALITIES):
        raise ValueError(f"presence has shape {tuple(presence.shape)}, expected ({batch}, {NUM_MODALITIES}) "
                         "(one row per sample, columns rgb, nir, tir)")
    presence = presence.to(device)
    empty = (~presence).all(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"presence: sample(s) {rows[:10]}{' ...' if len(rows) > 10 else ''} of the batch have no "
                         "modality (rgb, nir and tir all absent); every sample needs at least one: drop those "
                         "samples before calling the model")
    if bool(presence.all()):
        return None
    return presence


class STMI(nn.Module):
    """Segmentation-guided token modulation + cross-modal hypergraph interaction (see the module docstring).

    Build it with :func:`build_model`. Everything is created on the CPU; move it with ``.to(device)``.
    """

    def __init__(self, cfg: ModelConfig, visual: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = visual
        first = visual[0] if isinstance(visual, nn.ModuleList) else visual
        self.patch_size = first.patch_size
        self.dim = int(first.output_dim)
        self.use_text = cfg.use_text
        # The text tower is a submodule only when used: unused parameters would break DDP and bloat checkpoints.
        # The tokenizer needs only the context length, so captions can be tokenised either way.
        self.text = text if cfg.use_text else None
        self.context_length = int(text.context_length)

        self.has_u = cfg.use_global_fusion and not (not cfg.use_str and cfg.fusion == "concat")
        self.str_module: SemanticTokenReallocation | None = None
        self.token_fusion: nn.Module | None = None
        self.global_fusion: GlobalFusion | None = None
        if self.has_u:
            if cfg.use_str:
                self.str_module = SemanticTokenReallocation(self.dim, cfg.K, cfg.str_heads, cfg.str_share_weights)
                num_nodes = NUM_MODALITIES * self.str_module.tokens_per_modality(cfg.use_text)
            else:
                num_nodes = NUM_MODALITIES + int(cfg.use_text)
            self.token_fusion = build_token_fusion(cfg.fusion, num_nodes, self.dim, cfg.str_heads, cfg.tau,
                                                   cfg.chi_layers)
            self.global_fusion = GlobalFusion(self.dim, cfg.str_heads)

        feat_dims = {"G": NUM_MODALITIES * self.dim}
        if self.has_u:
            feat_dims["U"] = NUM_MODALITIES * self.dim
        if cfg.use_text:
            feat_dims["T"] = self.dim
        self.feat_dims = feat_dims
        self.heads = nn.ModuleDict({k: BNNeck(d, cfg.num_classes) for k, d in feat_dims.items()})
        wanted = {"G": ["G"], "U": ["U"], "GU": ["G", "U"]}[cfg.retrieval_feature]
        self.retrieval_keys: list[str] = [k for k in wanted if k in feat_dims] or ["G"]

    @property
    def embedding_dim(self) -> int:
        """E, the width of :meth:`embed`'s output."""
        return sum(self.feat_dims[k] for k in self.retrieval_keys)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Caption token ids ``(len(captions), context_length)`` for the ``text`` argument."""
        return clip_tokenizer(self.context_length)(list(captions))

    def _token_mask(
        self, mask: torch.Tensor | None, has_mask: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-triplet token mask (perturbed in training) and the per-sample SFM switch, or (None, None)."""
        if not self.cfg.use_sfm or mask is None:
            return None, None
        if mask.shape[0] != batch:
            raise ValueError(f"mask has batch size {mask.shape[0]} but the images have {batch}")
        tm = patch_token_mask(mask, self.patch_size, self.cfg.mask_patch_threshold)
        if self.training and self.cfg.p > 0:
            tm = perturb_token_mask(tm, self.cfg.p)
        active = torch.ones(batch, dtype=torch.bool, device=mask.device) if has_mask is None else has_mask.bool()
        if not bool(active.any()):
            return None, None
        return tm, active

    def _encode_images(
        self, images: list[torch.Tensor], tm: torch.Tensor | None, active: torch.Tensor | None,
        camid: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        """(B, N+1, D) tokens per modality; a shared encoder runs the three modalities as one batch of 3B."""
        if isinstance(self.visual, nn.ModuleList):
            return [enc(x, tm, camid, active) for enc, x in zip(self.visual, images)]

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(NUM_MODALITIES, *([1] * (t.dim() - 1)))

        out = self.visual(torch.cat(images, dim=0), rep(tm), rep(camid), rep(active))
        return list(out.chunk(NUM_MODALITIES, dim=0))

    def forward(
        self,
        rgb: torch.Tensor,
        nir: torch.Tensor,
        tir: torch.Tensor,
        mask: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        camid: torch.Tensor | None = None,
        presence: torch.Tensor | None = None,
    ) -> STMIOutput:
        """Features, post-BN features, logits (training) and the retrieval embedding.

        Args:
            rgb, nir, tir: (B, 3, H, W) CLIP-normalised images.
            mask: (B, 1, H, W) foreground mask in [0, 1], one per triplet, or None.
            has_mask: (B,) bool; None with a mask means every sample has one.
            text: (B, context_length) ids from :meth:`tokenize`, or None for empty captions.
            camid: (B,) 0-based camera ids, or None (no SIE term).
            presence: (B, 3) bool, columns rgb, nir, tir; False marks an absent modality, whose frame (any tensor
                of the right shape) is not used (module docstring). None: all present.

        Raises:
            ValueError: ``presence`` is malformed or a sample has no modality.
        """
        b = rgb.shape[0]
        presence = check_presence(presence, b, rgb.device)
        images = [rgb, nir, tir]
        if presence is not None:  # the absent frames are zeros from here on: nothing the caller put there is read
            images = [x.masked_fill(~presence[:, m].view(-1, 1, 1, 1), 0.0) for m, x in enumerate(images)]
        tm, active = self._token_mask(mask, has_mask, b)
        tokens = self._encode_images(images, tm, active, camid)
        g = torch.stack([t[:, 0] for t in tokens], dim=1)  # (B, 3, D)
        if presence is not None:
            g = fill_absent(g, presence)

        t_feat = None
        if self.text is not None:
            if text is None:
                text = self.tokenize([""] * b).to(rgb.device)
            t_feat = self.text(text)

        feats: dict[str, torch.Tensor] = {"G": g.flatten(1)}
        if self.has_u:
            node_mask = None
            if self.str_module is not None:
                h = self.str_module([t[:, 1:] for t in tokens], t_feat)
                if presence is not None:  # modality-major tokens, K (+1) per modality
                    node_mask = presence.repeat_interleave(h.shape[1] // NUM_MODALITIES, dim=1)
            else:
                h = g if t_feat is None else torch.cat([g, t_feat.unsqueeze(1).to(g.dtype)], dim=1)
                if presence is not None:  # the CLS nodes, then T (always present)
                    node_mask = torch.cat([presence, presence.new_ones(b, h.shape[1] - NUM_MODALITIES)], dim=1)
            u = self.global_fusion(g, self.token_fusion(h, node_mask), node_mask)
            if presence is not None:
                u = fill_absent(u, presence)
            feats["U"] = u.flatten(1)
        if t_feat is not None:
            feats["T"] = t_feat

        bn_feats: dict[str, torch.Tensor] = {}
        logits: dict[str, torch.Tensor] = {}
        for k, f in feats.items():
            bn_feats[k], lg = self.heads[k](f)
            if lg is not None:
                logits[k] = lg
        emb = F.normalize(torch.cat([bn_feats[k] for k in self.retrieval_keys], dim=1), dim=1)
        return STMIOutput(feats=feats, bn_feats=bn_feats, embedding=emb, logits=logits)

    def embed(
        self,
        rgb: torch.Tensor,
        nir: torch.Tensor,
        tir: torch.Tensor,
        mask: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        camid: torch.Tensor | None = None,
        presence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, embedding_dim) unit-norm retrieval embedding, in eval mode and without gradients.

        The previous train/eval mode is restored afterwards, so an evaluation in the middle of training does
        not leave the model in eval mode. ``presence`` as in :meth:`forward`: a sample with absent modalities gets
        an embedding of the same dimension, in the same space as a complete one.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self.forward(rgb, nir, tir, mask=mask, has_mask=has_mask, text=text, camid=camid,
                                    presence=presence).embedding
        finally:
            self.train(was_training)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"clip": CLIP tower weights, "head": everything new}`` for per-group learning rates.

        "clip" is what a CLIP checkpoint holds (the visual and text towers); "head" holds the SFM alpha/beta and
        the SIE camera table (new parameters that live inside the visual encoder), STR, the token fusion, the
        global fusion and the BNNecks. Frozen parameters (the BN biases) are left out. Every trainable parameter
        is in exactly one group.
        """
        encoders = list(self.visual) if isinstance(self.visual, nn.ModuleList) else [self.visual]
        clip_ids = {id(p) for enc in encoders for p in enc.clip_parameters()}
        if self.text is not None:
            clip_ids |= {id(p) for p in self.text.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"clip": [], "head": []}
        for p in self.parameters():
            if p.requires_grad:
                groups["clip" if id(p) in clip_ids else "head"].append(p)
        return groups


def build_model(cfg: ModelConfig) -> STMI:
    """Build STMI from ``cfg`` on the CPU (CLIP weights from ``cfg.pretrained`` when set)."""
    visual, text = build_backbones(cfg)
    return STMI(cfg, visual, text)


def needs_find_unused_parameters(cfg: ModelConfig) -> bool:
    """Whether DDP needs ``find_unused_parameters=True`` for a model built from ``cfg``: never.

    Every configuration builds only the modules that reach the loss (the text tower without ``use_text``, STR and
    the token and global fusion without ``U``, SFM alpha/beta outside the modulated layers are not built), and a
    batch without masks or camera ids keeps alpha/beta and the SIE table in the graph with a zero gradient, so
    each rank produces a gradient for every parameter at every step (``tests/test_ddp_params.py`` checks this
    for every ablation). Missing modalities (``presence``, modality dropout) keep this: an absent modality is
    still encoded (as zeros) and run through STR, and its tokens are excluded by masks (``torch.where``, zero
    incidence, key padding), which give its parameters a zero gradient rather than none, even when no sample of
    a batch has that modality (``tests/test_missing_modalities_model.py`` checks it). The flag costs an extra autograd-graph traversal per step; pass this function's value
    to ``prepare_model``/``DistributedDataParallel`` instead of a constant.
    """
    del cfg  # kept in the signature: a future configuration that leaves a module unused answers here
    return False
