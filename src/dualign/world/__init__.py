"""The built-in synthetic safety world: templated benign and harmful requests, five response
behaviours with known gold helpfulness and harm, a gold judge that reads them back from text,
π_ref (a tiny GPT-2, helpful but unsafe) and learned reward / cost models (MiniLM + BT heads).

``build_world(world_config("small"))`` returns the (cached) world directory; see docs/formats.md.
"""

from dualign.world.build import build_world, default_world_dir, is_complete, load_world_info
from dualign.world.config import PRESETS, WorldConfig, config_hash, world_config
from dualign.world.judge import gold_harm, gold_helpfulness, judge

__all__ = ["PRESETS", "WorldConfig", "build_world", "config_hash", "default_world_dir", "gold_harm",
           "gold_helpfulness", "is_complete", "judge", "load_world_info", "world_config"]
