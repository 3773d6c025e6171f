"""The SemanticCrossAttention adapter of the vis2ir design: identity at init, shapes, parameters, positions."""

import torch

from minflux.attention import AttentionMaps
from minflux.sampling import prepare_img_ids
from minflux.semantic import SemanticConditioningAdapter, SemanticCrossAttention


def trained_like(module, seed=0):
    """Non-zero scales, as after some training, so the attention output is visible."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale"):
                p.fill_(0.7)
    return module


def test_adapter_is_the_identity_at_initialisation():
    adapter = SemanticConditioningAdapter(dim=64, num_layers=2, num_heads=8)
    x, sem = torch.randn(2, 2048, 64), torch.randn(2, 1024, 64)
    assert torch.equal(adapter(x, sem), x)
    assert adapter.scales == [0.0, 0.0]


def test_adapter_maps_2048_queries_over_1024_semantic_keys_to_the_query_shape():
    adapter = trained_like(SemanticConditioningAdapter(dim=64, num_heads=8))
    x, sem = torch.randn(4, 2048, 64), torch.randn(4, 1024, 64)  # the vis2ir design's x_t; a 512×512 panel's tokens
    out = adapter(x, sem)
    assert out.shape == (4, 2048, 64)
    assert not torch.allclose(out, x)


def test_parameter_count_is_16897_per_layer_not_the_designs_arithmetic():
    assert sum(p.numel() for p in SemanticCrossAttention(64, 8).parameters()) == 16_897
    assert sum(p.numel() for p in SemanticConditioningAdapter(64, num_layers=3).parameters()) == 3 * 16_897


def test_gradients_reach_the_zero_scale_and_through_it_the_projections():
    adapter = SemanticConditioningAdapter()
    x, sem = torch.randn(1, 16, 64), torch.randn(1, 8, 64)
    adapter(x, sem).square().sum().backward()
    layer = adapter.layers[0]
    assert layer.scale.grad.abs().item() > 0  # the scale learns first, from 0 ...
    assert layer.to_q.weight.grad.abs().sum() == 0  # ... while the projections get gradient only once it is non-zero


def test_without_positions_a_query_cannot_tell_where_a_semantic_token_lies():
    """The flaw of the vis2ir design: shuffling the semantic tokens changes nothing."""
    layer = trained_like(SemanticCrossAttention())
    x, sem = torch.randn(1, 64, 64), torch.randn(1, 64, 64)
    perm = torch.randperm(64)
    assert torch.allclose(layer(x, sem), layer(x, sem[:, perm]), atol=1e-5)


def test_with_positions_moving_semantic_tokens_changes_the_output_and_ids_move_with_them():
    layer = trained_like(SemanticCrossAttention())
    x, sem = torch.randn(1, 64, 64), torch.randn(1, 64, 64)
    ids = prepare_img_ids(1, 8, 8)
    perm = torch.randperm(64)
    base = layer(x, sem, positions=(ids, ids))
    assert not torch.allclose(base, layer(x, sem[:, perm], positions=(ids, ids)), atol=1e-4)
    # a token and its id moved together are the same token at the same place: no change
    assert torch.allclose(base, layer(x, sem[:, perm], positions=(ids, ids[:, perm])), atol=1e-5)


def test_semantic_attention_maps_can_be_recorded():
    layer = trained_like(SemanticCrossAttention())
    with AttentionMaps(reduce=lambda p: p.mean(1)) as maps:
        layer(torch.randn(1, 32, 64), torch.randn(1, 16, 64))
    assert maps.probs[0].shape == (1, 32, 16)
    assert torch.allclose(maps.probs[0].sum(-1), torch.ones(1, 32))
