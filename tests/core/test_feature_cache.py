"""Feature caches: byte-bounded LRU in memory, safetensors shards on disk that refuse garbage."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import pickle

import numpy as np
import pytest
import torch

from m2vla_core.backbone.cache import (
    CorruptCacheError,
    DiskFeatureCache,
    FeatureCache,
    bundle_nbytes,
    feature_key,
    precompute_features,
)
from m2vla_core.features import FeatureBundle, FeatureContract

CONTRACT = FeatureContract(layers=(1, 3), num_image_tokens=4, num_text_tokens=3, width=8)


def _bundle(seed: int, contract: FeatureContract = CONTRACT) -> FeatureBundle:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(contract.shape, generator=g).to(getattr(torch, contract.dtype))  # (nL, T, D)
    mask = torch.tensor([True] * (contract.num_image_tokens + 2) + [False] * (contract.num_text_tokens - 2))
    return FeatureBundle(hidden=hidden, mask=mask, contract=contract, backbone_id="tiny", instruction=f"task {seed}",
                         image_digest=f"img{seed}")


def _key(seed: int) -> str:
    return feature_key(f"img{seed}", f"task {seed}", "digest", CONTRACT)


def test_memory_hit_returns_identical_tensors_and_counts():
    cache = FeatureCache(max_bytes=1 << 20)
    bundle = _bundle(0)
    assert cache.get(_key(0)) is None
    cache.put(_key(0), bundle)
    hit = cache.get(_key(0))
    assert hit is bundle and torch.equal(hit.hidden, bundle.hidden)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


def test_byte_bound_evicts_least_recently_used():
    size = bundle_nbytes(_bundle(0))
    cache = FeatureCache(max_bytes=2 * size)
    cache.put(_key(0), _bundle(0))
    cache.put(_key(1), _bundle(1))
    cache.get(_key(0))  # 0 is now the most recent
    cache.put(_key(2), _bundle(2))
    assert _key(1) not in cache and _key(0) in cache and _key(2) in cache
    assert cache.nbytes <= 2 * size and cache.evictions == 1


def test_bundle_larger_than_the_bound_is_not_stored():
    cache = FeatureCache(max_bytes=10)
    assert cache.put(_key(0), _bundle(0)) is False and len(cache) == 0


def test_negative_bound_is_refused():
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureCache(max_bytes=-1)


def test_key_changes_with_every_component():
    base = feature_key("img", "pick", "bb", CONTRACT)
    other_contract = FeatureContract(layers=(1, 3), num_image_tokens=4, num_text_tokens=3, width=8, dtype="float16")
    variants = [feature_key("img2", "pick", "bb", CONTRACT), feature_key("img", "push", "bb", CONTRACT),
                feature_key("img", "pick", "bb2", CONTRACT), feature_key("img", "pick", "bb", other_contract)]
    assert len({base, *variants}) == 5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_disk_cache_round_trips_through_a_fresh_instance(tmp_path, dtype):
    contract = FeatureContract(layers=(0, 2), num_image_tokens=4, num_text_tokens=3, width=8, dtype=dtype)
    bundles = {feature_key(f"i{s}", "t", "d", contract): _bundle(s, contract) for s in range(3)}
    DiskFeatureCache(tmp_path).put_many(list(bundles.items()))
    reopened = DiskFeatureCache(tmp_path)
    assert len(reopened) == 3
    for key, bundle in bundles.items():
        got = reopened.get(key)
        assert got is not None and got.contract == contract
        assert torch.equal(got.hidden, bundle.hidden) and got.hidden.dtype == bundle.hidden.dtype
        assert torch.equal(got.mask, bundle.mask) and got.mask.dtype == torch.bool
        assert (got.instruction, got.image_digest, got.backbone_id) == (bundle.instruction, bundle.image_digest, "tiny")
    assert reopened.get("unknown") is None
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def _one_shard(tmp_path):
    DiskFeatureCache(tmp_path).put_many([(_key(0), _bundle(0)), (_key(1), _bundle(1))])
    (shard,) = tmp_path.glob("shard-*.safetensors")
    return shard


@pytest.mark.parametrize("damage", ["garbage", "truncate", "pickle", "missing"])
def test_damaged_shard_reads_as_a_miss_and_is_dropped(tmp_path, damage):
    shard = _one_shard(tmp_path)
    if damage == "garbage":
        shard.write_bytes(os.urandom(shard.stat().st_size))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "pickle":
        shard.write_bytes(pickle.dumps({"hidden": [1, 2, 3]}))
    else:
        shard.unlink()
    cache = DiskFeatureCache(tmp_path)
    assert cache.get(_key(0)) is None
    assert cache.stats()["corrupt"] == 1 and _key(1) not in cache  # the whole shard is dropped, to recompute
    assert _key(0) not in DiskFeatureCache(tmp_path)  # the index on disk forgot it too


def test_strict_disk_cache_raises_a_clear_error_on_a_damaged_shard(tmp_path):
    shard = _one_shard(tmp_path)
    shard.write_bytes(b"\x00" * 64)
    cache = DiskFeatureCache(tmp_path, strict=True)
    assert cache.verify() == [shard.name]
    with pytest.raises(CorruptCacheError, match=shard.name):
        cache.get(_key(0))


def test_garbage_index_starts_empty_or_raises_when_strict(tmp_path):
    _one_shard(tmp_path)
    (tmp_path / "index.json").write_text("{not json", encoding="utf-8")
    assert len(DiskFeatureCache(tmp_path)) == 0
    with pytest.raises(CorruptCacheError, match="index"):
        DiskFeatureCache(tmp_path, strict=True)
    (tmp_path / "index.json").write_text(json.dumps({"version": 99}), encoding="utf-8")
    with pytest.raises(CorruptCacheError, match="version"):
        DiskFeatureCache(tmp_path, strict=True)


def test_precompute_writes_each_observation_once_and_matches_direct_extraction(tmp_path):
    from m2vla_core.backbone import FrozenBackbone, default_backbone_path

    bb = FrozenBackbone.from_pretrained(default_backbone_path())
    contract = bb.contract([1, 2], num_image_tokens=4, num_text_tokens=6)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(3)]
    items = [(frames[0], "pick the red cube"), (frames[1], "pick the red cube"), (frames[2], "push the tray"),
             (frames[0], "pick the red cube")]  # the last one repeats the first
    disk = DiskFeatureCache(tmp_path)
    assert precompute_features(bb, items, contract, disk, batch_size=2, shard_rows=2) == {"computed": 3, "cached": 1}
    assert precompute_features(bb, items, contract, disk) == {"computed": 0, "cached": 4}
    from m2vla_core.backbone.adapter import image_digest

    direct = bb.extract(frames[2], "push the tray", contract)
    got = DiskFeatureCache(tmp_path).get(feature_key(image_digest(frames[2]), "push the tray", bb.feature_identity, contract))
    assert got is not None
    torch.testing.assert_close(got.hidden, direct.hidden, atol=2e-5, rtol=1e-4)
