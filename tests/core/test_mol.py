"""Mixture of Layers: layer weights, sparse top-k reads, contract checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from m2vla_core.heads import ContractError, HeadConfig, MoLConfig, PolicyHead
from m2vla_core.heads.factory import small_head_config


def _head(mix: str, **mol) -> PolicyHead:
    cfg = small_head_config("mol+mlp", layers=(1, 2, 3, 4))
    cfg = replace(cfg, arch=replace(cfg.arch, mol=replace(cfg.arch.mol, mix=mix, **mol)))
    torch.manual_seed(0)
    head = PolicyHead(cfg)
    head.normalizer.set_stats(np.zeros(8), np.ones(8), np.zeros(8), np.ones(8))
    return head


def _inputs(head: PolicyHead, batch: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_layers, tokens, width = head.config.contract.shape
    features = torch.randn(batch, n_layers, tokens, width, generator=gen) * torch.rand(batch, n_layers, 1, 1, generator=gen) * 3
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, -2:] = False
    return features, mask, torch.randn(batch, head.config.state_dim, generator=gen)


@pytest.mark.parametrize("mix,extra", [("last", {}), ("fixed", {"fixed_layer": 2}), ("uniform", {}), ("scalar", {}),
                                       ("router", {}), ("router", {"top_k": 2})])
def test_layer_weights_are_a_distribution_over_contract_layers(mix, extra):
    head = _head(mix, **extra)
    if mix == "scalar":
        with torch.no_grad():
            head.mol.mix_logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    w = head.layer_weights(*_inputs(head))
    assert w.shape == (5, 4)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    if mix == "last":
        assert torch.all(w[:, -1] == 1)
    if mix == "fixed":
        assert torch.all(w[:, 1] == 1)  # hidden-state index 2 is the second contract layer
    if extra.get("top_k"):
        assert torch.all((w > 0).sum(-1) == 2)


def test_router_weights_depend_on_the_input():
    head = _head("router")
    w = head.layer_weights(*_inputs(head))
    assert not torch.allclose(w[0], w[1])


def test_top_k_router_reads_only_the_selected_layers():
    head = _head("router", top_k=2, router_layer=1)
    features, mask, state = _inputs(head)
    w = head.layer_weights(features, mask, state)
    features.requires_grad_(True)
    out = head(features, mask, state)
    out.square().sum().backward()
    grad_per_layer = features.grad.abs().sum(dim=(2, 3))  # (B, L)
    for b in range(features.shape[0]):
        for pos in range(4):
            if pos == 0:  # the router layer: read by the router, whatever the weights
                continue
            assert (grad_per_layer[b, pos] > 0) == bool(w[b, pos] > 0), (b, pos)
    # Changing an unselected (non-router) layer must not change the output at all.
    with torch.no_grad():
        unselected = [(b, pos) for b in range(5) for pos in range(1, 4) if w[b, pos] == 0]
        assert unselected
        poked = features.detach().clone()
        for b, pos in unselected:
            poked[b, pos] = 1e3 * torch.randn_like(poked[b, pos])
        torch.testing.assert_close(head(poked, mask, state), out.detach(), rtol=0, atol=0)


def test_last_mode_ignores_other_layers():
    head = _head("last")
    features, mask, state = _inputs(head)
    with torch.no_grad():
        before = head(features, mask, state)
        features[:, :-1] = torch.randn_like(features[:, :-1])
        torch.testing.assert_close(head(features, mask, state), before, rtol=0, atol=0)


def test_masked_tokens_do_not_change_the_output():
    head = _head("router")
    features, mask, state = _inputs(head)
    with torch.no_grad():
        before = head(features, mask, state)
        features[:, :, -2:] = 1e3 * torch.randn_like(features[:, :, -2:])
        torch.testing.assert_close(head(features, mask, state), before)


@pytest.mark.parametrize("shape,needle", [((2, 3, 8, 32), "n_layers"), ((2, 4, 9, 32), "T"), ((2, 4, 8, 16), "D")])
def test_contract_violation_raises_a_clear_error(shape, needle):
    head = _head("router")
    with pytest.raises(ContractError, match="head expects") as info:
        head(torch.randn(*shape), torch.ones(2, 8, dtype=torch.bool), torch.randn(2, 8))
    assert needle in str(info.value) and str(tuple(shape)) in str(info.value)


def test_wrong_state_or_mask_shape_is_refused():
    head = _head("uniform")
    features, mask, state = _inputs(head, batch=2)
    with pytest.raises(ContractError, match="state"):
        head(features, mask, state[:, :5])
    with pytest.raises(ContractError, match="mask"):
        head(features, mask.float(), state)


def test_config_refuses_a_fixed_layer_outside_the_contract():
    cfg = small_head_config("middle+mlp", layers=(1, 2, 3))
    with pytest.raises(ValueError, match="fixed_layer=5"):
        replace(cfg, arch=replace(cfg.arch, mol=replace(cfg.arch.mol, fixed_layer=5)))
    with pytest.raises(ValueError, match="top_k"):
        MoLConfig(mix="uniform", top_k=2)
    assert isinstance(cfg, HeadConfig)


def test_grid_token_positions_code_where_an_image_token_is_and_leave_text_tokens_alone():
    from m2vla_core.heads.layers import image_grid_embedding

    codes = image_grid_embedding(64, 32)  # an 8 x 8 grid
    similarity = codes @ codes.T  # (64, 64)
    assert (codes.std(0) > 0.1).all()  # every code dimension varies over the grid (none aliased to a constant)
    row = similarity[27]  # token (3, 3)
    assert row.argmax() == 27  # every token is most like itself ...
    assert row[28] > row[31] and row[35] > row[59]  # ... and more like a neighbour than a far token, on both axes
    head = _head("router", token_pos_init="grid")
    image_tokens = head.config.contract.num_image_tokens
    np.testing.assert_allclose(head.mol.token_pos[:image_tokens].detach(),
                               image_grid_embedding(image_tokens, head.config.arch.d_model))
    assert head.mol.token_pos[image_tokens:].abs().max() < 0.2  # text tokens keep the small random start
    assert _head("router").mol.token_pos.abs().max() < 0.2  # "random" stays the default
    with pytest.raises(ValueError, match="token_pos_init"):
        MoLConfig(token_pos_init="sinusoid")


def test_keypoints_find_a_token_by_its_features_as_the_instruction_asks_and_join_the_latent():
    from m2vla_core.heads.layers import image_token_xy
    from m2vla_core.heads.mol.modeling_mol import SpatialKeypoints

    torch.manual_seed(0)
    d, n = 8, 16  # a 4 x 4 grid
    keypoints = SpatialKeypoints(d, num_keypoints=1, hidden=16, num_image_tokens=n)
    red, blue = torch.eye(d)[0], torch.eye(d)[1]
    # A scorer that fires where a token's feature AND the instruction's are on (per dimension).
    with torch.no_grad():
        first, _, last = keypoints.score
        first.weight.zero_(), last.bias.zero_()
        first.weight[:d, :d] = torch.eye(d) * 20
        first.weight[:d, d:] = torch.eye(d) * 20
        first.bias.fill_(-30.0)
        last.weight.fill_(0.0)
        last.weight[0, :d] = 1.0
    tokens = torch.zeros(2, n + 2, d)
    tokens[:, 5], tokens[:, 10] = red, blue  # red at cell 5, blue at cell 10
    tokens[0, n:], tokens[1, n:] = red, blue  # instruction tokens: "red" / "blue"
    mask = torch.ones(2, n + 2, dtype=torch.bool)
    found = keypoints.positions(tokens, mask)  # (2, 1, 2)
    cells = image_token_xy(n)
    torch.testing.assert_close(found[0, 0], cells[5], atol=0.02, rtol=0)
    torch.testing.assert_close(found[1, 0], cells[10], atol=0.02, rtol=0)
    mask[0, 5] = False  # a masked token is never found
    assert (keypoints.positions(tokens, mask)[0, 0] - cells[5]).abs().max() > 0.1

    head = _head("router", num_keypoints=2)
    features, mask, state = _inputs(head)
    latent, _ = head.mol(features, mask, head.normalizer.normalize_state(state))
    assert latent.shape[1] == head.config.arch.mol.num_queries + 2
    assert head(features, mask, state).shape == (5, 16, 8)
    with pytest.raises(ValueError, match="num_keypoints"):
        MoLConfig(num_keypoints=-1)


@pytest.mark.parametrize("mix,extra", [("fixed", {"fixed_layer": 2}), ("uniform", {}), ("router", {}),
                                       ("router", {"top_k": 2})])
def test_standardized_features_see_past_a_component_every_token_shares(mix, extra):
    head = _head(mix, feature_norm="standardize", **extra)
    features, mask, state = _inputs(head)
    shared = 50.0 * torch.randn(head.config.contract.shape[0], 1, head.config.contract.shape[2])  # (L, 1, D)

    def stats(x):  # per layer and dimension, over samples and valid tokens
        tokens = x.permute(1, 3, 0, 2)[:, :, mask]  # (L, D, valid tokens)
        return tokens.mean(-1), tokens.std(-1, unbiased=False)

    head.mol.set_feature_stats(*stats(features))
    plain = head(features, mask, state)
    head.mol.set_feature_stats(*stats(features + shared))
    torch.testing.assert_close(head(features + shared, mask, state), plain, atol=1e-4, rtol=1e-4)
    rms = _head(mix, **extra)  # scales each token by its own size: the shared part swamps the rest
    assert (rms(features + shared, mask, state) - rms(features, mask, state)).abs().max() > 1e-2


def test_feature_stats_are_refused_when_malformed_or_not_used():
    head = _head("router", feature_norm="standardize")
    shape = head.mol.feature_mean.shape
    with pytest.raises(ValueError, match="std > 0"):
        head.mol.set_feature_stats(torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match="shaped"):
        head.mol.set_feature_stats(torch.zeros(3), torch.ones(3))
    with pytest.raises(RuntimeError, match="standardize"):
        _head("router").mol.set_feature_stats(torch.zeros(shape), torch.ones(shape))
    with pytest.raises(ValueError, match="feature_norm"):
        MoLConfig(feature_norm="layer")
