"""Model folders as the real Hugging Face repos hold them, derived from the tiny fixture: the slow tokenizer files
without tokenizer.json, tensors NextStep does not use, `use_gen_pos_embed: true`, a VAE with `psz: null`, and
config fields the runtime does not implement. Each loads and generates through the CLI and through the nodes."""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from goldens import TINY_MODEL, GoldenCase, assert_matches_golden, golden_cases, settings_for
from model_folders import add_tensors, copy_model, edit_config, edit_vae_config, load_on, use_slow_tokenizer_files
from nodes_pack import load_pack
from safetensors.torch import load_file, save_file

from nextstep_runtime import (
    ModelConfig,
    NextStepError,
    NextStepPipeline,
    images_to_unit,
    load_rgb,
    load_tokenizer,
    load_vae,
    to_uint8,
)
from nextstep_runtime.cli.main import main
from nextstep_runtime.model.positions import sincos_position_table
from nextstep_runtime.sampling.prompt import build_rows

CASES = {case.name: case for case in golden_cases()}
CHEAP = CASES["official_t2i_cps_nocfg"]
GUIDED = CASES["official_t2i_sde"]  # 4 x 6 tokens with guidance
POSITION_GRID = 5  # a 5 x 5 table: GUIDED's 24 tokens span its rows 0-4
PACK = load_pack()
NODES = PACK.NODE_CLASS_MAPPINGS
host = importlib.import_module(f"{PACK.__name__}.nodes.host")


def _extra_tensors(folder: Path) -> None:
    """Rotary inverse-frequency buffers per layer (older transformers exports) plus a stray projection."""
    add_tensors(folder, {**{f"layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)},
                         "vision_proj.weight": torch.zeros(4, 4)})


def _gen_pos_embed(folder: Path) -> None:
    edit_config(folder, use_gen_pos_embed=True, base_image_grid_size=POSITION_GRID)


VARIANTS = {
    "slow-tokenizer": use_slow_tokenizer_files,
    "extra-tensors": _extra_tensors,
    "vae-psz-null": lambda folder: edit_vae_config(folder, psz=None),
    "gen-pos-embed": _gen_pos_embed,
}
REPRODUCE_GOLDENS = ("slow-tokenizer", "extra-tensors", "vae-psz-null")


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """Every variant as a folder of a ComfyUI-style models/nextstep root, registered with the node host."""
    root = tmp_path_factory.mktemp("real-models") / host.MODEL_FOLDER_KEY
    folders = {}
    for name, build in VARIANTS.items():
        folders[name] = copy_model(root / name)
        build(folders[name])
    host.add_model_folder(host.MODEL_FOLDER_KEY, str(root))
    return folders


def cli_tensors(tmp_path: Path, folder: Path, case: GoldenCase) -> dict[str, torch.Tensor]:
    tensors = tmp_path / "out.safetensors"
    code = main(["generate", "--model", str(folder), "--device", "cpu", "--dtype", "float32",
                 "--out", str(tmp_path / "out.png"), "--save-tensors", str(tensors), *case.cli_args()])
    assert code == 0
    return load_file(tensors)


def node(name: str, *args, **kwargs):
    cls = NODES[name]
    return getattr(cls(), cls.FUNCTION)(*args, **kwargs)


def node_graph(model_name: str, case: GoldenCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Model Loader -> Text Encode (positive, negative) -> Sampler -> VAE Loader/Decode; (latents, images)."""
    p = case.params
    model = node("NextStepModelLoader", model_name, "float32", "sdpa")[0]
    text = p["caption"] + (f" {p['positive_prompt']}" if p["positive_prompt"] else "")
    positive = node("NextStepTextEncode", model, text)[0]
    negative = node("NextStepTextEncode", model, p["negative_prompt"])[0] if p["negative_prompt"] is not None else None
    h, w = p["hw"]
    latent = node("NextStepSampler", model, positive, negative=negative, width=w, height=h,
                  batch_size=p["num_images_per_caption"], seed=p["seed"], steps=p["num_sampling_steps"], cfg=p["cfg"],
                  cfg_img=p["cfg_img"], cfg_schedule=p["cfg_schedule"], timesteps_shift=p["timesteps_shift"],
                  sampler=p["sampler"], profile=p["profile"], use_norm=p["use_norm"])[0]
    vae = node("NextStepVAELoader", f"{model_name}/vae")[0]
    return latent["samples"], node("NextStepVAEDecode", vae, latent)[0]


# --- each variant through the CLI and the nodes ---------------------------------------------------------------

@pytest.mark.parametrize("variant", REPRODUCE_GOLDENS)
def test_variant_reproduces_golden_through_cli(variant: str, variants, tmp_path: Path) -> None:
    saved = cli_tensors(tmp_path, variants[variant], CHEAP)
    assert_matches_golden(CHEAP, {key: saved[key] for key in ("tokens", "latents", "images", "images_uint8")})


@pytest.mark.parametrize("variant", REPRODUCE_GOLDENS)
def test_variant_reproduces_golden_through_nodes(variant: str, variants) -> None:
    latents, images = node_graph(variant, CHEAP)
    assert_matches_golden(CHEAP, {"latents": latents, "images_uint8": to_uint8(images.movedim(-1, 1))})


# --- tokenizer from the slow files ------------------------------------------------------------------------------

def test_slow_tokenizer_files_give_the_ids_of_tokenizer_json(variants) -> None:
    fast, slow = load_tokenizer(TINY_MODEL), load_tokenizer(variants["slow-tokenizer"])
    assert not (variants["slow-tokenizer"] / "tokenizer.json").exists()
    specials = fast.all_special_tokens + list(json.loads((TINY_MODEL / "tokenizer_config.json").read_text())
                                              ["added_tokens_decoder"][str(i)]["content"] for i in range(512, 524))
    assert slow.convert_tokens_to_ids(specials) == fast.convert_tokens_to_ids(specials)
    assert (slow.pad_token_id, slow.eos_token_id, slow.bos_token) == (fast.pad_token_id, fast.eos_token_id, fast.bos_token)
    for case in CASES.values():
        p = case.params
        for text in filter(None, (p["caption"], p["negative_prompt"], p["positive_prompt"])):
            assert slow(text)["input_ids"] == fast(text)["input_ids"], text
        image = load_rgb(case.image_path) if case.image_path else None
        grids = [(image.shape[-2] // 16, image.shape[-1] // 16)] if image is not None else []
        rows = build_rows(slow, p["caption"], p["negative_prompt"], p["positive_prompt"], grids,
                          (p["hw"][0] // 16, p["hw"][1] // 16), p["num_images_per_caption"], p["cfg"], p["cfg_img"],
                          p["profile"], 517)
        assert rows.input_ids[:, : rows.text_length].tolist() == case.expected["caption_input_ids"].tolist(), case.name


def test_folder_without_tokenizer_files_names_what_is_missing(model_copy: Path) -> None:
    for name in ("tokenizer.json", "merges.txt"):
        (model_copy / name).unlink()
    with pytest.raises(NextStepError, match="no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"):
        load_tokenizer(model_copy)


# --- tensors the runtime does not use, and missing ones ---------------------------------------------------------

def test_unknown_tensors_are_named_in_one_warning_and_skipped(variants, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        model = load_on(variants["extra-tensors"])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "skipped 3 unknown tensor(s)" in warnings[0]
    assert "layers.0.self_attn.rotary_emb.inv_freq" in warnings[0] and "vision_proj.weight" in warnings[0]
    assert "inv_freq" not in dict(model.named_buffers())


def test_memory_planner_accepts_what_the_loader_skips(variants) -> None:
    from nextstep_runtime import ModelFootprint

    assert ModelFootprint.from_folder(variants["extra-tensors"]) == ModelFootprint.from_folder(TINY_MODEL)


def test_many_unknown_tensors_are_summarised(model_copy: Path, caplog) -> None:
    add_tensors(model_copy, {f"extra.{i}": torch.zeros(1) for i in range(20)})
    with caplog.at_level(logging.WARNING):
        load_on(model_copy)
    (message,) = [record.getMessage() for record in caplog.records if "unknown tensor" in record.getMessage()]
    assert "skipped 20 unknown tensor(s)" in message and message.endswith("and 12 more")


def test_missing_tensor_is_an_error_naming_it(model_copy: Path) -> None:
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_copy / "model.safetensors")
    with pytest.raises(NextStepError, match=r"missing tensors: layers\.1\.mlp\.up_proj\.weight"):
        load_on(model_copy)


# --- use_gen_pos_embed ------------------------------------------------------------------------------------------

def official_position_table(dim: int, side: int) -> torch.Tensor:
    """The official get_2d_sincos_pos_embed(dim, side), written out plainly: entry n is column n % side and row
    n // side; the first half encodes the column (sines, then cosines), the second half the row."""
    quarter = dim // 4
    rows = []
    for n in range(side * side):
        entry = []
        for position in (n % side, n // side):
            angles = [position / 10000 ** (i / quarter) for i in range(quarter)]
            entry += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
        rows.append(entry)
    return torch.tensor(rows, dtype=torch.float64)


def test_position_table_is_the_official_formula() -> None:
    for dim, side in ((64, POSITION_GRID), (64, 32), (5120, 3)):
        torch.testing.assert_close(sincos_position_table(dim, side).double(), official_position_table(dim, side),
                                   atol=1e-6, rtol=0)
    # the fixture was saved by the official code, whose persistent buffer holds its own 32 x 32 table
    official = load_file(TINY_MODEL / "model.safetensors")["gen_pos_embed"]
    torch.testing.assert_close(sincos_position_table(64, 32), official[0], atol=1e-6, rtol=0)


def tokens_with_offsets(table: torch.Tensor, case: GoldenCase) -> torch.Tensor:
    """The reference: the plain model with image token n's table row added to its condition before
    image_out_projector, the official `c = c + gen_pos_embed[:, n]`, applied by a hook in call order."""
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="float32")
    rows = iter(table.float())
    hook = pipe.model.image_out_projector.register_forward_pre_hook(lambda module, args: (args[0] + next(rows),))
    try:
        return generate(pipe, case).tokens
    finally:
        hook.remove()


def generate(pipe: NextStepPipeline, case: GoldenCase):
    p = case.params
    return pipe.generate(p["caption"], settings_for(case), negative=p["negative_prompt"], positive=p["positive_prompt"])


@pytest.fixture(scope="module")
def gen_pos_tokens(variants) -> torch.Tensor:
    return generate(NextStepPipeline.from_pretrained(variants["gen-pos-embed"], device="cpu", dtype="float32"),
                    GUIDED).tokens


def test_gen_pos_embed_is_added_as_the_official_code_does(gen_pos_tokens) -> None:
    plain = GUIDED.expected["tokens"]
    assert (gen_pos_tokens - plain).abs().max() > 0.05  # dropping the embedding fails here
    reference = tokens_with_offsets(official_position_table(64, POSITION_GRID), GUIDED)
    torch.testing.assert_close(gen_pos_tokens, reference, atol=1e-5, rtol=0)


def test_gen_pos_embed_through_cli_and_nodes(variants, gen_pos_tokens, tmp_path: Path) -> None:
    saved = cli_tensors(tmp_path, variants["gen-pos-embed"], GUIDED)
    torch.testing.assert_close(saved["tokens"], gen_pos_tokens, atol=1e-5, rtol=0)
    latents, _ = node_graph("gen-pos-embed", GUIDED)
    torch.testing.assert_close(latents, saved["latents"], atol=1e-5, rtol=0)


def test_stored_gen_pos_embed_table_is_used(model_copy: Path) -> None:
    """A checkpoint holding its own table (e.g. interpolated) is read as the official loader would read it."""
    stored = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(0))
    add_tensors(model_copy, {"gen_pos_embed": stored})
    edit_config(model_copy, use_gen_pos_embed=True)
    case = CHEAP
    tokens = generate(NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32"), case).tokens
    torch.testing.assert_close(tokens, tokens_with_offsets(stored[0], case), atol=1e-5, rtol=0)


def test_stored_gen_pos_embed_is_ignored_without_use_gen_pos_embed(model_copy: Path) -> None:
    add_tensors(model_copy, {"gen_pos_embed": torch.randn(1, 30, 64)})
    tokens = generate(NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32"), CHEAP).tokens
    assert_matches_golden(CHEAP, {"tokens": tokens})


def test_image_beyond_the_position_table_is_an_error(model_copy: Path) -> None:
    edit_config(model_copy, use_gen_pos_embed=True, base_image_grid_size=4)
    pipe = NextStepPipeline.from_pretrained(model_copy, device="cpu", dtype="float32")
    with pytest.raises(NextStepError, match="table of 16 image tokens, fewer than the 24"):
        generate(pipe, GUIDED)


def test_without_base_image_grid_size_the_official_table_applies(model_copy: Path) -> None:
    """Stored in the checkpoint (the fixture's, from the official code) or, without it, computed: 32 x 32."""
    edit_config(model_copy, use_gen_pos_embed=True)
    stored = load_on(model_copy).gen_pos_embed
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["gen_pos_embed"]
    save_file(tensors, model_copy / "model.safetensors")
    computed = load_on(model_copy).gen_pos_embed
    assert stored.shape == computed.shape == (32 * 32, 64)
    torch.testing.assert_close(stored, computed, atol=1e-6, rtol=0)
    assert load_on(TINY_MODEL).gen_pos_embed is None


# --- fields the runtime does not implement ------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("use_2d_rope", True), ("rope_scaling", {"type": "linear", "factor": 2.0}), ("hidden_act", "gelu")])
def test_unimplemented_config_fields_are_errors(field: str, value, model_copy: Path, tmp_path: Path, capsys) -> None:
    edit_config(model_copy, **{field: value})
    code = main(["generate", "--model", str(model_copy), "--prompt", "x", "--width", "16", "--height", "16",
                 "--out", str(tmp_path / "o.png")])
    message = capsys.readouterr().err.strip()
    assert code == 2 and message.startswith("error: ") and field in message and str(model_copy) in message
    assert not (tmp_path / "o.png").exists()


def test_node_loader_refuses_unimplemented_fields(variants) -> None:
    folder = variants["slow-tokenizer"].parent / "rope-2d"
    copy_model(folder)
    edit_config(folder, use_2d_rope=True)
    with pytest.raises(NextStepError, match="use_2d_rope: true"):
        node("NextStepModelLoader", "rope-2d", "float32", "sdpa")


def test_default_rope_scaling_and_false_flags_are_accepted() -> None:
    raw = json.loads((TINY_MODEL / "config.json").read_text())
    plain = ModelConfig.from_dict(raw)
    assert ModelConfig.from_dict({**raw, "use_2d_rope": False, "rope_scaling": {"rope_type": "default"}}) == plain


# --- VAE without patchify -----------------------------------------------------------------------------------------

def test_vae_psz_null_normalises_each_position_as_the_official_encoder(variants) -> None:
    """Official encode with psz None: LayerNorm over the z channels of each latent position (layer_norm_2d)."""
    pixels = load_rgb(TINY_MODEL.parent / "edit_input_64.png") * 2 - 1
    null_vae = load_vae(variants["vae-psz-null"] / "vae", torch.float32, "cpu")
    assert null_vae.config.psz is None
    with torch.inference_mode():
        mean = null_vae.encoder(pixels)[:, :16]
        reference = F.layer_norm(mean.permute(0, 2, 3, 1), (16,), eps=1e-6).permute(0, 3, 1, 2)
        latent = null_vae.encode(pixels)
        patched = load_vae(TINY_MODEL / "vae", torch.float32, "cpu").encode(pixels)
    torch.testing.assert_close(latent, reference, atol=1e-5, rtol=0)
    assert (latent - patched).abs().max() > 0.1


def test_vae_psz_null_edits_through_the_cli(variants, tmp_path: Path) -> None:
    case = CASES["official_edit_sde"]
    saved = cli_tensors(tmp_path, variants["vae-psz-null"], case)
    assert saved["tokens"].shape == case.expected["tokens"].shape
    assert torch.isfinite(saved["images"]).all()
    assert (saved["tokens"] - case.expected["tokens"]).abs().max() > 1e-3  # the input image is encoded differently
    assert images_to_unit(saved["images"]).shape == (1, 3, 64, 64)
