"""ZSharpMixin on TRL's SFTTrainer: the two-pass step, TRL's per-step metrics counted once at w, TRL's card kept.

A tiny Llama and a word-level tokenizer are built from configs (offline); the data is a handful of sentences.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from readme_blocks import code_blocks

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_zsharp import ZSharpArgumentsMixin, ZSharpMixin  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "fast", "slow", "and"]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


# A one-layer Llama of width 16 over the word-level vocabulary.
TINY_LLAMA = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIAL + WORDS), num_key_value_heads=2, max_position_embeddings=32, **TINY_LLAMA
    )
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 1
    return LlamaForCausalLM(config)


def sentences() -> Dataset:
    gen = torch.Generator().manual_seed(0)
    rows = [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (6,), generator=gen).tolist()) for _ in range(16)
    ]
    return Dataset.from_dict({"text": rows})


@dataclass
class ZSharpSFTConfig(ZSharpArgumentsMixin, SFTConfig):
    """SFTConfig with the sharpness-aware options, as the README shows."""


class ZSharpSFTTrainer(ZSharpMixin, SFTTrainer):
    """SFTTrainer with the two-pass step, as the README shows."""


def config(output_dir, **overrides) -> dict:
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": 16,
        "seed": 0,
        **overrides,
    }


def counting(model_: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    model_.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_sft_takes_two_passes_and_counts_tokens_and_metrics_once_at_w(tmp_path):
    plain_model, sam_model = model(), model()
    plain = SFTTrainer(
        model=plain_model,
        args=SFTConfig(**config(tmp_path / "plain")),
        train_dataset=sentences(),
        processing_class=tokenizer(),
    )
    plain.train()
    calls = counting(sam_model)
    sam = ZSharpSFTTrainer(
        model=sam_model,
        args=ZSharpSFTConfig(**config(tmp_path / "zsharp"), sam="zsharp", sam_rho=0.05),
        train_dataset=sentences(),
        processing_class=tokenizer(),
    )
    sam.train()
    assert len(calls) == 4  # 2 steps x 2 passes
    plain_logs = [entry for entry in plain.state.log_history if "loss" in entry]
    sam_logs = [entry for entry in sam.state.log_history if "loss" in entry]
    # Tokens counted once per step, as without SAM; the first step's metrics at the same weights w, exactly.
    assert [e["num_tokens"] for e in sam_logs] == [e["num_tokens"] for e in plain_logs]
    for key in ("loss", "entropy", "mean_token_accuracy"):
        assert sam_logs[0][key] == plain_logs[0][key], key
    assert sam_logs[0]["sam_loss_increase"] > 0 and "sam_perturbation_norm" in sam_logs[0]
    assert not torch.equal(sam_model.model.embed_tokens.weight, plain_model.model.embed_tokens.weight)


def test_the_card_is_trls_with_the_zsharp_section(tmp_path):
    trainer = ZSharpSFTTrainer(
        model=model(),
        args=ZSharpSFTConfig(**config(tmp_path, max_steps=1)),
        train_dataset=sentences(),
        processing_class=tokenizer(),
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-sft-zsharp")
    card = (tmp_path / "README.md").read_text()
    assert "image" not in card.lower()  # never an image classifier: no such pipeline tag, text or snippet
    assert "trl" in card and "sft" in card  # TRL's own tags and text stay
    assert "## Sharpness-aware training" in card and "| rho (ascent radius) | 0.05 |" in card


def test_the_readme_block_builds_the_trl_classes():
    namespace: dict = {}
    for block in code_blocks("### Any `Trainer` subclass: TRL and others"):
        exec(block, namespace)
    assert issubclass(namespace["ZSharpSFTTrainer"], ZSharpMixin)
    assert issubclass(namespace["ZSharpSFTConfig"], ZSharpArgumentsMixin)
