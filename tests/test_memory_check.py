"""The memory check before every run: a job that cannot fit is refused before any work, saying what it needs,
what is free and what to change. The free memory comes from the host's accounting (ComfyUI passes its own; the
runtime reads the device), here a fixed budget so the verdict does not depend on this machine."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nextstep_runtime import (
    GenerationSettings,
    Job,
    NextStepError,
    NextStepPipeline,
    Placement,
    VAEPlacement,
    free_memory,
)
from nextstep_runtime.memory.check import check_job_memory

BUDGET = 4 * 10**9
SAMPLING_BUDGET = 8 * 10**8
"""For the sampler alone (no VAE in the pipeline, as in the nodes): below what a 960x960 batch of 64 needs on
the tiny model (about 1.0 GB), above what one image needs (0.7 GB, mostly the planner's fixed allowance)."""


@pytest.fixture(scope="module")
def budget_pipeline(tiny_pipeline) -> NextStepPipeline:
    """The tiny model and VAE, as a host that has 4 GB free for a run would see them."""
    pipe = tiny_pipeline
    return NextStepPipeline(pipe.model, pipe.tokenizer, pipe.normalization, pipe.vae, free_memory=lambda device: BUDGET)


def test_a_job_that_cannot_fit_is_refused_before_any_work(tiny_pipeline) -> None:
    pipe = tiny_pipeline
    sampler_only = NextStepPipeline(pipe.model, pipe.tokenizer, pipe.normalization, None,
                                    free_memory=lambda device: SAMPLING_BUDGET)
    calls = []
    settings = GenerationSettings(width=960, height=960, batch=64, steps=200)
    with pytest.raises(NextStepError) as caught:
        sampler_only.sample("a fox", settings, callback=lambda *args: calls.append(args))
    message = str(caught.value)
    assert message.startswith("this run needs about ")
    assert " GB on cpu besides the model's weights, most for sampling (KV cache " in message
    assert "but only 0.8 GB is free; use a batch of at most " in message
    assert not calls  # not a single token was sampled
    largest = int(message.split("use a batch of at most ")[1].split(",")[0])
    assert 1 <= largest < settings.batch
    config, placement = pipe.model.config, pipe.model.placement
    fitting = Job(replace(settings, batch=largest), prompt_tokens=8)
    check_job_memory(config, placement, fitting, lambda device: SAMPLING_BUDGET)
    with pytest.raises(NextStepError):
        check_job_memory(config, placement, Job(replace(settings, batch=largest + 1), prompt_tokens=8),
                         lambda device: SAMPLING_BUDGET)


def test_when_no_batch_fits_the_advice_is_a_smaller_image(budget_pipeline, tiny_pipeline) -> None:
    # with the VAE in the pipeline, decoding 992x992 is the largest phase
    with pytest.raises(NextStepError, match="most for VAE decoding .* but only 4.0 GB is free; make the image smaller"):
        budget_pipeline.sample("a fox", GenerationSettings(width=992, height=992, batch=1, steps=200))
    pipe = tiny_pipeline
    sampler_only = NextStepPipeline(pipe.model, pipe.tokenizer, pipe.normalization, None,
                                    free_memory=lambda device: 10**8)
    with pytest.raises(NextStepError, match="most for sampling .* but only 0.1 GB is free; make the image or the "
                                            "input images smaller, or use fewer steps"):
        sampler_only.sample("a fox", GenerationSettings(width=992, height=992, batch=1, steps=200))


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("size", [1024, 1536, 2048])
def test_a_job_whose_vae_decoding_does_not_fit_is_advised_a_smaller_image(tiny_pipeline, device, size) -> None:
    """The tiny model samples in little memory, but decoding a large image takes gigabytes: the advice is the
    decoder's (a smaller image), never fewer steps, a shorter prompt or another weight mode."""
    from nextstep_runtime.memory.estimate import device_run_bytes, vae_phase_bytes
    from nextstep_runtime.memory.out_of_memory import VAE_DECODING

    config, vae_config = tiny_pipeline.model.config, tiny_pipeline.vae.config
    placement = Placement.single(device, torch.float32, config.num_hidden_layers)
    job = Job(GenerationSettings(width=size, height=size, batch=2, steps=2, cfg=1.0), prompt_tokens=8)
    ((_, sampling),) = device_run_bytes(config, placement, job).values()
    decode = vae_phase_bytes(vae_config, torch.float32, job)[VAE_DECODING]
    free = (sampling + decode) // 2
    assert sampling < free < decode
    vae = VAEPlacement(vae_config, torch.device(device), torch.float32)
    with pytest.raises(NextStepError) as caught:
        check_job_memory(config, placement, job, lambda device: free, vae)
    message = str(caught.value)
    assert "besides the model's weights, most for VAE decoding (KV cache" in message
    assert message.endswith("is free; make the image smaller (the VAE decodes one image at a time: a smaller batch, "
                            "fewer steps or another weight mode do not help)"), message
    assert "gpu_layers" not in message and "shorter prompt" not in message


def test_a_job_that_fits_runs(budget_pipeline, tiny_pipeline) -> None:
    settings = GenerationSettings(width=32, height=32, steps=2, seed=9)
    assert torch.equal(budget_pipeline.sample("a fox", settings).tokens, tiny_pipeline.sample("a fox", settings).tokens)


def test_free_memory_of_the_cpu_is_the_hosts_available_memory() -> None:
    free = free_memory(torch.device("cpu"))
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
    assert abs(free - int(meminfo["MemAvailable"].split()[0]) * 1024) < 2**30
