"""The models a ComfyUI user can pick before they are on disk, by the folder names the templates use, and the Hub
repos they are fetched from (into models/nextstep/<name>/)."""

from __future__ import annotations

RELEASED_MODELS = {
    "NextStep-1.1": "stepfun-ai/NextStep-1.1",
    "NextStep-1-Large": "stepfun-ai/NextStep-1-Large",
    "NextStep-1-Large-Edit": "stepfun-ai/NextStep-1-Large-Edit",
    "NextStep-1.1-W4A16-AutoRound": "INCModel/NextStep-1.1-W4A16-AutoRound",
}
"""Folder name -> Hugging Face repo id: StepFun's releases, and the community 4-bit NextStep-1.1 (docs/community-4bit.md)."""
