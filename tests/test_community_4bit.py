"""Community 4-bit folders (AutoRound / GPTQ W4A16, made with the real auto-round: tests/fixtures/autoround) load as
they are: every packed linear is exactly its plainly written dequantisation, generation runs on every path (API,
CLI, nodes, a real ComfyUI) near the bf16 model, the planner's bytes are what loading places, and every variant the
runtime does not read is refused with one line naming the field or tensor."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import cli_error, folder_error, run_cli
from comfyui_server import running_comfyui
from community_folders import (
    AUTOROUND,
    DECODER_LINEARS,
    FOLDERS,
    SHIPPED_CODE,
    community_folder,
    edit_quantization_config,
    folder_tensors,
    padded_rows,
    quantization_config,
    reference_weights,
    rewrite_tensors,
)
from fixture_workflows import workflow
from goldens import TINY_MODEL, golden_cases, settings_for
from model_folders import edit_config, load_on
from nodes_pack import install_fixture_models, load_pack
from planning import gpus
from reference_quantization import dequantize_gptq, gptq_codes, gptq_words, quantize_gptq
from safetensors.torch import load_file

from nextstep_runtime import (
    DeviceList,
    DeviceTraits,
    GenerationSettings,
    Job,
    ModelConfig,
    ModelFolder,
    ModelFootprint,
    NextStepError,
    NextStepPipeline,
    Targets,
    WeightMode,
    images_to_unit,
    plan_load,
    plan_mode,
    to_uint8,
)
from nextstep_runtime.cli.main import main
from nextstep_runtime.weights.int4 import Int4Linear
from nextstep_runtime.weights.repack import convert_folder

CASE = next(case for case in golden_cases() if case.name == "official_t2i_cps_nocfg")


def on_cpu(dtype: torch.dtype) -> Targets:
    return Targets.on(DeviceList.parse("cpu"), str(dtype).removeprefix("torch."), lambda device: None)
SOURCE = load_file(TINY_MODEL / "model.safetensors")
"""The float32 model the fixtures were quantised from."""
IN_FEATURES = {name.removesuffix(".weight"): tensor.shape[1] for name, tensor in SOURCE.items() if tensor.ndim == 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Every fixture as a complete model folder (with the tiny model's vae/)."""
    root = tmp_path_factory.mktemp("community")
    return {name: community_folder(name, root / name) for name in FOLDERS}


@pytest.fixture
def sym_copy(tmp_path: Path) -> Path:
    """A writable copy of the symmetric g32 folder, to make variants of."""
    return community_folder("sym-g32", tmp_path / "sym-g32")


@pytest.fixture(scope="module")
def bf16_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The float model computed in bfloat16: the case's image, and the image of the next seed."""
    pipe = NextStepPipeline.from_pretrained(TINY_MODEL, device="cpu", dtype="bfloat16")
    settings = settings_for(CASE)
    return tuple(pipe.generate(CASE.params["caption"], replace(settings, seed=seed)).images.float()
                 for seed in (settings.seed, settings.seed + 1))


def generate(pipe: NextStepPipeline):
    return pipe.generate(CASE.params["caption"], settings_for(CASE))


def packed_layers(model) -> dict[str, Int4Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, Int4Linear)}


# --- the format, and the reference read of it --------------------------------------------------------------------

@pytest.mark.parametrize("name", FOLDERS)
def test_reference_dequantisation_is_the_source_within_the_rtn_bound(folders, name):
    """The plainly written dequantisation (and with it the zero-point convention per packing) checked against the
    float weights the tool quantised: symmetric RTN is within one step (auto-round clamps code 15), asymmetric
    within half a step (plus float16 scale rounding); padded input rows dequantise to exactly 0."""
    folder = folders[name]
    tensors = folder_tensors(folder)
    weights = reference_weights(folder, IN_FEATURES)
    assert set(weights) == DECODER_LINEARS  # exactly the decoder's linears; no g_idx but in the GPTQ export
    assert {key for key in tensors if key.endswith(".g_idx")} == (
        {f"{linear}.g_idx" for linear in DECODER_LINEARS} if name.startswith("gptq") else set())
    bound = 1.001 if quantization_config(folder)["sym"] else 0.502
    source_dtype = torch.bfloat16 if name.startswith("sharded") else torch.float32  # the tiny model cast, or as is
    for linear, weight in weights.items():
        scales = tensors[f"{linear}.scales"].float()
        group = tensors[f"{linear}.qweight"].shape[0] * 8 // scales.shape[0]
        step = scales.abs().repeat_interleave(group, dim=0)[:weight.shape[1]].t()
        source = SOURCE[f"{linear}.weight"].to(source_dtype).float()
        assert ((weight - source).abs() <= bound * step).all(), linear
        padded = padded_rows(folder, linear, IN_FEATURES[linear])
        assert torch.equal(padded, torch.zeros_like(padded)), linear
    if name == "sym-g128-padded":  # the group of 128 pads the 64 inputs of every linear but down_proj
        assert padded_rows(folder, "layers.0.mlp.up_proj", 64).shape == (64, 128)


# --- loading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FOLDERS)
def test_every_packed_linear_is_its_reference_dequantisation_exactly(folders, name):
    """Float32 on the CPU: the identity through each packed layer gives the reference weights bit for bit (the
    kernel's (q - 8) * s + (8 - z) * s is exact); everything else is the file's tensor, as stored."""
    folder = folders[name]
    model = load_on(folder, torch.float32, "int4")
    layers = packed_layers(model)
    assert set(layers) == DECODER_LINEARS
    for linear, weight in reference_weights(folder, IN_FEATURES).items():
        layer = layers[linear]
        expected = weight.t() if layer.bias is None else weight.t() + layer.bias
        assert torch.equal(layer(torch.eye(layer.in_features)), expected), linear
    tensors = folder_tensors(folder)
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in layers:
            assert torch.equal(value, tensors[key].float()), key


def test_bfloat16_layers_are_the_reference_within_bfloat16_rounding(folders):
    """In bfloat16 (what CUDA computes in) the kernels read bf16 scales and zeros: the same weights, each within
    bf16 rounding of scale, zero and result."""
    folder = folders["asym-g32"]
    layers = packed_layers(load_on(folder, torch.bfloat16, "int4"))
    tensors = folder_tensors(folder)
    for linear, weight in reference_weights(folder, IN_FEATURES).items():
        layer = layers[linear]
        layer.bias = None  # the weights alone (adding a bias rounds in bf16 too)
        out = layer(torch.eye(layer.in_features, dtype=torch.bfloat16)).float().t()
        scale = tensors[f"{linear}.scales"].float().abs().repeat_interleave(32, dim=0).t()
        assert ((out - weight).abs() <= 2**-7 * (weight.abs() + 16 * scale)).all(), linear


def test_stored_format_and_modes(folders):
    """The folder is 4-bit GPTQ-packed, loads in int4 only, and asking for full or fp8 says why not."""
    folder = ModelFolder.open(folders["sharded-prefixed-sym-g64"])
    assert folder.stored_format == "gptq" and folder.gptq.packing == "auto_round:auto_gptq"
    assert set(folder.packed_linears) == DECODER_LINEARS
    assert ModelFolder.open(folders["gptq-sym-g32"]).gptq.quant_method == "gptq"
    for storage in ("full", "fp8"):
        with pytest.raises(NextStepError, match=r"holds 4-bit GPTQ-packed weights \(an AutoRound or GPTQ export\), "
                                                r"not the original ones; load it with int4 weights"):
            load_on(folder, torch.bfloat16, storage)


def test_gptq_config_reads_rope_parameters(folders):
    """The GPTQ export's config (re-saved by transformers 5) keeps rope_theta only in rope_parameters."""
    raw = json.loads((folders["gptq-sym-g32"] / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 1e6
    changed = {**raw, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    assert ModelConfig.from_dict(changed).rope_theta == 5e5
    with pytest.raises(NextStepError, match="sets rope_parameters .*which this runtime does not implement"):
        ModelConfig.from_dict({**raw, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}})


# --- generation on every path -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FOLDERS)
def test_generation_is_near_the_bf16_model_closer_than_a_seed_change(folders, bf16_images, name):
    same_seed, next_seed = bf16_images
    images = generate(NextStepPipeline.from_pretrained(folders[name], device="cpu", dtype="bfloat16",
                                                       memory="int4")).images.float()
    assert torch.isfinite(images).all()
    quantisation = (images - same_seed).abs().mean().item()
    seed_change = (next_seed - same_seed).abs().mean().item()
    assert 0 < quantisation < seed_change / 5, (quantisation, seed_change)  # measured: 0.025-0.033 against 0.62


def test_cli_generates_with_memory_auto_as_the_api_does(folders, tmp_path):
    """`generate --model FOLDER` (memory auto: the folder's own int4) gives the API's result."""
    folder = folders["sharded-prefixed-sym-g64"]
    result = run_cli("--model", str(folder), "--device", "cpu", "--dtype", "float32", "--out",
                     str(tmp_path / "o.png"), "--save-tensors", str(tmp_path / "o.safetensors"), *CASE.cli_args())
    assert result.returncode == 0, result.stderr
    saved = load_file(tmp_path / "o.safetensors")
    api = generate(NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32", memory="int4"))
    assert torch.equal(saved["tokens"], api.tokens) and torch.equal(saved["images"], api.images)


def test_cli_refuses_full_and_fp8_in_one_line(folders, capsys, tmp_path):
    for memory in ("full", "fp8"):
        line = cli_error(capsys, tmp_path, "--prompt", "a fox", "--memory", memory, model=folders["asym-g32"])
        assert "holds 4-bit GPTQ-packed weights" in line and "use the original model for" in line


def test_nodes_load_the_folder_as_it_is(folders, tmp_path):
    """Model Loader (memory auto) -> Text Encode -> Sampler -> VAE Decode gives the API's result; the plan route
    shows the int4 mode and the bytes loading placed."""
    pack = load_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    routes = __import__(f"{pack.__name__}.nodes.routes", fromlist=["plan_response"])
    models = install_fixture_models(tmp_path / "models")
    name = "gptq-sym-g32"
    (models / "nextstep" / name).symlink_to(folders[name])
    assert name in nodes["NextStepModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    model = nodes["NextStepModelLoader"]().load(name, "float32", "sdpa")[0]
    vae = nodes["NextStepVAELoader"]().load(f"{name}/vae")[0]
    positive = nodes["NextStepTextEncode"]().encode(model, CASE.params["caption"])[0]
    settings = settings_for(CASE)
    latent = nodes["NextStepSampler"]().sample(
        model, positive, width=settings.width, height=settings.height, batch_size=settings.batch, seed=settings.seed,
        steps=settings.steps, cfg=settings.cfg, cfg_img=settings.cfg_img, cfg_schedule=settings.cfg_schedule,
        timesteps_shift=settings.timesteps_shift, sampler=settings.sampler, profile=settings.profile,
        use_norm=settings.use_norm)[0]
    images = nodes["NextStepVAEDecode"]().decode(vae, latent)[0]
    api = generate(NextStepPipeline.from_pretrained(folders[name], device="cpu", dtype="float32", memory="int4"))
    assert torch.equal(latent["samples"], api.latents)
    assert torch.equal(images, images_to_unit(api.images).movedim(1, -1))
    status, plan = routes.plan_response({"model": name, "dtype": "float32"})
    assert status == 200, plan
    assert plan["loads_as"] == "float32, int4"
    placed = load_on(folders[name], torch.float32, "int4").state_dict().values()
    assert plan["devices"][0]["weights_bytes"] == sum(tensor.nbytes for tensor in placed)


def test_real_comfyui_loads_the_folder_and_plans_it(folders, tmp_path):
    """The example workflow in a real ComfyUI, with the community folder in the Model Loader: the saved image is
    the API's; /nextstep/plan shows the int4 mode with the bytes loading places."""
    name = "sharded-prefixed-sym-g64"
    case = CASE.params
    with running_comfyui(tmp_path, models={name: folders[name]}) as comfy:
        prompt = workflow("nextstep_1.1_text_to_image", case, "e2e/community")
        for node in prompt.values():
            if node["class_type"] == "NextStepModelLoader":
                node["inputs"]["model_name"] = name
        saved = comfy.run(prompt)
        status, plan = comfy.request(f"/nextstep/plan?model={name}&dtype=bfloat16")
    settings = GenerationSettings(width=case["hw"][1], height=case["hw"][0], batch=1, seed=case["seed"],
                                  steps=case["num_sampling_steps"], cfg=case["cfg"], cfg_img=case["cfg_img"],
                                  cfg_schedule=case["cfg_schedule"], timesteps_shift=case["timesteps_shift"],
                                  sampler=case["sampler"], profile=case["profile"], use_norm=case["use_norm"])
    pipe = NextStepPipeline.from_pretrained(folders[name], device="cpu", dtype="float32", memory="int4")
    result = pipe.generate(case["caption"], settings)
    expected = to_uint8(images_to_unit(result.images))[0].movedim(0, -1).numpy()
    assert np.abs(saved.astype(int) - expected.astype(int)).max() <= 1
    assert status == 200 and plan["loads_as"] == "bfloat16, int4", plan
    placed = load_on(folders[name], torch.bfloat16, "int4").state_dict().values()
    assert plan["devices"][0]["weights_bytes"] == sum(tensor.nbytes for tensor in placed)


def test_shipped_code_is_never_imported(folders, tmp_path):
    """gptq-sym-g32 ships the remote-code shim that made it; loading and generating neither imports nor runs it
    (here replaced by code that would fail loudly)."""
    folder = community_folder("gptq-sym-g32", tmp_path / "gptq")
    for name in SHIPPED_CODE:
        assert (folder / name).is_file()
        (folder / name).write_text('raise RuntimeError("code from the model folder was executed")\n')
    images = generate(NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32", memory="int4")).images
    assert torch.isfinite(images).all()
    assert not any(str(getattr(module, "__file__", None) or "").startswith(str(folder))
                   for module in list(sys.modules.values()))
    assert not (folder / "__pycache__").exists()


# --- the memory planner ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FOLDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_weight_bytes_are_what_loading_places(folders, name, dtype):
    footprint = ModelFootprint.from_folder(folders[name])
    plan = plan_mode(footprint, WeightMode("int4"), Job(), on_cpu(dtype))
    placed = load_on(folders[name], dtype, "int4").state_dict().values()
    assert plan.devices[0].weights_bytes == sum(tensor.nbytes for tensor in placed)
    assert plan.weights_host_bytes == 0


def test_auto_and_the_plan_command_choose_int4(folders, capsys):
    footprint = ModelFootprint.from_folder(folders["sym-g128-padded"])
    plan, _ = plan_load(footprint, "auto", None, Job(), gpus(80, traits=DeviceTraits("cuda", (9, 0))))
    assert plan.mode == WeightMode("int4") and plan.fits
    assert main(["plan", str(folders["sym-g128-padded"]), "--gpu-memory", "8"]) == 0
    assert capsys.readouterr().out.startswith("memory auto: bfloat16, int4 (needs ")


# --- variants ---------------------------------------------------------------------------------------------------------

def test_packing_is_decided_per_layer(sym_copy, caplog):
    """A flow-head linear packed too (int4 covers the decoder only), and a decoder linear in groups of 16 (the
    kernels take 32 or more), are dequantised to the compute dtype exactly, with one warning for the decoder one;
    a decoder linear left in float loads as a plain Linear; the plan still equals what loading places, and
    streaming layers that are not packed alike is refused."""
    head, up, down = "image_head.net.res_blocks.0.mlp.0", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj"
    tensors = folder_tensors(sym_copy)
    head_packed, up_packed = quantize_gptq(tensors[f"{head}.weight"], 16), quantize_gptq(SOURCE[f"{up}.weight"], 16)
    down_weight = reference_weights(sym_copy, IN_FEATURES)[down]
    rewrite_tensors(sym_copy, {f"{head}.weight": None,
                               **{f"{head}.{part}": value for part, value in head_packed.items()},
                               **{f"{up}.{part}": value for part, value in up_packed.items()},
                               f"{down}.qweight": None, f"{down}.qzeros": None, f"{down}.scales": None,
                               f"{down}.weight": down_weight})
    model = load_on(sym_copy, torch.float32, "int4")
    assert set(packed_layers(model)) == DECODER_LINEARS - {up, down}
    assert torch.equal(model.get_submodule(down).weight, down_weight)
    for name, packed in ((head, head_packed), (up, up_packed)):
        expected = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], IN_FEATURES[name], 1)
        assert torch.equal(model.get_submodule(name).weight, expected), name
    assert "1 decoder layers (layers.0.mlp.up_proj, ...) are packed in groups the int4 kernels do not take" \
        in caplog.text
    plan = plan_mode(ModelFootprint.from_folder(sym_copy), WeightMode("int4"), Job(), on_cpu(torch.float32))
    assert plan.devices[0].weights_bytes == sum(tensor.nbytes for tensor in model.state_dict().values())
    with pytest.raises(NextStepError, match="are not all packed alike, so they cannot be streamed"):
        load_on(sym_copy, torch.float32, "int4", gpu_layers=1)


def test_an_export_whose_layers_all_stayed_float_is_a_float_folder(model_copy, tmp_path):
    """auto-round 0.16.1 with --group_size -1 writes a quantization_config but packs no layer: the folder is what
    its tensors are, a float one, loading in every mode (and convert leaves the config block out)."""
    edit_config(model_copy, quantization_config=quantization_config(AUTOROUND / "sym-g32"))
    folder = ModelFolder.open(model_copy)
    assert folder.gptq is not None and folder.stored_format == "float"
    reference = load_on(TINY_MODEL, torch.float32).state_dict()
    loaded = load_on(folder, torch.float32).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.items())
    convert_folder(folder, tmp_path / "int4", "int4")
    assert ModelFolder.open(tmp_path / "int4").stored_format == "int4"


def test_symmetric_gptq_v2_zero_points_load_the_same_weights(tmp_path, folders):
    """GPTQ v2 stores the zero point itself (8 for symmetric weights): the same layers as v1's stored 7."""
    folder = community_folder("gptq-sym-g32", tmp_path / "v2")
    tensors = folder_tensors(folder)
    rewrite_tensors(folder, {key: gptq_words(gptq_codes(value) + 1) for key, value in tensors.items()
                             if key.endswith(".qzeros")})
    edit_quantization_config(folder, checkpoint_format="gptq_v2")
    v1, v2 = (packed_layers(load_on(f, torch.float32, "int4")) for f in (folders["gptq-sym-g32"], folder))
    for name, layer in v1.items():
        assert torch.equal(layer(torch.eye(layer.in_features)), v2[name](torch.eye(layer.in_features))), name


@pytest.mark.parametrize("changes,expected", [
    ({"bits": 3}, "quantization_config.bits is 3; only 4-bit weights load (W4A16)"),
    ({"quant_method": "awq"}, "quantization_config.quant_method is 'awq'; this runtime loads 4-bit GPTQ-packed"),
    ({"packing_format": "auto_round:auto_awq"}, "quantization_config.packing_format is 'auto_round:auto_awq'"),
    ({"data_type": "nv_fp"}, "quantization_config.data_type is 'nv_fp'; only integer weights load"),
    ({"quant_method": "gptq", "desc_act": True}, "quantization_config.desc_act is True; act-order"),
    ({"quant_method": "gptq", "sym": False, "checkpoint_format": "gptq_v2"},
     "quantization_config.checkpoint_format is 'gptq_v2'; this runtime reads GPTQ (v1) zero points"),
    ({"extra_config": {"layers.0.mlp.down_proj": {"bits": 8}}},
     "quantization_config.extra_config['layers.0.mlp.down_proj'] is {'bits': 8}"),
])
def test_unsupported_configs_are_refused_naming_the_field(sym_copy, capsys, tmp_path, changes, expected):
    edit_quantization_config(sym_copy, **changes)
    with pytest.raises(NextStepError) as refused:
        ModelFolder.open(sym_copy)
    assert expected in str(refused.value) and str(sym_copy / "config.json") in str(refused.value)
    assert expected in cli_error(capsys, tmp_path, "--prompt", "a fox", model=sym_copy)


@pytest.mark.parametrize("changes,expected", [
    ({"extra_config": {"layers.1.self_attn.q_proj": "bits 16"}},
     "quantization_config.extra_config['layers.1.self_attn.q_proj'] is 'bits 16'; each entry must be a JSON object"),
    ({"extra_config": {"image_in_projector": {"bits": "16"}}},
     "quantization_config.extra_config['image_in_projector'].bits is '16'; it must be a whole number"),
    ({"extra_config": {"lm_head": {"bits": 16, "data_type": ["float"]}}},
     "quantization_config.extra_config['lm_head'].data_type is ['float']; it must be a text"),
    ({"extra_config": [["lm_head", 16]]}, "quantization_config.extra_config is [['lm_head', 16]]; it must be a JSON"),
    ({"packing_format": {"name": "auto_round"}}, "quantization_config.packing_format is {'name': 'auto_round'}; it "
                                                 "must be a text"),
    ({"bits": 4.0}, "quantization_config.bits is 4.0; it must be a whole number"),
    ({"bits": "4"}, "quantization_config.bits is '4'; it must be a whole number"),
    ({"group_size": True}, "quantization_config.group_size is True; it must be a whole number"),
    ({"quant_method": "gptq", "checkpoint_format": 2}, "quantization_config.checkpoint_format is 2; it must be a text"),
    ({"desc_act": "false"}, "quantization_config.desc_act is 'false'; it must be true or false"),
    ({"sym": 1}, "quantization_config.sym is 1; it must be true or false"),
])
def test_fields_of_the_wrong_type_are_refused_naming_them(sym_copy, capsys, tmp_path, changes, expected):
    """Issue 29, item 9: an extra_config entry that was a string or a packing_format that was a list ended in an
    AttributeError or TypeError reported as a bug, in generate and plan alike."""
    edit_quantization_config(sym_copy, **changes)
    for command in ("generate", "plan"):
        line = folder_error(capsys, tmp_path, command, sym_copy)
        assert line.startswith(f"error: {sym_copy / 'config.json'}: {expected}"), (command, line)


def test_act_order_g_idx_is_refused_naming_the_tensor(tmp_path, capsys):
    folder = community_folder("gptq-sym-g32", tmp_path / "act-order")
    name = "layers.0.self_attn.q_proj.g_idx"
    rewrite_tensors(folder, {name: folder_tensors(folder)[name].flip(0)})
    line = cli_error(capsys, tmp_path, "--prompt", "a fox", model=folder)
    assert f"{name} is not i // 32 (act-order weights)" in line


def test_zero_points_that_contradict_sym_are_refused(tmp_path, capsys):
    folder = community_folder("asym-g32", tmp_path / "asym-said-sym")
    edit_quantization_config(folder, sym=True)
    line = cli_error(capsys, tmp_path, "--prompt", "a fox", model=folder)
    assert "holds zero points other than 8 read as auto-round packing 'auto_round'" in line


def test_incomplete_packing_is_refused_naming_the_tensor(sym_copy, capsys, tmp_path):
    rewrite_tensors(sym_copy, {"layers.0.mlp.up_proj.scales": None})
    line = cli_error(capsys, tmp_path, "--prompt", "a fox", model=sym_copy)
    assert "layers.0.mlp.up_proj.qweight has no layers.0.mlp.up_proj.scales beside it" in line


@pytest.mark.parametrize("weights", ["bf16", "fp8", "int4"])
def test_convert_refuses_a_4bit_folder_with_the_reason(folders, tmp_path, weights):
    reason = "nothing to convert" if weights == "int4" else f"not the original ones, so it cannot become {weights}"
    with pytest.raises(NextStepError, match=reason):
        convert_folder(folders["sym-g32"], tmp_path / "out", weights)
    assert not (tmp_path / "out").exists()
