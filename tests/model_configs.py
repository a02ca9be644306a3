"""Model configs the tests plan for without their weights."""

from __future__ import annotations

from nextstep_runtime import ModelConfig
from nextstep_runtime.weights.released import NEXTSTEP_14B_CONFIG

NEXTSTEP_14B = ModelConfig.from_dict(NEXTSTEP_14B_CONFIG)  # the released config.json values (SPEC.md)
