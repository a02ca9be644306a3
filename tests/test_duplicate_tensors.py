"""A tensor stored twice (issue 29, items 11 and 13): the copy the shard index names is the one loaded, planned and
converted; where the index names none or both (or there is no index), the folder is refused, naming the tensor and
both places. A layer stored both GPTQ-packed and as a float weight is refused, naming both and the shape the config
implies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_runs import folder_error
from community_folders import community_folder, rewrite_tensors
from model_folders import copy_model, rewrite_weights
from safetensors.torch import load_file, save_file

from nextstep_runtime import NextStepError, NextStepPipeline
from nextstep_runtime.memory.footprint import ModelFootprint

TENSOR = "image_in_projector.weight"
"""A tensor of the tiny model whose copies are told apart (different values) in these tests."""


def shards_with_a_second_copy(folder: Path, key: str) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """The model in two shards, TENSOR in the first as index and weights have it, and a different copy under `key`
    in the second (the index left as it was). Returns both shards and both copies."""
    rewrite_weights(folder, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = folder / index["weight_map"][TENSOR]
    second = next(path for path in sorted(folder.glob("model-*.safetensors")) if path != first)
    original = load_file(first)[TENSOR]
    copy = original + 1
    save_file({**load_file(second), key: copy}, second, metadata={"format": "pt"})
    return first, second, original, copy


def places(*copies: tuple[Path, str]) -> str:
    """How the refusal names the copies: in the order of the files, as they are read."""
    return " and ".join(f"as '{key}' in {file}" for file, key in sorted(copies))


def set_index_entry(folder: Path, key: str, shard: Path) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"][key] = shard.name
    path.write_text(json.dumps(index))


def loaded(folder: Path) -> torch.Tensor:
    model = NextStepPipeline.from_pretrained(folder, device="cpu", dtype="float32").model
    return model.state_dict()[TENSOR]


@pytest.mark.parametrize("key", [TENSOR, f"model.{TENSOR}"])
def test_a_tensor_in_two_shards_is_the_copy_the_index_names(model_copy: Path, key: str) -> None:
    first, second, original, copy = shards_with_a_second_copy(model_copy, key)
    assert torch.equal(loaded(model_copy), original)  # the index names the first shard's copy
    ModelFootprint.from_folder(model_copy)  # planned alike
    set_index_entry(model_copy, TENSOR, second)
    if key == TENSOR:  # now the index names the second shard's
        assert torch.equal(loaded(model_copy), copy)
    else:  # it names the first shard for a key that is not there and nothing for model.X: neither copy
        with pytest.raises(NextStepError, match=re.escape(f"tensor {TENSOR} is stored 2 times: {places((first, TENSOR), (second, key))}, and the shard "
                                                          f"index names neither")):
            loaded(model_copy)


def test_both_copies_named_by_the_index_are_refused_in_each_command(model_copy: Path, tmp_path: Path,
                                                                    capsys) -> None:
    first, second, _, _ = shards_with_a_second_copy(model_copy, f"model.{TENSOR}")
    set_index_entry(model_copy, f"model.{TENSOR}", second)
    expected = (f"error: tensor {TENSOR} is stored 2 times: {places((first, TENSOR), (second, f'model.{TENSOR}'))}, "
                f"and the shard index names both; a model folder holds each tensor once")
    for command in ("generate", "plan", "convert"):
        assert folder_error(capsys, tmp_path, command, model_copy).startswith(expected), command
    assert not (tmp_path / "converted").exists()


@pytest.mark.parametrize("name", ["norm.weight", "layers.1.mlp.up_proj.weight"])
def test_x_and_model_x_in_one_file_are_refused(model_copy: Path, name: str) -> None:
    tensors = load_file(model_copy / "model.safetensors")
    save_file({**tensors, f"model.{name}": tensors[name] * 2}, model_copy / "model.safetensors")
    file = model_copy / "model.safetensors"
    message = re.escape(f"tensor {name} is stored 2 times: {places((file, name), (file, f'model.{name}'))}; a model "
                        f"folder holds each tensor once")
    with pytest.raises(NextStepError, match=message):
        loaded(model_copy)
    with pytest.raises(NextStepError, match=message):
        ModelFootprint.from_folder(model_copy)


@pytest.mark.parametrize("linear", ["layers.1.self_attn.k_proj", "layers.0.mlp.gate_proj"])
def test_a_layer_both_packed_and_float_is_refused_naming_both_and_the_implied_shape(tmp_path: Path, capsys,
                                                                                    linear: str) -> None:
    folder = community_folder("sym-g32", tmp_path / "both")
    reference = NextStepPipeline.from_pretrained(copy_model(tmp_path / "float"), device="cpu", dtype="float32")
    float_weight = reference.model.state_dict()[f"{linear}.weight"]
    rewrite_tensors(folder, {f"{linear}.weight": float_weight})
    shape = list(float_weight.shape)
    file = folder / "model.safetensors"
    expected = (f"{linear} is stored twice: packed ({linear}.qweight in {file}) and as the float {linear}.weight "
                f"{shape} in {file} ({folder / 'config.json'} implies the [out, in] = {shape} weight); a layer is "
                f"stored one way")
    for command in ("generate", "plan"):
        assert folder_error(capsys, tmp_path, command, folder).startswith(f"error: {expected}"), command
