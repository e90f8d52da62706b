"""A tiny random CLIP written to a folder, as ``save_pretrained`` writes a hub model.

Two transformer layers of width 32 per half, 24-d projections, 32-pixel images in 8-pixel
patches and a 32-token context; a byte-level BPE vocabulary of a few hundred tokens trained
here with ``tokenizers`` in CLIP's format (``vocab.json``, ``merges.txt``, words ending in
``</w>``), and an image processor config written here too. Nothing is downloaded.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

PROJECTION = 24
CONTEXT = 32
IMAGE_SIZE = 32
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CORPUS = [
    "a red square", "a green circle", "a blue star", "a yellow square", "red", "green", "blue",
    "yellow", "a photo of a cat", "a dog in the park", "a red truck on the road", "two cats and a dog",
]


def train_bpe(folder: Path, texts: list[str], vocab_size: int = 400) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of a CLIP-style byte-level BPE trained on ``texts``.

    Every letter and digit is also trained as a word of its own, so that each has its
    word-final form (``q</w>``) and no ASCII word maps to the unknown token.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])  # fmt: skip
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    singles = " ".join(string.ascii_lowercase + string.digits)
    tok.train_from_iterator([*texts, *[singles] * 3], trainer)
    tok.model.save(str(folder))


def make_tiny_clip(folder: Path, texts: list[str] | None = None, seed: int = 0) -> Path:
    """Write a tiny random CLIP (weights, config, tokenizer, image processor) into ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    train_bpe(folder, [*CORPUS, *(texts or [])])
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(folder)
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "projection_dim": PROJECTION}  # fmt: skip
    config = CLIPConfig(
        text_config={**layers, "vocab_size": len(tokenizer), "max_position_embeddings": CONTEXT,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**layers, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=PROJECTION,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop).save_pretrained(folder)
    return folder
