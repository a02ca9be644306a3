"""Times the official 2025 NextStep pipeline (github stepfun-ai/NextStep-1, `nextstep/models/pipeline_nextstep.py`)
in its own environment, driven by bench_generate.py --compare-official: loads the model once, then generates one
image per line read from stdin and answers each with a JSON line {"seconds": ...}.

    OFFICIAL_PYTHON official_runner.py CHECKOUT MODEL_FOLDER SETTINGS_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    checkout, folder, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    sys.path.insert(0, str(checkout))
    import torch
    from nextstep.models.pipeline_nextstep import NextStepPipeline

    torch.set_num_threads(settings["threads"])
    pipe = NextStepPipeline(model_name_or_path=str(folder), vae_name_or_path=str(folder / "vae")).to("cpu", torch.float32)
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for _ in sys.stdin:
        torch.manual_seed(0)  # its own set_seed() cannot run on a CPU-only torch (reads torch.version.cuda)
        start = time.perf_counter()
        pipe.generate_image(settings["caption"], num_images_per_caption=settings["batch"],
                            negative_prompt=settings["negative"], hw=(settings["height"], settings["width"]),
                            cfg=settings["cfg"], cfg_schedule="constant", timesteps_shift=1.0,
                            num_sampling_steps=settings["steps"], seed=None, progress=False)
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
