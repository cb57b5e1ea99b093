"""Skill packs (MergeVLA-style): heads trained per task family, combined behind a task router.

``train_pack`` -> a pack directory; ``combine_packs`` -> a pack set (``packs.json``) that
``PackedPolicy.load`` (and so ``PolicyEngine.load``) runs with the ``HeadPolicy`` interface.
"""

from m2vla_core.packs.configuration_packs import PackInfo, PackRef, PackSetConfig, RouterConfig, RouterTrainConfig
from m2vla_core.packs.pack import (filter_feature_dataset, load_pack_info, load_router_examples, router_examples,
                                   train_pack, write_pack_files)
from m2vla_core.packs.packed_policy import (CombineReport, PackedPolicy, combine_packs, load_pack_set_config,
                                            with_min_confidence)
from m2vla_core.packs.router import TaskRouter, load_router, pool_features, save_router, train_router

__all__ = ["PackInfo", "PackRef", "PackSetConfig", "RouterConfig", "RouterTrainConfig", "filter_feature_dataset",
           "load_pack_info", "load_router_examples", "router_examples", "train_pack", "write_pack_files",
           "CombineReport", "PackedPolicy", "combine_packs", "load_pack_set_config", "with_min_confidence",
           "TaskRouter", "load_router", "pool_features", "save_router", "train_router"]
