"""hf_zsharp.models: the paper's from-scratch architectures as transformers models."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_zsharp.models import (
    PAPER_MODELS,
    CifarResNetConfig,
    CifarResNetForImageClassification,
    CifarResNetModel,
    CifarVGGConfig,
    CifarVGGForImageClassification,
    build_model,
)
from hf_zsharp.models.cifar_resnet import ZeroPadShortcut


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_models_are_listed():
    assert PAPER_MODELS == ("resnet20", "resnet56", "resnet110", "vgg16", "vgg19", "vit-paper")


@pytest.mark.parametrize(
    ("name", "millions"),
    # He et al. report 0.27M / 0.85M / 1.7M for the CIFAR ResNets; VGG-16-BN with one Linear(512, 10) has 14.7M.
    [
        ("resnet20", 0.27),
        ("resnet56", 0.85),
        ("resnet110", 1.73),
        ("vgg16", 14.73),
        ("vgg19", 20.04),
        ("vit-paper", 6.27),
    ],
)
def test_parameter_counts(name, millions):
    assert num_parameters(build_model(name, 10)) / 1e6 == pytest.approx(millions, abs=0.01)


# ResNet-56/110 and VGG-19 share the code of ResNet-20 and VGG-16 (their structure is checked by the counts).
@pytest.mark.parametrize("name", ["resnet20", "vgg16", "vit-paper"])
def test_forward_backward_shapes_and_loss(name):
    torch.manual_seed(0)
    model = build_model(name, 7)
    pixel_values = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 3, 6])
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.logits.shape == (3, 7)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.ndim > 1)
    assert model(pixel_values=pixel_values).loss is None


def test_labels_and_image_size_reach_the_config():
    id2label = {0: "cat", 1: "dog", 2: "eel"}
    model = build_model("ResNet20", 3, id2label=id2label, image_size=64)
    assert model.config.id2label == id2label and model.config.label2id == {"cat": 0, "dog": 1, "eel": 2}
    assert model.config.image_size == 64
    assert model(torch.randn(2, 3, 64, 64)).logits.shape == (2, 3)  # global pooling: any input size
    vit = build_model("vit-paper", 3, id2label=id2label, image_size=64)
    assert vit(torch.randn(2, 3, 64, 64)).logits.shape == (2, 3)


def test_vit_preset_matches_the_paper():
    model = build_model("vit-paper", 10)
    assert isinstance(model, ViTForImageClassification)
    config = model.config
    assert isinstance(config, ViTConfig)
    assert (config.image_size, config.patch_size, config.num_hidden_layers) == (32, 4, 7)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (384, 384, 12)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.0
    assert model.vit.embeddings.patch_embeddings.num_patches == 64  # 8x8 patches, plus the CLS token


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    model = build_model("resnet20", 10)
    shortcuts = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(shortcuts) == 2 and all(num_parameters(m) == 0 for m in shortcuts)


def test_blocks_per_stage_follow_depth():
    assert len(CifarResNetModel(CifarResNetConfig(depth=56)).layers) == 27
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNetConfig(depth=21)
    with pytest.raises(ValueError, match="VGG depth must be one of"):
        CifarVGGConfig(depth=17)
    with pytest.raises(ValueError, match="at least 32x32.*`--image_size 32` on the command line"):
        build_model("vgg16", 10, image_size=16)


def test_build_model_errors():
    with pytest.raises(
        ValueError, match="Unknown model 'resnet18'.*resnet20, resnet56, resnet110, vgg16, vgg19, vit-paper"
    ):
        build_model("resnet18", 10)
    with pytest.raises(ValueError, match="id2label has 2 entries but num_labels is 3"):
        build_model("resnet20", 3, id2label={0: "a", 1: "b"})


@pytest.mark.parametrize(
    ("make_config", "model_class"),
    [
        (lambda: CifarResNetConfig(depth=20, num_labels=4), CifarResNetForImageClassification),
        (lambda: CifarVGGConfig(depth=11, num_labels=4), CifarVGGForImageClassification),
    ],
    ids=["resnet", "vgg"],
)
def test_save_and_load_through_auto_classes(tmp_path, make_config, model_class):
    torch.manual_seed(0)
    model = model_class(make_config())
    model.train()
    model(torch.randn(8, 3, 32, 32))  # move the BatchNorm running statistics away from their init
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config) and config.num_labels == 4
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is model_class
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    base = AutoModel.from_pretrained(tmp_path)
    assert base(x).pooler_output.shape[0] == 2


def test_new_head_for_other_labels(tmp_path):
    """Fine-tuning a saved checkpoint on another label set replaces only the classifier."""
    model = build_model("resnet20", 10)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(
        tmp_path, num_labels=3, ignore_mismatched_sizes=True
    )
    assert loaded.classifier.out_features == 3
    torch.testing.assert_close(loaded.resnet.conv.weight, model.resnet.conv.weight)


def test_vit_paper_round_trip(tmp_path):
    model = build_model("vit-paper", 5).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_tuple_outputs_without_return_dict():
    model = build_model("resnet20", 4)
    loss, logits = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 2]), return_dict=False)
    assert logits.shape == (2, 4) and loss.ndim == 0
