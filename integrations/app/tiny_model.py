"""A tiny, randomly initialised causal LM and its word-level tokenizer, built offline for quick local runs.

The tokenizer knows only digits, arithmetic symbols, a few words and the four tags of the paper's template
(``<think>``, ``</think>``, ``<answer>``, ``</answer>``, each a single, ordinary token so that decoding with
``skip_special_tokens=True`` keeps them). Spaces and newlines are tokens too, and decoding concatenates the pieces,
so ``decode(encode(text)) == text`` for any text written with the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

__all__ = [
    "SPECIAL_TOKENS",
    "TAG_TOKENS",
    "VOCABULARY",
    "build_or_load_tiny",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "is_tiny_folder",
    "load_tiny",
    "load_tiny_tokenizer",
    "mark_tiny_folder",
    "save_tiny",
    "tiny_recipe",
]

MARKER_FILE = "tiny_model.json"  # written beside the weights; tells loaders to use the plain fast tokenizer
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
_DIGITS = tuple("0123456789")
_SYMBOLS = ("+", "-", "=", "*", "/", "?", ".", ",", ":", "(", ")", " ", "\n")
_WORDS = ("What", "is", "the", "answer", "Compute", "Solve", "so", "plus", "minus", "equals", "think", "I", "It")
VOCABULARY = SPECIAL_TOKENS + TAG_TOKENS + _DIGITS + _SYMBOLS + _WORDS

# Tags first (so "<think>" is not split into "<", "think", ">"), then words, single digits and single characters.
_PIECES = Regex(r"</?think>|</?answer>|<(?:pad|bos|eos|unk)>|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]")


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over :data:`VOCABULARY`: left padding, ``<bos>`` prepended, ``<eos>`` ends text."""
    vocab = {token: index for index, token in enumerate(VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(_PIECES, behavior="isolated")
    backend.decoder = decoders.Fuse()  # pieces carry their own spaces: concatenate them as they are
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation appends on the right of every prompt in a batch
        truncation_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized for ``tokenizer`` (reproducible for a given ``seed``)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # The seed is set locally so that building the model does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: str | Path,
              recipe: dict | None = None) -> Path:
    """Saves model and tokenizer side by side, plus :data:`MARKER_FILE` (with ``recipe``: everything that determined
    the weights, see :func:`tiny_recipe`); load them with :func:`load_tiny`."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return mark_tiny_folder(folder, model.config, recipe)


def mark_tiny_folder(folder: str | Path, config: Qwen2Config, recipe: dict | None = None) -> Path:
    """Writes :data:`MARKER_FILE` into a folder that holds a tiny model and its tokenizer (saved by any means, e.g.
    ``Trainer.save_model``), so that :func:`load_tiny` and ``fused-gates-evaluate`` recognise it."""
    folder = Path(folder)
    marker = {"vocabulary": list(VOCABULARY), "hidden_size": config.hidden_size,
              "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads}
    if recipe is not None:
        marker["recipe"] = recipe
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    return folder


def tiny_recipe(folder: str | Path) -> dict | None:
    """The recipe recorded with a tiny model (None when the folder holds none, or a model saved without one)."""
    marker = Path(folder) / MARKER_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("recipe")
    except (ValueError, AttributeError):
        return None


def is_tiny_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model written by :func:`save_tiny`."""
    return (Path(folder) / MARKER_FILE).is_file()


def load_tiny_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer :func:`save_tiny` wrote.

    Loaded as a plain fast tokenizer on purpose: ``AutoTokenizer`` would pick ``Qwen2Tokenizer`` from the model
    config beside it and rebuild a byte-level pipeline that does not match this vocabulary.
    """
    return PreTrainedTokenizerFast.from_pretrained(folder)


def load_tiny(folder: str | Path) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Loads what :func:`save_tiny` wrote."""
    return AutoModelForCausalLM.from_pretrained(folder), load_tiny_tokenizer(folder)


def build_or_load_tiny(folder: str | Path, *, seed: int = 0) -> Path:
    """The folder of a tiny model: built and saved there unless it already holds one."""
    folder = Path(folder)
    if not is_tiny_folder(folder):
        tokenizer = build_tiny_tokenizer()
        save_tiny(build_tiny_model(tokenizer, seed=seed), tokenizer, folder)
    return folder
