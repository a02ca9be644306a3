"""Image-conditioned sampling through the Python API: kept tokens are given, not sampled, and every token's
noise stays tied to its index, so keeping any tokens of a golden's own output and regenerating the rest with
the same seed and settings gives the whole golden back. Also: the seeded noise drawn in chunks is the same
stream as one draw."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cli_runs import run_cli
from goldens import FLOAT_TOLERANCE, TINY_MODEL, assert_matches_golden, golden_cases, settings_for
from PIL import Image
from safetensors.torch import load_file, save_file

from nextstep_runtime import GenerationSettings, NextStepError, load_rgb
from nextstep_runtime.cli.init_image import load_cropped_rgb
from nextstep_runtime.sampling.keep_mask import regenerated_cells
from nextstep_runtime.sampling.noise import NOISE_CHUNK_BYTES, NoiseSpec, NoiseStream
from nextstep_runtime.sampling.token_loop import sample_tokens

CASES = {case.name: case for case in golden_cases()}


def edit_latents(pipe, case) -> list[torch.Tensor]:
    return [pipe.encode_image(load_rgb(case.image_path))] if case.image_path else []


def rows_mask(height: int, width: int, kept_rows: int, batch: int = 1) -> torch.Tensor:
    """A pixel mask (1 = regenerate) that keeps the first `kept_rows` token rows."""
    mask = torch.ones((batch, height, width))
    mask[:, : 16 * kept_rows] = 0
    return mask


def continue_golden(pipe, case, mask: torch.Tensor | None, callback=None):
    p = case.params
    return pipe.sample(p["caption"], settings_for(case), p["negative_prompt"], p["positive_prompt"],
                       edit_latents(pipe, case), callback, init_latents=case.expected["latents"], mask=mask)


@pytest.mark.parametrize("name", ["official_t2i_sde", "official_edit_sde"])
def test_keeping_the_first_rows_of_a_golden_gives_the_golden_back(name: str, tiny_pipeline) -> None:
    case = CASES[name]
    height, width = case.params["hw"]
    grid_h, grid_w = height // 16, width // 16
    expected_tokens = tiny_pipeline.latents_to_tokens(case.expected["latents"])
    for kept_rows in (0, grid_h // 2, grid_h):
        progress = []
        result = continue_golden(tiny_pipeline, case, rows_mask(height, width, kept_rows),
                                 lambda done, total, tokens: progress.append(done))
        assert_matches_golden(case, {"tokens": result.tokens, "latents": result.latents})
        kept = kept_rows * grid_w
        assert torch.allclose(result.tokens[:, :kept], expected_tokens[:, :kept], atol=1e-6, rtol=0)
        assert progress == list(range(1, grid_h * grid_w + 1))
    # every row kept: the output is the input
    assert (result.latents - case.expected["latents"]).abs().max().item() <= 1e-6


def test_any_kept_tokens_per_image_of_a_batch_give_the_golden_back(tiny_pipeline) -> None:
    """Per-image masks (a batch of two with different holes), tokens kept anywhere, not only a prefix."""
    case = CASES["official_t2i_ode_linear_batch2"]
    height, width = case.params["hw"]
    mask = torch.ones((2, height, width))
    mask[0, 16:48, 16:48] = 0          # image 0 keeps a 2x2 block in the middle
    mask[1, :, 32:] = 0                # image 1 keeps its right half
    mask[1, 40, 40] = 0.7              # one pixel >= 0.5 regenerates its whole token
    result = continue_golden(tiny_pipeline, case, mask)
    assert_matches_golden(case, {"tokens": result.tokens, "latents": result.latents})
    keep = ~regenerated_cells(mask, height, width, 16)
    assert keep.sum(1).tolist() == [4, 7]
    given = tiny_pipeline.latents_to_tokens(case.expected["latents"])
    assert torch.equal(result.tokens[keep], given[keep])


def test_a_mask_that_keeps_nothing_and_no_mask_are_the_plain_run(tiny_pipeline) -> None:
    case = CASES["official_t2i_cps_nocfg"]
    height, width = case.params["hw"]
    p = case.params
    plain = tiny_pipeline.sample(p["caption"], settings_for(case), p["negative_prompt"], p["positive_prompt"])
    init = torch.randn_like(case.expected["latents"])
    for mask in (torch.full((height, width), 0.5), None):
        result = tiny_pipeline.sample(p["caption"], settings_for(case), p["negative_prompt"], p["positive_prompt"],
                                      init_latents=init, mask=mask)
        assert torch.equal(result.tokens, plain.tokens)


def test_noise_in_small_chunks_is_the_same_stream(tiny_pipeline) -> None:
    case = CASES["official_t2i_sde"]
    p = case.params
    inputs = tiny_pipeline.prepare(p["caption"], settings_for(case), p["negative_prompt"], p["positive_prompt"])
    assert inputs.noise.chunk_tokens == inputs.noise.tokens  # a small image is one chunk
    chunked = dataclasses.replace(inputs, noise=dataclasses.replace(inputs.noise, chunk_tokens=5))  # 24 = 4*5 + 4
    tokens = sample_tokens(tiny_pipeline.model, chunked, tiny_pipeline.attention)
    assert (tokens - case.expected["tokens"]).abs().max().item() <= FLOAT_TOLERANCE


def test_noise_held_at_once_is_bounded() -> None:
    spec = NoiseSpec.plan(seed=0, tokens=128 * 128, steps=200, stochastic=True, batch=64, dim=64)
    per_token = 201 * 64 * 64 * 4
    assert spec.chunk_tokens * per_token <= NOISE_CHUNK_BYTES and spec.chunk_tokens >= 1
    huge = NoiseSpec.plan(seed=0, tokens=10, steps=200, stochastic=True, batch=4096, dim=64)
    assert huge.chunk_tokens == 1


@pytest.mark.parametrize("tokens,steps,stochastic,limit", [(24, 28, True, NOISE_CHUNK_BYTES), (24, 28, False, 2**20),
                                                            (1000, 7, True, 3 * 2**20), (50, 200, True, 1)])
def test_chunk_bytes_is_what_the_noise_stream_returns_per_chunk(tokens, steps, stochastic, limit) -> None:
    """The memory planner reads a noise chunk's size from NoiseSpec.chunk_bytes: it must be the stream's own."""
    spec = NoiseSpec.plan(seed=0, tokens=tokens, steps=steps, stochastic=stochastic, batch=3, dim=64, chunk_bytes=limit)
    chunk = NoiseStream(spec).next_chunk()
    assert chunk.numel() * chunk.element_size() == spec.chunk_bytes


def test_bad_init_latents_are_clear_errors_and_the_next_run_is_fine(tiny_pipeline) -> None:
    case = CASES["official_t2i_cps_nocfg"]
    p = case.params
    settings = settings_for(case)
    latents = case.expected["latents"]
    bad = {
        "another model family": (torch.zeros((1, 4, 6, 6)), None, "16"),
        "another size": (torch.zeros((1, 16, 8, 6)), None, "48x64"),
        "a batch mismatch": (latents.repeat(3, 1, 1, 1), None, "3 images"),
        "a mask batch mismatch": (latents, torch.ones((3, 48, 48)), "3 images"),
        "a mask of bad rank": (latents, torch.ones((1, 2, 48, 48)), "mask"),
    }
    for label, (init, mask, needle) in bad.items():
        with pytest.raises(NextStepError, match=needle):
            tiny_pipeline.sample(p["caption"], settings, init_latents=init, mask=mask)
    # a mask of another size is stretched to the image, as KSampler does: 3x3 cells of a 48x48 image
    small = torch.ones((1, 6, 6))
    small[:, :2] = 0
    assert (~regenerated_cells(small, 48, 48, 16)).sum().item() == 3
    result = tiny_pipeline.sample(p["caption"], settings, init_latents=latents, mask=rows_mask(48, 48, 1))
    assert_matches_golden(case, {"tokens": result.tokens})


def _mask_png(path, height: int, width: int, kept_rows: int) -> str:
    pixels = (rows_mask(height, width, kept_rows)[0] * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.parametrize(("name", "kept_rows"), [("official_t2i_sde", 2), ("official_edit_sde", 2),
                                                  ("official_edit_sde", 4)])
def test_cli_continues_a_saved_run_exactly(name: str, kept_rows: int, tmp_path) -> None:
    """--init-image with a --save-tensors file keeps the mask's tokens and regenerates the golden's rest."""
    case = CASES[name]
    height, width = case.params["hw"]
    saved = tmp_path / "golden.safetensors"
    save_file({"latents": case.expected["latents"]}, saved)
    out = tmp_path / "out.safetensors"
    result = run_cli("--model", str(TINY_MODEL), "--device", "cpu", "--dtype", "float32", "--out",
                     str(tmp_path / "out.png"), "--save-tensors", str(out), *case.cli_args(), "--init-image", str(saved),
                     "--mask", _mask_png(tmp_path / "mask.png", height, width, kept_rows))
    assert result.returncode == 0, result.stderr
    tokens = load_file(out)
    assert_matches_golden(case, {"tokens": tokens["tokens"], "latents": tokens["latents"]})
    kept = kept_rows * width // 16
    assert torch.allclose(tokens["tokens"][:, :kept], case.expected["tokens"][:, :kept], atol=1e-6, rtol=0)


def test_cli_init_picture_sets_the_size_and_keeps_its_tokens(tmp_path, tiny_pipeline) -> None:
    """A picture is centre-cropped to multiples of 16 and VAE-encoded; its kept tokens come out as encoded."""
    picture = tmp_path / "init.png"
    Image.fromarray((torch.rand((40, 70, 3), generator=torch.Generator().manual_seed(1)) * 255)
                    .to(torch.uint8).numpy()).save(picture)
    mask = tmp_path / "mask.png"
    mask_pixels = torch.full((40, 70), 255, dtype=torch.uint8)
    mask_pixels[:, :40] = 0                   # after the crop to 32x64 (3 px off left and right): 2 token columns
    Image.fromarray(mask_pixels.numpy()).save(mask)
    out = tmp_path / "out.safetensors"
    base = ["--model", str(TINY_MODEL), "--device", "cpu", "--dtype", "float32", "--prompt", "a fox", "--steps", "2",
            "--init-image", str(picture), "--mask", str(mask)]
    result = run_cli(*base, "--out", str(tmp_path / "out.png"), "--save-tensors", str(out))
    assert result.returncode == 0, result.stderr
    assert "centre-cropped from 70x40 to 64x32" in result.stderr
    tokens = load_file(out)["tokens"]
    assert tokens.shape == (1, 8, 64)
    encoded = tiny_pipeline.latents_to_tokens(tiny_pipeline.encode_image(load_rgb(picture)[..., 4:36, 3:67]))
    keep = torch.tensor([True, True, False, False] * 2)
    assert torch.allclose(tokens[0, keep], encoded[0, keep], atol=1e-6, rtol=0)
    assert not torch.allclose(tokens[0, ~keep], encoded[0, ~keep], atol=1e-2)
    for bad, needle in ((["--width", "48"], "--width 48 differs from the init image's width 64 (its size 64x32"),
                        (["--mask", str(tmp_path / "missing.png")], "not found")):
        failed = run_cli(*base, *bad, "--out", str(tmp_path / "bad.png"))
        assert failed.returncode == 2 and failed.stderr.strip().count("\n") <= 1 and needle in failed.stderr, failed.stderr


def test_editing_inputs_are_resized_to_the_output_size_unless_kept(tmp_path) -> None:
    picture = tmp_path / "big.png"
    Image.fromarray(torch.zeros((100, 150, 3), dtype=torch.uint8).numpy()).save(picture)
    assert load_cropped_rgb(picture, (64, 48)).shape == (1, 3, 48, 64)
    assert load_cropped_rgb(picture).shape == (1, 3, 96, 144)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_latents_come_back_bit_for_bit(tiny_pipeline, seed) -> None:
    """Any latent (here random, with values far from the golden's) and any mask: the kept tokens' latent values are the
    input's own, not their round trip through the model's latent scaling."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((1, 16, 6, 8), generator=generator) * (seed + 1) * 3
    cells = torch.rand((3, 4), generator=generator) > 0.5
    cells[0, 0], cells[2, 3] = False, True  # something kept, something regenerated
    mask = cells.float().repeat_interleave(16, 0).repeat_interleave(16, 1)
    settings = GenerationSettings(width=64, height=48, steps=2, cfg=1.0, seed=seed, sampler="ode")
    result = tiny_pipeline.sample("x", settings, init_latents=latents, mask=mask)
    keep = ~regenerated_cells(mask, 48, 64, 16)[0].reshape(3, 4)
    keep = keep.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(result.latents[0][:, keep], latents[0][:, keep])
    assert not torch.equal(result.latents[0][:, ~keep], latents[0][:, ~keep])
