"""Meta Skill Module (retrieval memory + smooth decode) and smooth-basis skills."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from m2vla_core.heads import PolicyHead
from m2vla_core.heads.factory import small_head_config
from m2vla_core.heads.msm.modeling_msm import SkillMemory, subsample_indices
from m2vla_core.heads.skills.basis import bspline_basis, dct_basis, make_basis, second_difference_bound, smoothness_bound


def _head(preset: str = "mol+msm", *, action_space: str = "joint", action_dim: int = 8, memory: int = 64,
          seed: int = 0, **msm) -> PolicyHead:
    cfg = small_head_config(preset, action_space=action_space, action_dim=action_dim)
    cfg = replace(cfg, arch=replace(cfg.arch, msm=replace(cfg.arch.msm, **msm)))
    torch.manual_seed(seed)
    head = PolicyHead(cfg)
    a, s = cfg.action_dim, cfg.state_dim
    head.normalizer.set_stats(np.zeros(s), np.ones(s), np.linspace(-1, 1, a), np.linspace(0.5, 2, a))
    if head.uses_memory:
        gen = torch.Generator().manual_seed(seed + 1)
        # Rough (non-smooth) stored chunks: the decoder must still emit smooth chunks.
        head.action_head.memory.set(torch.randn(memory, cfg.contract.width + s, generator=gen),
                                    torch.randn(memory, cfg.chunk_len, a, generator=gen),
                                    torch.arange(memory))
    return head


def _inputs(head: PolicyHead, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n_layers, tokens, width = head.config.contract.shape
    return (torch.randn(batch, n_layers, tokens, width, generator=gen), torch.ones(batch, tokens, dtype=torch.bool),
            torch.randn(batch, head.config.state_dim, generator=gen) * 3)


def _second_difference_ratio(chunk: torch.Tensor) -> torch.Tensor:
    """||diff2|| / ||x - mean|| per (sample, action dim) of chunk (B, H, A)."""
    d2 = chunk[:, 2:] - 2 * chunk[:, 1:-1] + chunk[:, :-2]  # (B, H - 2, A)
    centred = chunk - chunk.mean(dim=1, keepdim=True)
    return d2.norm(dim=1) / centred.norm(dim=1).clamp_min(1e-9)


@pytest.mark.parametrize("preset,basis", [("mol+msm", "dct"), ("last+msm", "dct"), ("mol+msm", "bspline"),
                                          ("mol+skills", "dct")])
def test_decoded_chunks_are_smooth_for_random_inputs(preset, basis):
    head = _head(preset, basis=basis)
    with torch.no_grad():
        for p in head.parameters():  # random, large weights: smoothness must not depend on training
            p.add_(torch.randn_like(p))
        chunk = head(*_inputs(head))
    cfg = head.config.arch.msm if preset.endswith("msm") else head.config.arch.skills
    bound = smoothness_bound(make_basis(cfg.basis, head.config.chunk_len, cfg.num_basis))
    assert bound < 0.9
    assert torch.isfinite(chunk).all()
    assert _second_difference_ratio(chunk).max() <= bound + 1e-4


def test_unsmooth_baseline_breaks_the_bound():
    """The bound is meaningful: a direct MLP head (and white noise) exceed it."""
    head = _head("mol+mlp")
    with torch.no_grad():
        chunk = head(*_inputs(head))
    bound = smoothness_bound(dct_basis(16, 6))
    assert _second_difference_ratio(chunk).mean() > bound
    assert _second_difference_ratio(torch.randn(64, 16, 8)).mean() > 2 * bound


def test_smoothness_bound_matches_the_dct_analysis_and_rules_out_jitter():
    assert smoothness_bound(dct_basis(16, 6)) <= second_difference_bound(16, 6) + 1e-9
    assert smoothness_bound(np.eye(16)) > 3.5  # an unconstrained chunk can alternate sign every step
    np.testing.assert_allclose(bspline_basis(16, 6).sum(1), 1.0, atol=1e-12)  # partition of unity


@pytest.mark.parametrize("preset", ["mol+msm", "mol+skills", "mol+mlp"])
@pytest.mark.parametrize("space,dim", [("joint", 8), ("joint", 7), ("eef", 7)])
def test_chunk_shape_matches_the_action_space(preset, space, dim):
    head = _head(preset, action_space=space, action_dim=dim)
    with torch.no_grad():
        assert head(*_inputs(head, batch=3)).shape == (3, 16, dim)


def test_eef_action_space_needs_seven_dims():
    with pytest.raises(ValueError, match="action_dim must be 7"):
        small_head_config(action_space="eef", action_dim=8)


def test_retrieval_returns_the_true_l1_nearest_entries():
    gen = torch.Generator().manual_seed(3)
    mem = SkillMemory(capacity=100, key_dim=10, chunk_len=4, action_dim=2)
    keys = torch.randn(100, 10, generator=gen)
    values = torch.randn(100, 4, 2, generator=gen)
    mem.set(keys, values, torch.arange(100) // 10)
    query = torch.randn(7, 10, generator=gen)
    got_values, got_dist, got_idx = mem.query(query, 4)
    l1 = np.abs(query.numpy()[:, None, :] - keys.numpy()[None]).sum(-1)  # (7, 100), brute force
    want_idx = np.argsort(l1, axis=1)[:, :4]
    np.testing.assert_array_equal(got_idx.numpy(), want_idx)
    np.testing.assert_allclose(got_dist.numpy(), np.take_along_axis(l1, want_idx, 1), rtol=1e-5)
    torch.testing.assert_close(got_values, values[got_idx])
    # L2 would rank differently for at least one query, so this really is L1.
    l2 = ((query.numpy()[:, None, :] - keys.numpy()[None]) ** 2).sum(-1)
    assert (np.argsort(l2, axis=1)[:, :4] != want_idx).any()


def test_retrieval_can_exclude_the_query_episode():
    mem = SkillMemory(capacity=8, key_dim=2, chunk_len=2, action_dim=1)
    keys = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [6.0, 6.0], [7.0, 7.0]])
    mem.set(keys, torch.zeros(5, 2, 1), torch.tensor([0, 0, 1, 2, 3]))
    _, _, idx = mem.query(torch.zeros(1, 2), 2, exclude_episode=torch.tensor([0]))
    assert set(idx[0].tolist()) == {2, 3}


def test_memory_is_bounded_by_an_even_subsample():
    episodes = np.repeat(np.arange(10), 50)  # 500 samples
    picked = subsample_indices(episodes, 100)
    assert len(picked) == 100 and len(np.unique(picked)) == 100
    counts = np.bincount(episodes[picked], minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11  # every episode kept proportionally
    assert len(subsample_indices(episodes[:30], 100)) == 30


def test_memory_refuses_more_than_its_capacity():
    mem = SkillMemory(capacity=4, key_dim=2, chunk_len=2, action_dim=1)
    with pytest.raises(ValueError, match="capacity"):
        mem.set(torch.zeros(5, 2), torch.zeros(5, 2, 1), torch.zeros(5))


@pytest.mark.parametrize("preset", ["mol+msm", "mol+skills"])
def test_module_fits_varied_target_trajectories(preset):
    """A short CPU run drives the loss on a small set of varied smooth targets down a lot."""
    head = _head(preset, memory=16, seed=1)
    gen = torch.Generator().manual_seed(5)
    n = 16
    features, mask, state = _inputs(head, batch=n, seed=2)
    basis = make_basis("dct", 16, 6)
    targets = basis @ torch.randn(n, 6, 8, generator=gen) * 1.5  # (N, H, A) varied smooth trajectories
    if head.uses_memory:  # memory of the same trajectories, each in its own episode (excluded when training)
        state_n = head.normalizer.normalize_state(state)
        head.action_head.memory.set(head.retrieval_key(features, mask, state_n), targets, torch.arange(n))
    episodes = torch.arange(n)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        pred = head.forward_normalized(features, mask, state, exclude_episode=episodes if head.uses_memory else None)
        loss = torch.nn.functional.mse_loss(pred, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_make_basis_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_basis"):
        make_basis("dct", 8, 9)
    with pytest.raises(ValueError, match="kind"):
        make_basis("fourier", 8, 4)
