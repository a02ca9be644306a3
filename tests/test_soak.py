"""Twenty generations in one process, through the Python API and through the node classes: host memory stays
flat and a repeated seed gives the same pixels every time (nothing leaks from one run into the next).

Bound: RSS may grow by at most RSS_GROWTH_BOUND_MB over the 20 runs, measured after two warm-up runs. Measured
growth on the tiny model (16x16 and 32x32, 1-2 steps, float32, CPU, a shared 2-core machine): 0.0-1.1 MB for
the API, 0.0-0.1 MB for the nodes. The bound leaves room for allocator noise; a run that kept its model
inputs, cache or cached frames alive would exceed it well within the 20 runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nodes_pack import MODEL_NAME, install_fixture_models, load_pack

from nextstep_runtime import GenerationSettings

RUNS = 20
RSS_GROWTH_BOUND_MB = 8.0
NODES = load_pack().NODE_CLASS_MAPPINGS


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


def soak(run) -> tuple[float, list[torch.Tensor]]:
    """Two warm-up runs, then RUNS runs; returns (RSS growth in MB over the RUNS runs, their images)."""
    run()
    run()
    start = rss_mb()
    images = [run() for _ in range(RUNS)]
    return rss_mb() - start, images


def test_twenty_api_generations_keep_memory_flat_and_repeat_bit_for_bit(tiny_pipeline) -> None:
    settings = GenerationSettings(width=16, height=16, steps=1, seed=11)
    growth, images = soak(lambda: tiny_pipeline.generate("a red fox", settings).images)
    assert growth < RSS_GROWTH_BOUND_MB, f"RSS grew {growth:.1f} MB over {RUNS} runs"
    assert all(torch.equal(images[0], image) for image in images[1:])


@pytest.fixture(scope="module")
def node_graph(tmp_path_factory):
    install_fixture_models(tmp_path_factory.mktemp("models"))
    model = NODES["NextStepModelLoader"]().load(MODEL_NAME, "float32", "sdpa")[0]
    vae = NODES["NextStepVAELoader"]().load(f"{MODEL_NAME}/vae")[0]
    return model, vae


def test_twenty_node_graph_runs_keep_memory_flat_and_repeat_bit_for_bit(node_graph) -> None:
    model, vae = node_graph

    def run() -> torch.Tensor:  # the graph as ComfyUI runs it: every node again (a new prompt each time)
        positive = NODES["NextStepTextEncode"]().encode(model, "a red fox")[0]
        negative = NODES["NextStepTextEncode"]().encode(model, "blurry")[0]
        latent = NODES["NextStepSampler"]().sample(model, positive, width=16, height=16, batch_size=1, seed=11,
                                                   steps=1, cfg=7.5, cfg_img=1.0, cfg_schedule="constant",
                                                   timesteps_shift=1.0, sampler="sde", profile="official",
                                                   use_norm=False, negative=negative)[0]
        return NODES["NextStepVAEDecode"]().decode(vae, latent)[0]

    growth, images = soak(run)
    assert growth < RSS_GROWTH_BOUND_MB, f"RSS grew {growth:.1f} MB over {RUNS} runs"
    assert all(torch.equal(images[0], image) for image in images[1:])
