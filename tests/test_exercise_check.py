"""The course's harness, `python -m minflux.study.exercises check FILE.py` (minflux/study/check.py): a student's
correct layer passes, and each deliberately wrong one fails with the difference named.

The students' files below are written from EXERCISES.md's description, not copied from minflux; each wrong one is
the correct one with one line changed (`mistake`).
"""

import textwrap

import pytest
import torch

from minflux import attention, sampling
from minflux.semantic import SemanticCrossAttention
from minflux.study import check, exercises

CROSS_ATTENTION = """
import torch
from torch import nn

from minflux.attention import embed_ids, rotate


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm_image = nn.LayerNorm(dim)
        self.norm_semantic = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, image_feat, semantic_feat, positions=None):
        b, n, c = image_feat.shape
        h, d = self.num_heads, c // self.num_heads
        x, s = self.norm_image(image_feat), self.norm_semantic(semantic_feat)
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)
        k = self.to_k(s).view(b, -1, h, d).transpose(1, 2)
        v = self.to_v(s).view(b, -1, h, d).transpose(1, 2)
        if positions is not None:
            q = rotate(q, embed_ids(positions[0], [0, d // 2, d // 2], 10_000))
            k = rotate(k, embed_ids(positions[1], [0, d // 2, d // 2], 10_000))
        weights = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, n, c)
        return image_feat + self.scale * self.to_out(out)
"""

FLOW_MATCHING_LOSS = """
def flow_matching_loss(model, x0, noise, t):
    s = t[:, None, None]
    x_t = (1 - s) * x0 + s * noise
    return ((model(x_t, t) - (noise - x0)) ** 2).mean()
"""

ROPE = """
import torch


def rope(pos, dim, theta):
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    return pos.double()[..., None] / theta ** (i / dim)


def apply_rope(xq, xk, freqs):
    cos, sin = freqs.cos().float(), freqs.sin().float()

    def turn(x):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2)

    return turn(xq), turn(xk)
"""

ROPE_OFFICIAL = """
import torch
from einops import rearrange


def rope(pos, dim, theta):
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def apply_rope(xq, xk, freqs_cis):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)
"""

DOUBLE_BLOCK = """
import torch
from torch import nn

from minflux.attention import attention
from minflux.model import Modulation, SelfAttention, feed_forward


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        mlp = int(hidden_size * mlp_ratio)
        self.img_mod, self.txt_mod = Modulation(hidden_size, True), Modulation(hidden_size, True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp, self.txt_mlp = feed_forward(hidden_size, mlp), feed_forward(hidden_size, mlp)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)

    def forward(self, img, txt, vec, pe):
        (i1, i2), (t1, t2) = self.img_mod(vec), self.txt_mod(vec)
        iq, ik, iv = self.img_attn.split_heads((1 + i1.scale) * self.norm(img) + i1.shift)
        tq, tk, tv = self.txt_attn.split_heads((1 + t1.scale) * self.norm(txt) + t1.shift)
        a = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        ta, ia = a[:, : txt.shape[1]], a[:, txt.shape[1] :]
        img = img + i1.gate * self.img_attn.proj(ia)
        img = img + i2.gate * self.img_mlp((1 + i2.scale) * self.norm(img) + i2.shift)
        txt = txt + t1.gate * self.txt_attn.proj(ta)
        txt = txt + t2.gate * self.txt_mlp((1 + t2.scale) * self.norm(txt) + t2.shift)
        return img, txt
"""


def mistake(source: str, old: str, new: str) -> str:
    """The correct file with one line changed."""
    assert source.count(old) == 1, old
    return source.replace(old, new)


@pytest.fixture
def run(tmp_path, capsys):
    """run(source, *flags) → (exit status, what the harness printed), the source written as the student's file."""

    def run(source: str, *flags: str) -> tuple[int, str]:
        path = tmp_path / "mine.py"
        path.write_text(textwrap.dedent(source))
        code = check.main([str(path), *flags])
        return code, capsys.readouterr().out

    return run


def test_the_mistakes_by_hand_are_minflux_without_a_mistake():
    """The hints are only as good as the references written out beside them: with no mistake, each is minflux's."""
    torch.manual_seed(0)
    layer = SemanticCrossAttention(64, 8)
    check.off_init(layer, torch.Generator().manual_seed(1))
    image, sem = torch.randn(2, 48, 64), torch.randn(2, 24, 64)
    assert layer.scale.item() == 0.5
    torch.testing.assert_close(check.cross_attention_by_hand(layer, image, sem), layer(image, sem))
    pos = torch.randint(0, 64, (2, 10)).float()
    torch.testing.assert_close(check.rope_by_hand(pos, 16, 10_000), attention.rope(pos, 16, 10_000))
    angles, x = attention.rope(pos, 16, 10_000)[:, None], torch.randn(2, 4, 10, 16)
    pe = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # [2, 1, 10, 8], as embed_ids
    torch.testing.assert_close(check.rotate_by_hand(x, angles), attention.rotate(x, pe))
    net, x0, noise, t = check.TinyVelocity(8), torch.randn(4, 16, 8), torch.randn(4, 16, 8), torch.rand(4)
    model = lambda img, timesteps, **_: net(img, timesteps)  # noqa: E731
    want = sampling.flow_matching_loss(model, x0, noise, t, img_ids=None, txt=None, txt_ids=None, y=None)
    torch.testing.assert_close(check.flow_loss_by_hand(net, x0, noise, t), want)


def test_correct_cross_attention_passes(run):
    code, out = run(CROSS_ATTENTION)
    assert code == 0, out
    assert "starts as the identity" in out and "values with positions" in out and "all 6 checks pass" in out


def test_softmax_over_the_wrong_axis_passes_at_scale_zero_but_not_here(run, tmp_path):
    """The issue's trap: at the scale's initial 0 a wrong attention equals minflux's output; at 0.5 it does not."""
    wrong = mistake(CROSS_ATTENTION, "d**0.5, dim=-1)", "d**0.5, dim=-2)")
    code, out = run(wrong)
    assert code == 1
    assert "FAIL  values (scale 0.5)" in out and "the softmax over the queries (dim=-2)" in out
    namespace = {}
    exec(textwrap.dedent(wrong), namespace)
    torch.manual_seed(0)
    mine, ref = namespace["CrossAttention"](64, 8), SemanticCrossAttention(64, 8)
    mine.load_state_dict(ref.state_dict())
    image, sem = torch.randn(2, 48, 64), torch.randn(2, 24, 64)
    torch.testing.assert_close(mine(image, sem), ref(image, sem))  # the naive comparison, passed


def test_missing_sqrt_d_is_named(run):
    code, out = run(mistake(CROSS_ATTENTION, "/ d**0.5, dim=-1", ", dim=-1"))
    assert code == 1 and "no 1/√d on the scores" in out


def test_identity_layer_does_not_pass(run):
    code, out = run(mistake(CROSS_ATTENTION, "return image_feat + self.scale * self.to_out(out)", "return image_feat"))
    assert code == 1
    assert "FAIL  the output does not move with the semantic input" in out
    assert "FAIL  values (scale 0.5)" in out and "no attention at all: the output is image_feat" in out


def test_scale_left_at_zero_does_not_pass(run):
    """A scale that is no parameter stays 0 whatever the harness copies: named as missing, and the output is flat."""
    code, out = run(mistake(CROSS_ATTENTION, "nn.Parameter(torch.zeros(1))", "torch.zeros(1)"))
    assert code == 1
    assert "missing: scale [1]" in out and "does not move with the semantic input" in out


def test_wrong_output_shape_is_named(run):
    """The heads never merged back (and no projection, no residual): [B, H, L, D] instead of [B, L, dim]."""
    code, out = run(mistake(CROSS_ATTENTION, "return image_feat + self.scale * self.to_out(out)", "return weights @ v"))
    assert code == 1 and "FAIL  output shape: yours is [2, 8, 48, 8], minflux's [2, 48, 64]" in out


def test_other_parameter_names_are_listed(run):
    code, out = run(CROSS_ATTENTION.replace("to_q", "q_proj"))
    assert code == 1
    assert "missing: to_q.weight [64, 64], to_q.bias [64]" in out and "not in minflux's: q_proj.weight" in out
    assert "expected: scale [1], norm_image.weight [64]," in out and "values: not compared" in out


def test_minflux_own_layer_does_not_count(run):
    code, out = run("from minflux.semantic import SemanticCrossAttention as CrossAttention\n")
    assert code == 1 and "is minflux's own" in out


def test_a_file_without_the_name_or_that_cannot_load_exits_2(run, tmp_path):
    code, out = run("x = 1\n")
    assert code == 2 and "mine.py defines none of CrossAttention, rope" in out
    code, out = run(FLOW_MATCHING_LOSS, "--what", "cross-attention")
    assert code == 2 and "mine.py has no CrossAttention" in out
    code, out = run("def rope(:\n")
    assert code == 2 and "importing it raised SyntaxError" in out
    assert check.main([str(tmp_path / "absent.py")]) == 2


def test_flow_matching_loss_passes_and_a_flipped_target_is_named(run):
    code, out = run(FLOW_MATCHING_LOSS)
    assert code == 0 and "all 2 checks pass" in out, out
    code, out = run(mistake(FLOW_MATCHING_LOSS, "(noise - x0)", "(x0 - noise)"))
    assert code == 1 and "the target x₀ − ε (the sign flipped)" in out
    code, out = run(mistake(FLOW_MATCHING_LOSS, "** 2).mean()", "** 2).mean().item()"))
    assert code == 1 and "gradient: none reaches the model" in out


def test_rope_passes_in_minflux_layout_and_the_official_one(run):
    for source in (ROPE, ROPE_OFFICIAL):
        code, out = run(source)
        assert code == 0 and "all 2 checks pass" in out, out


def test_rope_wrong_pairing_and_frequencies_are_named(run):
    half = mistake(ROPE, "x[..., 0::2], x[..., 1::2]", "x.chunk(2, dim=-1)")
    half = mistake(half, "x0 * sin + x1 * cos], -1).flatten(-2)", "x0 * sin + x1 * cos], -1)")
    code, out = run(mistake(half, "torch.stack([x0", "torch.cat([x0"))
    assert code == 1 and "pairs (i, i + D/2) (rotate-half" in out and "ok    rope(" in out
    code, out = run(mistake(ROPE, "torch.arange(0, dim, 2,", "torch.arange(0, dim // 2,"))
    assert code == 1 and "theta^(−i/dim), not theta^(−2i/dim)" in out


def test_double_block_passes_and_a_wrong_img_mlp_modulation_is_named(run):
    """(1 + scale) · x + shift written scale · x + shift before the image MLP: the img output differs, the txt
    output (which the image reaches only through the attention before it) does not."""
    code, out = run(DOUBLE_BLOCK)
    assert code == 0 and "all 4 checks pass" in out, out
    code, out = run(mistake(DOUBLE_BLOCK, "self.img_mlp((1 + i2.scale) *", "self.img_mlp(i2.scale *"))
    assert code == 1 and "FAIL  img output" in out and "ok    txt output" in out


def test_the_exercises_command_runs_the_check(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent(CROSS_ATTENTION))
    assert exercises.main(["check", str(path), "--what", "cross-attention"]) == 0
    assert "your CrossAttention against minflux.semantic.SemanticCrossAttention" in capsys.readouterr().out
