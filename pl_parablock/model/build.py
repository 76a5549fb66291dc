"""Building and loading causal LMs and their tokenizers, offline, with optional LoRA.

A model built from a config (``model.config``) gets the project's offline
byte-level tokenizer: 256 byte tokens plus ``<|pad|>``, ``<|bos|>`` and
``<|eos|>``, with no file to download. A model loaded from a local directory
(``model.path``: any Hugging Face causal LM, e.g. the Llama, Qwen2, Mistral
and GPT-2 families) gets the tokenizer saved in that directory unless
``model.tokenizer`` names another. Nothing here reaches a hub.

With ``model.peft.method`` set, the base model is frozen and wrapped by
``peft`` with LoRA adapters, initialised from the seed so that every client
of a federation builds the same ones: ``lora`` trains both adapter matrices,
``ffa_lora`` (FFA-LoRA) freezes ``A`` at its random initialisation and trains
only ``B``. Blocks then form over the trainable adapter tensors only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer, decoders
from tokenizers import models as tk_models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pl_parablock.core.tensors import PARAMETER_DTYPES as DTYPES
from pl_parablock.errors import ModelError

if TYPE_CHECKING:
    from pl_parablock.recipe.schema import ModelSection, PeftSection

__all__ = ["DTYPES", "apply_peft", "build_base_model", "build_model", "load_tokenizer", "offline_tokenizer", "save_merged"]

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def offline_tokenizer() -> PreTrainedTokenizerBase:
    """The project's byte-level tokenizer: any UTF-8 text, 259 tokens, no download.

    Example::

        >>> tok = offline_tokenizer()
        >>> tok.decode(tok("12 + 7 = 19")["input_ids"])
        '12 + 7 = 19'
    """
    specials = [PAD, BOS, EOS]
    vocab = {s: i for i, s in enumerate(specials)}
    for _b, ch in sorted(_bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(tk_models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A tokenizer saved in a local directory, with a pad token.

    Raises:
        ModelError: no loadable tokenizer there.
    """
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"no tokenizer could be loaded from {path!r} ({str(exc).splitlines()[0]}); "
            "save one there with tokenizer.save_pretrained or set model.tokenizer to a tokenizer directory"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(section: ModelSection, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM (with its LoRA adapters, if any) and tokenizer a recipe's ``model`` section describes.

    Built models and adapters are initialised from ``seed``, so every client
    of a federation builds the same weights.

    Raises:
        ModelError: unknown model type, bad config, unloadable checkpoint, adapters that do not fit the model.
    """
    model, tokenizer = build_base_model(section, seed)
    if section.peft.method is not None:
        model = apply_peft(model, section.peft, seed)
    return model, tokenizer


def apply_peft(model: PreTrainedModel, section: PeftSection, seed: int = 0) -> Any:
    """Wrap ``model`` with LoRA adapters (``peft``); the base weights are frozen.

    Args:
        model: the base causal LM.
        section: the recipe's ``model.peft``; ``method`` is ``lora`` or ``ffa_lora``.
        seed: seed of the adapters' initialisation.

    Returns:
        A ``peft.PeftModel`` whose trainable parameters are the adapters
        (only the ``lora_B`` ones for ``ffa_lora``).

    Raises:
        ModelError: unknown method, or target modules the model does not have.
    """
    from peft import LoraConfig, get_peft_model

    if section.method not in ("lora", "ffa_lora"):
        raise ModelError(f"model.peft.method={section.method!r}; use lora or ffa_lora")
    target = section.target_modules
    config = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=list(target) if isinstance(target, (list, tuple)) else target,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        hint = "" if target else "; name them with model.peft.target_modules (e.g. [q_proj, v_proj]) or 'all-linear'"
        raise ModelError(f"cannot add LoRA adapters (model.peft): {str(exc).splitlines()[0]}{hint}") from None
    if section.method == "ffa_lora":
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return peft_model


def save_merged(
    section: ModelSection, seed: int, adapter_dir: str, directory: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> None:
    """Save the base model with a saved adapter merged in, as a plain Hugging Face model.

    The base is built again (on the CPU) exactly as :func:`build_model` built
    it, the adapter in ``adapter_dir`` is loaded onto it with
    ``PeftModel.from_pretrained`` and merged with ``merge_and_unload``; the
    result (and ``tokenizer``) goes to ``directory``, loadable with
    ``AutoModelForCausalLM.from_pretrained``.
    """
    from peft import PeftModel

    base, _ = build_base_model(section, seed)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_base(section: ModelSection, seed: int, adapter_dir: str, directory: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Save the base of an adapter built from ``model.config`` next to it and point the adapter at it.

    A model built from a config has no name or path, so its adapter's
    ``base_model_name_or_path`` would be null and it would load nowhere. The
    base is built again exactly as :func:`build_model` built it, saved in
    ``directory`` (with ``tokenizer``), and the adapter's config in
    ``adapter_dir`` is rewritten to name it (absolute path), so
    ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` loads both.
    Returns the base's absolute path.
    """
    import json

    base, _ = build_base_model(section, seed)
    base.config.use_cache = True
    base.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    path = os.path.abspath(directory)
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["base_model_name_or_path"] = path
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(config_path + ".tmp", config_path)
    return path


def build_base_model(section: ModelSection, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer of a recipe's ``model`` section, without adapters.

    Built models are initialised from ``seed``, so every client of a
    federation builds the same weights.

    Raises:
        ModelError: unknown model type, bad config, unloadable checkpoint.
    """
    dtype = DTYPES[section.dtype]
    if section.config is not None:
        tokenizer = load_tokenizer(section.tokenizer) if section.tokenizer else offline_tokenizer()
        cfg: dict[str, Any] = dict(section.config)
        model_type = str(cfg.pop("model_type"))
        cfg.setdefault("vocab_size", len(tokenizer))
        if cfg["vocab_size"] < len(tokenizer):
            raise ModelError(f"model.config.vocab_size={cfg['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
        cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
        cfg.setdefault("bos_token_id", tokenizer.bos_token_id)
        cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except ValueError as exc:
            if "Unrecognized model identifier" in str(exc):
                raise ModelError(
                    f"model.config.model_type={model_type!r} is not a transformers model type (e.g. llama, qwen2, mistral, gpt2)"
                ) from None
            raise ModelError(f"model.config is not a valid {model_type} config: {exc}") from None
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, TypeError) as exc:
            raise ModelError(f"cannot build a causal LM from model.config ({model_type}): {exc}") from None
    else:
        assert section.path is not None
        if not os.path.isfile(os.path.join(section.path, "config.json")):
            raise ModelError(f"model.path {section.path!r} holds no config.json; save a model there with save_pretrained")
        try:
            model = AutoModelForCausalLM.from_pretrained(section.path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a causal LM from model.path {section.path!r}: {str(exc).splitlines()[0]}") from None
        tokenizer = load_tokenizer(section.tokenizer or section.path)
    model.config.use_cache = False
    model.train()  # from_pretrained returns a model in eval mode, and Lightning keeps the mode it is given
    if section.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x renamed it
        if callable(enable):
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer
