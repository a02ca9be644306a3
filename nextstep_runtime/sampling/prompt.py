"""Building and tokenizing the guidance rows: caption, image-negative and text-negative prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NextStepError
from ..weights.model_folder import TOKENIZER_JSON, ModelFolder

IMAGE_TAG = "<image>"
IMAGE_AREA = "<|image_area|>"
BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"
IMAGE_PLACEHOLDER = "<|image_placeholder|>"

PROFILES = ("official", "hf")


def load_tokenizer(source: str | Path | ModelFolder):
    """The model folder's tokenizer as a fast tokenizer; nothing from the folder is executed.

    `tokenizer.json` is used when present. Without it the Qwen2 byte-level BPE (the tokenizer of every
    NextStep release) is built from vocab.json + merges.txt by transformers' own class, ignoring any
    `auto_map` in tokenizer_config.json; the special tokens come from tokenizer_config.json,
    added_tokens.json and special_tokens_map.json, so the ids are those of the tokenizer.json route."""
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast  # heavy import, deferred to first use

    folder = ModelFolder.open(source)
    has_json = folder.tokenizer_files[0].name == TOKENIZER_JSON
    tokenizer_class = PreTrainedTokenizerFast if has_json else Qwen2TokenizerFast
    try:
        tokenizer = tokenizer_class.from_pretrained(str(folder.path), local_files_only=True)
    except Exception as exc:  # tokenizers raises its own exception types for malformed files
        raise NextStepError(f"cannot load the tokenizer in {folder.path} ({exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def image_block(grid_h: int, grid_w: int) -> str:
    """The text that stands for an input image of grid_h x grid_w tokens."""
    return f"{IMAGE_AREA}{grid_h}*{grid_w}{BEGIN_OF_IMAGE}{IMAGE_PLACEHOLDER * (grid_h * grid_w)}{END_OF_IMAGE}"


@dataclass
class PromptRows:
    """Token ids of every guidance row, left-padded, with the size suffix and boi appended.

    Rows are ordered [conditional x B, image-negative x B (editing), text-negative x B]; `image_rows`
    marks the rows whose placeholders take the input image tokens.
    """

    input_ids: torch.Tensor        # [R, P] long
    attention_mask: torch.Tensor   # [R, P] long, 0 on left padding
    text_length: int               # columns before the suffix (what the goldens call caption_input_ids)
    groups: int                    # 1, 2 or 3 guidance rows per image
    image_rows: list[bool]


def guidance_groups(cfg: float, cfg_img: float, editing: bool) -> int:
    """Rows per image: 1 without guidance, 2 for text guidance, 3 for text + image guidance."""
    if cfg <= 1.0:
        return 1
    return 3 if editing and cfg_img > 1.0 else 2


def build_rows(tokenizer, caption: str, negative: str | None, positive: str | None,
               input_grids: list[tuple[int, int]], out_grid: tuple[int, int], batch: int, cfg: float,
               cfg_img: float, profile: str, boi: int) -> PromptRows:
    """Assemble the texts of every row, tokenize them together (left padding) and append the suffix."""
    tags = caption.count(IMAGE_TAG)
    if tags and not input_grids:
        raise NextStepError(f"the prompt contains {IMAGE_TAG} but no input image was given; add an image or "
                            f"remove {IMAGE_TAG}")
    if input_grids and tags != len(input_grids):
        raise NextStepError(f"an input image was given but the prompt has {tags} {IMAGE_TAG} tag(s) for "
                            f"{len(input_grids)} image(s); put {IMAGE_TAG} where the image belongs, e.g. at the start")
    conditional = caption
    for grid in input_grids:
        conditional = conditional.replace(IMAGE_TAG, image_block(*grid), 1)
    if positive:
        conditional = f"{conditional} {positive}"
    negative = negative or ""
    groups = guidance_groups(cfg, cfg_img, bool(input_grids))
    texts, image_rows = [conditional] * batch, [bool(input_grids)] * batch
    if groups == 3:
        blocks = "".join(image_block(*grid) for grid in input_grids)
        texts += [blocks + negative] * batch
        image_rows += [True] * batch
    if groups >= 2:
        texts += [negative] * batch
        image_rows += [False] * batch
    # The official pipeline prefixes BOS as text, tokenizes with the tokenizer's own special tokens, and drops
    # the size suffix's first token whenever a BOS is defined (meant for tokenizers that prepend one; when a
    # tokenizer defines BOS without prepending it, that drops <|image_area|>, and so do we). Qwen's tokenizers,
    # those of every release, define no BOS and add nothing. The hf pipeline adds nothing.
    official_bos = profile == "official" and tokenizer.bos_token is not None
    if official_bos:
        texts = [tokenizer.bos_token + text for text in texts]
    tokenizer.padding_side = "left"
    special = profile == "official"
    encoded = tokenizer(texts, add_special_tokens=special, padding=True, return_tensors="pt")
    suffix = tokenizer(f"{IMAGE_AREA}{out_grid[0]}*{out_grid[1]}", add_special_tokens=special)["input_ids"]
    suffix = suffix[1:] + [boi] if official_bos else suffix + [boi]
    suffix_ids = torch.tensor(suffix, dtype=torch.long).expand(len(texts), -1)
    input_ids = torch.cat([encoded["input_ids"], suffix_ids], dim=1)
    mask = torch.cat([encoded["attention_mask"], torch.ones_like(suffix_ids)], dim=1)
    return PromptRows(input_ids, mask, encoded["input_ids"].shape[1], groups, image_rows)
