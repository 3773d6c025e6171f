"""The vis2ir step: shapes at the sizes of the vis2ir design, the injection modes, the loss."""

import pytest
import torch
from torch import nn

from minflux.model import Flux
from minflux.presets import configs
from minflux.sampling import flow_matching_loss
from minflux.semantic import SEMANTIC_MODES, Vis2IR
from minflux.tasks.vis2ir import encode_triptych, right_half_ids


class PoolAE(nn.Module):
    """A stand-in with the VAE's interface and shapes ([B, 3, H, W] -> [B, 16, H/8, W/8]), cheap at 512 px."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 1)

    def encode(self, x, sample=False):
        return self.proj(nn.functional.avg_pool2d(x, 8))


def test_encode_triptych_gives_the_designs_shapes():
    triptych = torch.randn(4, 3, 512, 1536)  # the vis2ir design: [B, 3, 512, 1536] = [visible | infrared | semantic]
    with torch.no_grad():
        out = encode_triptych(PoolAE(), triptych, "xattn_rope")
    assert out.x0.shape == (4, 2048, 64)
    assert out.x_cond.shape == (4, 2048, 320)
    assert out.semantic["semantic"].shape == (4, 1024, 64)  # a 512×512 panel: 32 × 32 tokens, not the design's 2048
    assert out.img_ids.shape == out.semantic["semantic_ids"].shape[:1] + (2048, 3)
    assert out.target_tokens.sum().item() == 4 * 1024  # the right half of each 32 × 64 token grid
    # the Fill condition's mask channels are 1 exactly on the target half
    assert torch.equal(out.x_cond[..., 64:].mean(-1) == 1.0, out.target_tokens)


def test_semantic_tokens_carry_the_ids_of_the_target_half():
    ids = right_half_ids(1, 2, 3)  # a 2 × 3 semantic grid beside a 2 × 6 diptych grid
    assert ids[0].tolist() == [[0, 0, 3], [0, 0, 4], [0, 0, 5], [0, 1, 3], [0, 1, 4], [0, 1, 5]]


def small_fill(seed=0):
    torch.manual_seed(seed)
    return Flux(configs["flux-small-fill"].params)


def batch(b=2, h=4, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    from minflux.sampling import prepare_img_ids

    ids = prepare_img_ids(b, h, w)
    return {
        "x0": torch.randn(b, h * w, 64, generator=g),
        "x_cond": torch.randn(b, h * w, 320, generator=g),
        "img_ids": ids,
        "target_tokens": ids[..., 2] >= w // 2,
        "semantic": torch.randn(b, h * w // 2, 64, generator=g),
        "semantic_ids": right_half_ids(b, h, w // 2),
    }


@pytest.mark.parametrize("mode", [m for m in SEMANTIC_MODES if m != "reference"])  # reference: Kontext only
def test_every_injection_mode_is_the_identity_at_initialisation(mode):
    model = Vis2IR(small_fill(), mode)
    b = batch()
    x_t, x_cond = model.inject(b["x0"], b["x_cond"], b["semantic"], b["semantic_ids"], b["img_ids"])
    assert torch.equal(x_t, b["x0"]) and torch.equal(x_cond, b["x_cond"])


@pytest.mark.parametrize("mode", ["xattn", "xattn_rope", "blocks", "adapters"])
def test_a_non_zero_scale_init_sets_every_gate_and_the_injection_acts_from_the_start(mode):
    model = Vis2IR(small_fill(), mode, scale_init=0.1)
    gates = model.gates()
    assert len(gates) >= 1 and model.scales == pytest.approx([0.1] * len(gates))
    assert all(g.requires_grad for g in gates)
    if mode.startswith("xattn"):  # the injection on x_t: no longer the identity
        b = batch()
        x_t, _ = model.inject(b["x0"], b["x_cond"], b["semantic"], b["semantic_ids"], b["img_ids"])
        assert not torch.allclose(x_t, b["x0"], atol=1e-4)
    assert Vis2IR(small_fill(), mode).scales == [0.0] * len(gates)


def test_zeroconv_adds_the_semantic_map_to_the_target_half_only():
    model = Vis2IR(small_fill(), "zeroconv")
    nn.init.normal_(model.zero_conv.weight)
    b = batch()
    _, x_cond = model.inject(b["x0"], b["x_cond"], b["semantic"], b["semantic_ids"], b["img_ids"])
    changed = (x_cond != b["x_cond"]).any(-1)
    assert torch.equal(changed, b["target_tokens"])


def test_loss_is_the_velocity_error_over_the_chosen_tokens():
    from minflux.sampling import interpolate, prepare_txt_ids

    model = Vis2IR(small_fill(), "none")
    b = batch()
    txt, txt_ids, y = torch.randn(2, 5, 64), prepare_txt_ids(2, 5), torch.randn(2, 64)
    t, noise = torch.tensor([0.3, 0.8]), torch.randn(2, 32, 64)
    with torch.no_grad():
        v = model(torch.cat((interpolate(b["x0"], noise, t), b["x_cond"]), -1), b["img_ids"], txt, txt_ids, t, y)
        err = (v - (noise - b["x0"])).pow(2).mean(-1)  # [2, 32]
        inputs = dict(img_ids=b["img_ids"], txt=txt, txt_ids=txt_ids, y=y, img_cond=b["x_cond"])
        target = flow_matching_loss(model, b["x0"], noise, t, loss_mask=b["target_tokens"], **inputs)
        whole = flow_matching_loss(model, b["x0"], noise, t, **inputs)
    assert torch.allclose(target, err[b["target_tokens"]].mean())
    assert torch.allclose(whole, err.mean())
    assert not torch.allclose(target, whole)


def test_vis2ir_needs_a_fill_transformer():
    with pytest.raises(ValueError, match="Fill transformer"):
        Vis2IR(Flux(configs["flux-small"].params), "none")
    with pytest.raises(ValueError, match="semantic mode"):
        Vis2IR(small_fill(), "telepathy")


def test_block_injection_is_the_identity_until_its_gates_open():
    from minflux.sampling import prepare_txt_ids

    flux = small_fill()
    model = Vis2IR(flux, "blocks", heads=8)
    b = batch()
    args = (
        torch.cat((b["x0"], b["x_cond"]), -1),
        b["img_ids"],
        torch.randn(2, 5, 64),
        prepare_txt_ids(2, 5),
        torch.tensor([0.3, 0.8]),
        torch.randn(2, 64),
    )
    with torch.no_grad():
        plain = flux(*args)
        assert torch.equal(model(*args, semantic=b["semantic"], semantic_ids=b["semantic_ids"]), plain)
        for attn in [*model.blocks.double_attn, *model.blocks.single_attn]:
            attn.scale.fill_(0.5)
        gated = model(*args, semantic=b["semantic"], semantic_ids=b["semantic_ids"])
        assert not torch.allclose(gated, plain, atol=1e-4)
        assert torch.equal(flux(*args), plain)  # outside Vis2IR the hooks pass the blocks' outputs through
    assert (
        len(model.blocks.double_attn) == flux.params.depth
        and len(model.blocks.single_attn) == flux.params.depth_single_blocks
    )


@pytest.mark.parametrize("mode", ["none", "reference", "xattn", "xattn_rope", "blocks", "adapters"])
def test_kontext_in_context_wrapper_is_the_plain_transformer_at_initialisation(mode):
    """With the visible panel in the sequence (Kontext), every semantic mode leaves the model as it was until it
    trains; the Fill-only modes and a Fill transformer are refused with what was expected."""
    from minflux.sampling import prepare_txt_ids

    torch.manual_seed(0)
    flux = Flux(configs["flux-small"].params)
    model = Vis2IR(flux, mode, in_context="kontext")
    b = batch()
    ids = torch.cat((b["img_ids"][:, :16], prepare_img_ids_axis(b["img_ids"][:, :16], 1.0)), dim=1)  # [x_t | ref]
    semantic_ids = b["img_ids"][:, :16]
    args = (b["x0"], ids, torch.randn(2, 5, 64), prepare_txt_ids(2, 5), torch.tensor([0.3, 0.8]), torch.randn(2, 64))
    with torch.no_grad():
        assert torch.equal(model(*args, semantic=b["semantic"], semantic_ids=semantic_ids), flux(*args))
    with pytest.raises(ValueError, match="Kontext in-context"):
        Vis2IR(flux, "zeroconv", in_context="kontext")
    with pytest.raises(ValueError, match="is for Kontext"):
        Vis2IR(small_fill(), "reference")


def prepare_img_ids_axis(ids, axis0):
    out = ids.clone()
    out[..., 0] = axis0
    return out


def test_adapters_leave_the_fill_transformer_bit_for_bit_until_their_gates_open_then_train():
    """Plan C: before any step the wrapped model is the plain Fill transformer, bit for bit; the gates get a gradient
    at once, and one optimiser step opens them and changes the output."""
    from minflux.sampling import prepare_txt_ids

    flux = small_fill()
    model = Vis2IR(flux, "adapters", layers=2, heads=4, width=32, every=2)
    n_blocks = flux.params.depth + flux.params.depth_single_blocks
    assert len(model.blocks.adapters) == n_blocks // 2 and len(model.scales) == n_blocks // 2
    b = batch()
    args = (
        torch.cat((b["x0"], b["x_cond"]), -1),
        b["img_ids"],
        torch.randn(2, 5, 64),
        prepare_txt_ids(2, 5),
        torch.tensor([0.3, 0.8]),
        torch.randn(2, 64),
    )
    kw = dict(semantic=b["semantic"], semantic_ids=b["semantic_ids"])
    with torch.no_grad():
        plain = flux(*args)
    assert torch.equal(model(*args, **kw).detach(), plain)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("flux.")], lr=0.1)
    model(*args, **kw).pow(2).mean().backward()
    assert all(a.gate.grad.abs().item() > 0 for a in model.blocks.adapters)
    opt.step()
    with torch.no_grad():
        assert all(s != 0.0 for s in model.scales)
        assert not torch.allclose(model(*args, **kw), plain, atol=1e-5)
        assert torch.equal(flux(*args), plain)  # outside Vis2IR the hooks pass the blocks' outputs through


def test_adapter_attention_is_the_softmax_formula_with_rope_written_out():
    """multihead (the attention of SemanticCrossAttention and of the adapters) against softmax(Q Kᵀ / √d) V by hand,
    RoPE written with cos and sin: channel pairs (2j, 2j+1) of each head turned by row · θ^(-2j'/(d/2)) on the first
    half of the head and by col on the second."""
    from minflux.semantic import multihead

    g = torch.Generator().manual_seed(0)
    B, H, D, Lq, Lk = 2, 4, 8, 6, 5
    q, k, v = (torch.randn(B, L, H * D, generator=g, dtype=torch.float64).float() for L in (Lq, Lk, Lk))
    q_ids = torch.randint(0, 9, (B, Lq, 3), generator=g).float()
    k_ids = torch.randint(0, 9, (B, Lk, 3), generator=g).float()

    def turn(x, ids):  # x [B, L, H, D], ids [B, L, 3]
        out = x.clone().double()
        half = D // 2
        for axis, start in ((1, 0), (2, half)):  # rows on the first half of the head, columns on the second
            for j in range(half // 2):
                angle = ids[..., axis].double() * 10_000 ** (-2 * j / half)  # [B, L]
                a, b = x[..., start + 2 * j].double(), x[..., start + 2 * j + 1].double()
                c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
                out[..., start + 2 * j], out[..., start + 2 * j + 1] = a * c - b * s, a * s + b * c
        return out

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], H, D)

    qh, kh, vh = turn(heads(q), q_ids), turn(heads(k), k_ids), heads(v).double()
    scores = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / D**0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vh).reshape(B, Lq, H * D)
    got = multihead(q, k, v, H, (q_ids, k_ids))
    assert (got.double() - expected).abs().max().item() < 1e-5
    plain = torch.einsum(
        "bhqk,bkhd->bqhd",
        (torch.einsum("bqhd,bkhd->bhqk", heads(q).double(), heads(k).double()) / D**0.5).softmax(-1),
        vh,
    ).reshape(B, Lq, H * D)
    assert (multihead(q, k, v, H).double() - plain).abs().max().item() < 1e-5
    assert (got.double() - plain).abs().max().item() > 1e-2  # the positions matter


def test_plan_c_parameter_counts_by_formula_at_the_small_and_the_full_width():
    """An adapter at width W on a transformer of hidden size C: down C·W + W, up W·C + C, the gate, and per layer
    four LayerNorms, the self- and cross-attention projections and the feed-forward (minflux/tasks/VIS2IR.md quotes
    these)."""
    W = 64
    layer = (
        (2 * W) * 4
        + (W * 3 * W + 3 * W)
        + 3 * (W * W + W)
        + (W * 2 * W + 2 * W)
        + (W * 4 * W + 4 * W)
        + (4 * W * W + W)
    )
    assert layer == 66_880  # four LayerNorms, self qkv, self out / cross q / cross out, cross kv, the feed-forward
    for preset, per_adapter, total in (("flux-small-fill", 99_969, 603_974), ("flux-dev-fill", 463_233, 26_408_441)):
        with torch.device("meta"):
            flux = Flux(configs[preset].params)
            model = Vis2IR(flux, "adapters", layers=1, heads=8, width=W)
        C, blocks = flux.params.hidden_size, flux.params.depth + flux.params.depth_single_blocks
        assert per_adapter == (C * W + W) + (W * C + C) + layer + 1
        assert sum(p.numel() for p in model.blocks.adapters[0].parameters()) == per_adapter
        assert (
            sum(p.numel() for p in model.injection_state_dict().values()) == total == blocks * per_adapter + 64 * W + W
        )


def test_the_vae_bound_is_the_infrared_panel_of_the_reconstruction_encoded_as_the_task_encodes_it():
    from minflux.tasks.vis2ir import reconstruct_infrared

    class Halves(nn.Module):  # a stand-in VAE that keeps the image and marks what it was given
        def encode(self, x, sample=False):
            return x

        def decode(self, z):
            return z + z.shape[-1] / 1000  # the width it was given, written into every pixel

    triptych = torch.randn(2, 3, 8, 24)
    fill = reconstruct_infrared(Halves(), triptych, "none")
    kontext = reconstruct_infrared(Halves(), triptych, "none", in_context="kontext")
    assert torch.allclose(fill, triptych[..., 8:16] + 0.016) and torch.allclose(kontext, triptych[..., 8:16] + 0.008)


def test_the_diptych_layout_gives_a_semantic_token_per_x_t_token_and_zeroconv_adds_it_in_place():
    triptych = torch.randn(2, 3, 64, 192)
    ae = PoolAE()
    with torch.no_grad():
        panel = encode_triptych(ae, triptych, "zeroconv")
        both = encode_triptych(ae, triptych, "zeroconv", layout="diptych")
    assert panel.semantic["semantic"].shape == (2, 16, 64) and both.semantic["semantic"].shape == (2, 32, 64)
    assert torch.equal(both.semantic["semantic_ids"], both.img_ids)  # aligned one to one with x_t
    left, right = both.semantic["semantic"].view(2, 4, 2, 4, 64).unbind(2)  # the map's two copies, side by side
    assert torch.equal(left, right) and torch.allclose(right.reshape(2, 16, 64), panel.semantic["semantic"], atol=1e-6)
    model = Vis2IR(small_fill(), "zeroconv")
    nn.init.normal_(model.zero_conv.weight)
    _, x_cond = model.inject(
        both.x0, both.x_cond, both.semantic["semantic"], both.semantic["semantic_ids"], both.img_ids
    )
    expected = both.x_cond + both.semantic["semantic"] @ model.zero_conv.weight.T + model.zero_conv.bias
    assert torch.allclose(x_cond, expected, atol=1e-5) and (x_cond != both.x_cond).any(-1).all()


def test_the_embedded_vae_learns_on_the_mixes_of_panels_the_tasks_encode():
    """Two steps in three a diptych [visible | infrared] of one scene, one in three single panels of every kind."""
    from minflux.tasks.embedded import vae_batch
    from minflux.tasks.scenes import split_triptych

    triptychs = torch.randn(5, 3, 8, 24)
    visible, infrared, semantic = split_triptych(triptychs)
    g = torch.Generator().manual_seed(0)
    batches = [vae_batch(triptychs, step, 3, g) for step in range(1, 31)]
    dips, singles = batches[0::3] + batches[2::3], batches[1::3]
    assert all(d.shape == (3, 3, 8, 16) for d in dips) and all(s.shape == (6, 3, 8, 8) for s in singles)
    assert all(any(torch.equal(torch.cat((visible[i], infrared[i]), -1), d) for i in range(5)) for b in dips for d in b)
    kinds = [
        [any(torch.equal(p, x) for x in panels) for panels in (visible, infrared, semantic)] for b in singles for p in b
    ]
    assert all(sum(k) >= 1 for k in kinds)  # every single panel is one of the scenes' panels
    assert all(any(k[j] for k in kinds) for j in range(3))  # and every kind comes up
