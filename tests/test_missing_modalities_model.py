"""Missing modalities through every stage of the model (issue 16; docs/design.md "Missing modalities").

``presence`` (B, 3) bool, columns RGB, NIR, TIR. Checked here: with every modality present the outputs are
bit-identical to a forward without the argument; whatever is in an absent modality's slot (the frame, its encoder
tokens, its STR tokens) reaches no output; CHI's masked incidence and convolution against a naive loop; the fusions'
key masks; the fill rule of the G/U slots and the embedding's dimension; every parameter still gets a gradient
(DDP without ``find_unused_parameters``); ``model_inputs`` passes ``presence`` through; and modality dropout's
distribution and determinism.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stmi.config import LossConfig
from stmi.data.batch import model_inputs
from stmi.losses import stmi_loss
from stmi.model.chi import CHI, HypergraphConv, hypergraph_incidence
from stmi.model.fusion import GlobalFusion, MHSAFusion, MLPFusion
from stmi.model.network import STMI, STMIOutput, build_model, needs_find_unused_parameters
from tests.test_model import make_batch, tiny_cfg

B = 8
CONFIGS = {
    "full": {},
    "baseline": dict(use_sfm=False, use_str=False, fusion="concat", use_text=False, use_global_fusion=False),
    "concat after STR": dict(fusion="concat"),
    "mlp": dict(fusion="mlp"),
    "mhsa": dict(fusion="mhsa"),
    "CHI over CLS tokens": dict(use_str=False, fusion="chi"),
    "separate backbones, unshared STR, 2 CHI layers": dict(separate_backbones=True, str_share_weights=False,
                                                           chi_layers=2),
    "no text": dict(use_text=False),
}

# every pattern of one or two absent modalities, plus complete rows
PARTIAL = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 1]],
                       dtype=torch.bool)


def _model(name: str, **kw) -> STMI:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(p=0.1, **CONFIGS[name], **kw))
    if model.token_fusion is not None and hasattr(model.token_fusion, "layers"):
        for layer in model.token_fusion.layers:  # distinct slot weights, so a wrong degree shows
            with torch.no_grad():
                layer.edge_weight.uniform_(0.5, 1.5)
        model.token_fusion.tau = 0.0  # hyperedges with several nodes, across modalities
    return model


def _forward(model: STMI, batch: dict, seed: int = 1, **kw) -> STMIOutput:
    text = model.tokenize(["a person in red"] * B)
    torch.manual_seed(seed)  # the SFM perturbation of a training forward
    return model(batch["rgb"], batch["nir"], batch["tir"], mask=batch["mask"], camid=batch["camid"], text=text, **kw)


def _tensors(out: STMIOutput) -> dict[str, torch.Tensor]:
    res = {f"{kind}.{k}": v for kind, d in (("feats", out.feats), ("bn", out.bn_feats), ("logits", out.logits))
           for k, v in d.items()}
    res["embedding"] = out.embedding
    return res


def _assert_equal(a: STMIOutput, b: STMIOutput) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"outputs differ: {bad}"


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


# --------------------------------------------------------------------------------------------------------------
# complete samples: exactly today's outputs


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_all_present_is_bit_identical_to_no_presence(name: str, mode: str, batch: dict) -> None:
    model = _model(name).train(mode == "train")
    ref = _forward(model, batch)
    _assert_equal(_forward(model, batch, presence=None), ref)
    _assert_equal(_forward(model, batch, presence=torch.ones(B, 3, dtype=torch.bool)), ref)
    # and the masked path really is another computation: a partial row changes it
    partial = _forward(model, batch, presence=PARTIAL)
    assert not torch.equal(partial.embedding[1], ref.embedding[1])


def test_embed_passes_presence(batch: dict) -> None:
    model = _model("full").eval()
    kw = dict(mask=batch["mask"], camid=batch["camid"])
    full = model.embed(batch["rgb"], batch["nir"], batch["tir"], **kw)
    assert torch.equal(model.embed(batch["rgb"], batch["nir"], batch["tir"], presence=torch.ones(B, 3).bool(), **kw),
                       full)
    part = model.embed(batch["rgb"], batch["nir"], batch["tir"], presence=PARTIAL, **kw)
    assert part.shape == full.shape == (B, model.embedding_dim)
    torch.testing.assert_close(part.norm(dim=1), torch.ones(B))
    assert torch.equal(part[0], full[0])  # row 0 is complete; eval mode has no batch interaction
    assert not torch.equal(part[1], full[1])


# --------------------------------------------------------------------------------------------------------------
# absent modalities reach no output


def _with_junk(batch: dict, presence: torch.Tensor, junk: str) -> dict:
    out = dict(batch)
    g = torch.Generator().manual_seed(7)
    for m, key in enumerate(("rgb", "nir", "tir")):
        x = batch[key].clone()
        absent = ~presence[:, m]
        if junk == "zeros":
            x[absent] = 0.0
        elif junk == "noise":
            x[absent] = 10 * torch.randn(x[absent].shape, generator=g)
        else:
            x[absent] = float("nan")
        out[key] = x
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_absent_frame_does_not_influence_any_output(name: str, mode: str, batch: dict) -> None:
    model = _model(name).train(mode == "train")
    ref = _forward(model, _with_junk(batch, PARTIAL, "zeros"), presence=PARTIAL)
    for junk in ("noise", "nan"):
        _assert_equal(_forward(model, _with_junk(batch, PARTIAL, junk), presence=PARTIAL), ref)
    assert all(torch.isfinite(t).all() for t in _tensors(ref).values())


def _noise_rows(t: torch.Tensor, absent: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = t.clone()
    out[absent] = 5 * torch.randn(out[absent].shape, generator=g, dtype=t.dtype)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_absent_encoder_tokens_do_not_influence_any_output(name: str, batch: dict) -> None:
    """Noise in the encoder's output tokens of the absent modalities (not only in their frames) changes nothing:
    every later stage excludes them, it is not only the zeroed frame that hides them."""
    model = _model(name).train()
    ref = _forward(model, batch, presence=PARTIAL)
    encoders = list(model.visual) if isinstance(model.visual, torch.nn.ModuleList) else [model.visual]

    def hook(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        if len(encoders) == 1:  # one batch of 3B, modality-major
            absent = (~PARTIAL).t().reshape(-1)
        else:
            absent = ~PARTIAL[:, encoders.index(module)]
        return _noise_rows(out, absent, seed=3)

    handles = [e.register_forward_hook(hook) for e in encoders]
    try:
        noisy = _forward(model, batch, presence=PARTIAL)
    finally:
        for h in handles:
            h.remove()
    _assert_equal(noisy, ref)


@pytest.mark.parametrize("name", ["full", "mlp", "mhsa", "concat after STR",
                                  "separate backbones, unshared STR, 2 CHI layers"])
def test_absent_str_tokens_are_excluded_from_fusion(name: str, batch: dict) -> None:
    model = _model(name).train()
    ref = _forward(model, batch, presence=PARTIAL)
    tpm = model.str_module.tokens_per_modality(model.use_text)
    absent = (~PARTIAL).repeat_interleave(tpm, dim=1)
    handle = model.str_module.register_forward_hook(lambda m, i, out: _noise_rows(out, absent, seed=4))
    try:
        noisy = _forward(model, batch, presence=PARTIAL)
    finally:
        handle.remove()
    _assert_equal(noisy, ref)


def test_a_present_modality_does_influence_the_output(batch: dict) -> None:
    """The exclusion is not vacuous: changing a present frame changes the sample's outputs."""
    model = _model("full").eval()
    ref = _forward(model, batch, presence=PARTIAL)
    changed = dict(batch)
    changed["nir"] = batch["nir"].clone()
    changed["nir"][2] = torch.randn_like(changed["nir"][2])  # row 2 has NIR only
    out = _forward(model, changed, presence=PARTIAL)
    assert not torch.equal(out.embedding[2], ref.embedding[2])
    assert torch.equal(out.embedding[3], ref.embedding[3])  # another sample: eval mode, no batch interaction


# --------------------------------------------------------------------------------------------------------------
# the fill rule and the embedding's space


@pytest.mark.parametrize("name", ["full", "baseline"])
def test_absent_slots_are_the_mean_of_present_ones(name: str, batch: dict) -> None:
    model = _model(name).eval()
    out = _forward(model, batch, presence=PARTIAL)
    d = model.dim
    for key in [k for k in ("G", "U") if k in out.feats]:
        f = out.feats[key].view(B, 3, d)
        for s in range(B):
            present = [m for m in range(3) if PARTIAL[s, m]]
            mean = torch.stack([f[s, m] for m in present]).mean(dim=0)
            for m in range(3):
                if not PARTIAL[s, m]:
                    torch.testing.assert_close(f[s, m], mean, rtol=1e-6, atol=1e-6)
    assert out.embedding.shape == (B, model.embedding_dim)
    if name == "baseline":
        assert set(out.feats) == {"G"}


def test_present_slots_of_a_partial_sample_equal_a_complete_run(batch: dict) -> None:
    """G's present slots (the CLS tokens) do not depend on the absence of another modality: the encoder runs each
    frame on its own."""
    model = _model("full").eval()
    full = _forward(model, batch).feats["G"].view(B, 3, -1)
    part = _forward(model, batch, presence=PARTIAL).feats["G"].view(B, 3, -1)
    torch.testing.assert_close(part[PARTIAL], full[PARTIAL], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# malformed presence


def test_a_sample_without_any_modality_is_an_error(batch: dict) -> None:
    model = _model("full").eval()
    bad = PARTIAL.clone()
    bad[5] = False
    with pytest.raises(ValueError, match=r"sample\(s\) \[5\]"):
        _forward(model, batch, presence=bad)
    with pytest.raises(ValueError, match="bool"):
        _forward(model, batch, presence=PARTIAL.float())
    with pytest.raises(ValueError, match=r"expected \(8, 3\)"):
        _forward(model, batch, presence=PARTIAL[:, :2])


# --------------------------------------------------------------------------------------------------------------
# CHI with masked nodes against a naive loop


def _naive_chi_layer(conv: HypergraphConv, x: torch.Tensor, tau: float, keep: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Incidence and output of one hypergraph convolution over the present nodes, written as python loops."""
    b, v, d = x.shape
    w = conv.edge_weight.detach()
    xt = x @ conv.theta.weight.detach().t()
    inc = torch.zeros(b, v, v, dtype=x.dtype)
    out = x.clone()
    for s in range(b):
        nodes = [i for i in range(v) if keep[s, i]]
        edges = {}
        for j in nodes:
            members = []
            for i in nodes:
                cos = torch.dot(x[s, i], x[s, j]) / (x[s, i].norm() * x[s, j].norm())
                if i == j or cos >= tau:
                    members.append(i)
                    inc[s, i, j] = 1.0
            edges[j] = sum(xt[s, i] for i in members) / len(members)
        for i in nodes:
            mine = [j for j in nodes if inc[s, i, j] == 1]
            dv = sum(w[j] for j in mine)
            agg = sum(w[j] * edges[j] for j in mine) / dv
            out[s, i] = x[s, i] + F.gelu(agg + conv.bias.detach()[i])
    return inc, out


def _node_mask(b: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, v, generator=g) < 0.6
    keep[:, 0] = True  # every sample has a node
    keep[0] = True  # and one sample has all
    return keep


@pytest.mark.parametrize("tau", [-0.2, 0.1, 0.4])
def test_masked_incidence_and_convolution_match_a_naive_loop(tau: float) -> None:
    torch.manual_seed(0)
    b, v, d = 4, 9, 6
    conv = HypergraphConv(v, d).double()
    with torch.no_grad():
        conv.edge_weight.uniform_(0.5, 1.5)
        conv.bias.normal_()
    x = torch.randn(b, v, d, dtype=torch.float64)
    keep = _node_mask(b, v, seed=1)
    inc = hypergraph_incidence(x, tau, keep)
    want_inc, want_out = _naive_chi_layer(conv, x, tau, keep)
    assert torch.equal(inc, want_inc)
    assert torch.equal(inc[0], hypergraph_incidence(x, tau)[0])  # a complete sample: the unmasked hypergraph
    assert (inc.diagonal(dim1=1, dim2=2) == keep.double()).all()  # absent nodes leave even their own hyperedge
    torch.testing.assert_close(conv(x, inc, keep), want_out)
    # the convolution masks an unmasked incidence itself, so the degrees never count absent nodes
    torch.testing.assert_close(conv(x, hypergraph_incidence(x, tau), keep), want_out)


def test_chi_with_masked_nodes_ignores_them_over_layers() -> None:
    torch.manual_seed(0)
    b, v, d = 3, 8, 6
    chi = CHI(v, d, tau=0.0, num_layers=2).double()
    x = torch.randn(b, v, d, dtype=torch.float64)
    keep = _node_mask(b, v, seed=2)
    out = chi(x, keep)
    assert torch.equal(out[~keep], x[~keep])  # absent nodes pass through every layer unchanged
    junk = x.clone()
    junk[~keep] = 100 * torch.randn_like(junk[~keep])
    assert torch.equal(chi(junk, keep)[keep], out[keep])
    h = x
    for layer in chi.layers:  # the naive loop, layer after layer
        h = _naive_chi_layer(layer, h, 0.0, keep)[1]
    torch.testing.assert_close(out, h)
    assert torch.equal(chi(x, torch.ones(b, v, dtype=torch.bool)), chi(x))


# --------------------------------------------------------------------------------------------------------------
# fusions: absent tokens are not read and pass unchanged


@pytest.mark.parametrize("kind", ["mlp", "mhsa", "global"])
def test_fusions_ignore_absent_tokens(kind: str) -> None:
    torch.manual_seed(0)
    b, v, d = 4, 9, 16
    fusion = {"mlp": lambda: MLPFusion(v, d), "mhsa": lambda: MHSAFusion(d, 4),
              "global": lambda: GlobalFusion(d, 4)}[kind]().eval()
    keep = _node_mask(b, v, seed=3)
    h = torch.randn(b, v, d)
    junk = h.clone()
    junk[~keep] = 50 * torch.randn_like(junk[~keep])
    if kind == "global":
        g = torch.randn(b, 3, d)
        out, out_junk = fusion(g, h, keep), fusion(g, junk, keep)
        assert torch.equal(out, out_junk)
        # equals attending to the present tokens alone, sample by sample
        for s in range(b):
            torch.testing.assert_close(out[s:s + 1], fusion(g[s:s + 1], h[s:s + 1, keep[s]]), rtol=1e-5, atol=1e-6)
        assert torch.equal(fusion(g, h, None), fusion(g, h))
        return
    out, out_junk = fusion(h, keep), fusion(junk, keep)
    assert torch.equal(out[keep], out_junk[keep])
    assert torch.equal(out[~keep], h[~keep])
    assert not torch.equal(out[keep], h[keep])
    assert torch.equal(fusion(h, None), fusion(h))


# --------------------------------------------------------------------------------------------------------------
# DDP: every parameter still gets a gradient


@pytest.mark.parametrize("name", ["full", "baseline", "mlp", "mhsa", "CHI over CLS tokens",
                                  "separate backbones, unshared STR, 2 CHI layers"])
@pytest.mark.parametrize("pattern", ["partial rows", "no sample has TIR", "RGB only"])
def test_every_parameter_gets_a_gradient_with_absent_modalities(name: str, pattern: str, batch: dict) -> None:
    presence = PARTIAL.clone()
    if pattern == "no sample has TIR":  # a rank's whole batch without one modality
        presence[:, 2] = False
        presence[~presence.any(dim=1), 0] = True
    elif pattern == "RGB only":
        presence[:] = torch.tensor([True, False, False])
    model = _model(name).train()
    out = _forward(model, batch, presence=presence)
    total, _ = stmi_loss(out, batch["pids"], LossConfig())
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"{name}, {pattern}: parameters without a gradient: {missing}"
    assert not needs_find_unused_parameters(model.cfg)


# --------------------------------------------------------------------------------------------------------------
# the batch -> model arguments conversion


def test_model_inputs_passes_presence_through() -> None:
    b = {"rgb": torch.zeros(2, 3, 4, 4), "nir": torch.zeros(2, 3, 4, 4), "tir": torch.zeros(2, 3, 4, 4)}
    assert "presence" not in model_inputs(b, "cpu")[1]
    assert "presence" not in model_inputs({**b, "presence": None}, "cpu")[1]
    for given in (np.array([[1, 0, 1], [0, 1, 0]], dtype=bool), torch.tensor([[1, 0, 1], [0, 1, 0]])):
        kw = model_inputs({**b, "presence": given}, "cpu")[1]
        assert kw["presence"].dtype == torch.bool
        assert kw["presence"].tolist() == [[True, False, True], [False, True, False]]


def test_model_inputs_presence_reaches_the_model(batch: dict) -> None:
    model = _model("full").eval()
    loader_batch = {k: batch[k] for k in ("rgb", "nir", "tir", "mask", "camid")}
    loader_batch["presence"] = PARTIAL.numpy()
    imgs, kw = model_inputs(loader_batch, "cpu")
    want = model.embed(batch["rgb"], batch["nir"], batch["tir"], mask=batch["mask"], camid=batch["camid"],
                       presence=PARTIAL)
    assert torch.equal(model.embed(*imgs, **kw), want)


# --------------------------------------------------------------------------------------------------------------
# modality dropout: the distribution of draw_presence, its determinism, and its use in training

SUBSETS = [(1, 1, 1), (1, 1, 0), (1, 0, 1), (1, 0, 0), (0, 1, 1), (0, 1, 0), (0, 0, 1)]


def _subset_probs(rates: tuple[float, float, float], avail: tuple[int, int, int] = (1, 1, 1)) -> dict:
    """P(kept set) of independent drops conditioned on keeping one, by enumeration (the docstring's formula)."""
    w = {}
    for s in SUBSETS:
        if any(k and not a for k, a in zip(s, avail)):
            continue
        p = 1.0
        for m in range(3):
            if avail[m]:
                p *= (1 - rates[m]) if s[m] else rates[m]
        w[s] = p
    z = sum(w.values())
    return {s: p / z for s, p in w.items()}


def _counts(p: torch.Tensor) -> dict[tuple[int, int, int], int]:
    code = torch.bincount(4 * p[:, 0].long() + 2 * p[:, 1].long() + p[:, 2].long(), minlength=8)
    return {s: int(code[4 * s[0] + 2 * s[1] + s[2]]) for s in [(0, 0, 0), *SUBSETS]}


@pytest.mark.parametrize("rates", [(0.3, 0.3, 0.3), (0.2, 0.5, 0.8), (0.9, 0.9, 0.9), (0.0, 0.0, 1.0),
                                   (1.0, 1.0, 0.0), (0.5, 0.0, 0.25)])
def test_dropout_rates_are_within_a_binomial_bound(rates: tuple[float, float, float]) -> None:
    from stmi.data.batch import draw_presence

    # 20000 draws: 4.5 standard deviations are small enough to tell conditioning on a kept modality from keeping
    # one at random (at rates 0.9 a single kept modality has probability 0.299 against 0.324)
    n = 20000
    p = draw_presence(n, rates, generator=torch.Generator().manual_seed(11))
    assert p.shape == (n, 3) and p.dtype == torch.bool
    assert p.any(dim=1).all(), "a sample lost all three modalities"
    want = _subset_probs(rates)
    counts = _counts(p)
    for s in SUBSETS:  # every kept set, then every marginal, within 4.5 binomial standard deviations
        q = want.get(s, 0.0)
        seen = counts[s] / n
        assert abs(seen - q) <= 4.5 * math.sqrt(q * (1 - q) / n) + 1e-12, (s, seen, q)
    prod = rates[0] * rates[1] * rates[2]
    for m in range(3):
        q = (rates[m] - prod) / (1 - prod)
        seen = float((~p[:, m]).double().mean())
        assert abs(seen - q) <= 4.5 * math.sqrt(q * (1 - q) / n) + 1e-12, (m, seen, q)


def test_dropout_only_removes_available_modalities() -> None:
    from stmi.data.batch import draw_presence

    avail = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool).repeat(1000, 1)
    p = draw_presence(len(avail), (0.6, 0.6, 0.6), available=avail, generator=torch.Generator().manual_seed(2))
    assert not (p & ~avail).any() and p.any(dim=1).all()
    assert torch.equal(p[0::4], avail[0::4])  # one modality available: it is kept
    n = 1000
    for row, a in ((1, (0, 1, 1)), (3, (1, 1, 1))):
        counts = _counts(p[row::4])
        for s, q in _subset_probs((0.6, 0.6, 0.6), a).items():
            assert abs(counts[s] / n - q) <= 4.5 * math.sqrt(q * (1 - q) / n), (a, s)
    # every available modality at rate 1: nothing can be dropped, the sample keeps what it has
    assert torch.equal(draw_presence(4, (1.0, 1.0, 1.0), available=avail[:4]), avail[:4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        draw_presence(4, (0.5, 1.5, 0.0))
    with pytest.raises(ValueError, match="no modality"):
        draw_presence(1, (0.5, 0.5, 0.5), available=torch.zeros(1, 3, dtype=torch.bool))


def test_dropout_is_seeded_and_zero_rates_draw_nothing() -> None:
    from stmi.data.batch import draw_presence, drop_modalities

    a = draw_presence(500, (0.3, 0.4, 0.5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, draw_presence(500, (0.3, 0.4, 0.5), generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(a, draw_presence(500, (0.3, 0.4, 0.5), generator=torch.Generator().manual_seed(6)))
    assert draw_presence(500, (0.0, 0.0, 0.0), generator=torch.Generator().manual_seed(5)).all()
    batch = {"pid": np.arange(6), "rgb": torch.zeros(6, 3, 2, 2)}
    state = torch.get_rng_state()
    assert drop_modalities(batch, (0.0, 0.0, 0.0)) is batch and drop_modalities(batch, None) is batch
    assert torch.equal(torch.get_rng_state(), state)  # no draw: a run without dropout is unchanged
    torch.manual_seed(3)  # the global generator: what seed_everything seeds and the checkpoints save
    first = drop_modalities(batch, (0.5, 0.5, 0.5))["presence"]
    torch.manual_seed(3)
    assert torch.equal(drop_modalities(batch, (0.5, 0.5, 0.5))["presence"], first)
    assert "presence" not in batch  # the input batch is not modified
    given = {**batch, "presence": np.array([[True, False, False]] * 6)}
    assert torch.equal(drop_modalities(given, (0.9, 0.9, 0.9))["presence"], torch.tensor([[True, False, False]] * 6))


def _train(dropout: tuple[float, float, float] | None, seed: int = 0, steps: int = 2
           ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
    from stmi.config import OptimConfig
    from stmi.engine import build_optimizer, train_one_epoch

    torch.manual_seed(seed)
    model = build_model(tiny_cfg(p=0.1))
    seen: list[torch.Tensor | None] = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("presence")), with_kwargs=True)
    batches = []
    for i in range(steps):
        b = make_batch(seed=10 + i)
        batches.append({"rgb": b["rgb"], "nir": b["nir"], "tir": b["tir"], "mask": b["mask"], "camid": b["camid"],
                        "pid": b["pids"]})
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    train_one_epoch(model, batches, opt, None, LossConfig(), "cpu", 0, progress=False, modality_dropout=dropout)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, seen


def test_training_with_zero_dropout_is_bit_identical_and_dropout_reaches_the_model() -> None:
    base, seen = _train(None)
    assert seen == [None, None]
    zero, seen = _train((0.0, 0.0, 0.0))
    assert seen == [None, None] and all(torch.equal(zero[k], v) for k, v in base.items())
    drop, seen = _train((0.5, 0.5, 0.5))
    assert all(s is not None and s.shape == (B, 3) and s.any(dim=1).all() for s in seen)
    assert any(not s.all() for s in seen)
    assert any(not torch.equal(drop[k], v) for k, v in base.items())
    again, seen_again = _train((0.5, 0.5, 0.5))  # same seed: the same drops and the same weights
    assert all(torch.equal(a, b) for a, b in zip(seen, seen_again))
    assert all(torch.equal(again[k], v) for k, v in drop.items())


def test_dropout_config_is_validated_off_in_the_paper_recipe_and_searchable(tmp_path) -> None:
    from orchestration.search_space import load_search_space
    from stmi.config import ConfigError, STMIConfig, apply_overrides
    from stmi.recipes import recipe

    for ds in ("rgbnt201", "rgbnt100", "msvr310"):
        assert recipe("paper", ds).data.modality_dropout_rates() == (0.0, 0.0, 0.0)
    cfg = apply_overrides(STMIConfig(), {"data.modality_dropout": 0.25, "data.modality_dropout_scale": "1,0,2"})
    assert cfg.data.modality_dropout_rates() == (0.25, 0.0, 0.5)
    for bad in ({"data.modality_dropout": -0.1}, {"data.modality_dropout": 1.2},
                {"data.modality_dropout": 0.6, "data.modality_dropout_scale": "2,1,1"},
                {"data.modality_dropout_scale": "1,-1,1"}):
        with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
            apply_overrides(STMIConfig(), bad)
    with pytest.raises(ConfigError, match="all three"):
        apply_overrides(STMIConfig(), {"data.modality_dropout": 1.0})
    space = tmp_path / "dropout.yaml"
    space.write_text("kind: optuna\nparams:\n  data.modality_dropout: {type: float, low: 0.0, high: 0.5}\n"
                     "  data.modality_dropout_scale: {type: choice, values: [[1, 1, 1], [0, 0, 2]]}\n"
                     "start:\n  - {data.modality_dropout: 0.0, data.modality_dropout_scale: [1, 1, 1]}\n")
    ss = load_search_space(space)
    trial = apply_overrides(STMIConfig(), ss.trial_overrides({"data.modality_dropout": 0.3,
                                                              "data.modality_dropout_scale": (0.0, 0.0, 2.0)}))
    assert trial.data.modality_dropout_rates() == (0.0, 0.0, 0.6)
