"""The perception engine serves the head's input size: the backbone switches to it, never guesses."""

from __future__ import annotations

import numpy as np
import pytest

from m2vla_core.features import FeatureContract
from m2vla_core.perception import PerceptionConfig, PerceptionEngine

FRAME = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def _contract(engine: PerceptionEngine, image_size: int, image_tokens: int = 4) -> FeatureContract:
    return FeatureContract(layers=(1, 2), num_image_tokens=image_tokens, num_text_tokens=4,
                           width=engine.backbone.hidden_size, image_size=image_size)


@pytest.fixture()
def engine() -> PerceptionEngine:
    engine = PerceptionEngine(PerceptionConfig())
    engine.load()
    return engine


def test_a_contract_with_another_input_size_switches_the_backbone_once_and_back(engine):
    default = engine.backbone.image_size
    sized = _contract(engine, 112)
    assert engine.serve(sized) is True and engine.backbone.image_size == 112
    assert engine.serve(sized) is False  # already there: no second switch
    bundle, _ = engine.extract(FRAME, "touch the red cube", sized)
    assert bundle.contract.image_size == 112
    assert engine.serve(_contract(engine, 0)) is True and engine.backbone.image_size == default
    assert engine.serve(_contract(engine, default)) is False  # naming the default size is the default


def test_features_cached_at_one_input_size_are_not_served_at_another(engine):
    engine.serve(_contract(engine, 112))
    at_112, _ = engine.extract(FRAME, "touch the red cube", _contract(engine, 112))
    engine.serve(_contract(engine, 0))
    at_default, compute_ms = engine.extract(FRAME, "touch the red cube", _contract(engine, 0))
    assert compute_ms > 0.0  # computed, not a cache hit
    assert not np.allclose(at_112.hidden.numpy(), at_default.hidden.numpy())


def test_an_input_size_the_backbone_cannot_take_is_refused_once_not_retried_for_every_frame(engine, monkeypatch):
    from m2vla_core.backbone import FrozenBackbone

    bad = _contract(engine, 100)  # not a multiple of the 28 px merged patch
    with pytest.raises(ValueError, match="cannot take 100 px frames"):
        engine.serve(bad)
    tries = []
    monkeypatch.setattr(FrozenBackbone, "at_image_size", lambda self, n: tries.append(n))
    with pytest.raises(ValueError, match="cannot take 100 px frames"):
        engine.serve(bad)
    assert tries == [] and engine.backbone.image_size == 224
