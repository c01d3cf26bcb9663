"""Tests of the model zoo: mdistiller CIFAR architectures, tv:/timm: models, checkpoints."""

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from richkd.pipeline.errors import UserError
from richkd.pipeline.models import create_model, file_sha256, load_checkpoint, save_checkpoint
from richkd.pipeline.models.zoo import CIFAR_ZOO

ZOO_FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "mdistiller_cifar_zoo.json").read_text())
ARCHS = ZOO_FIXTURE["archs"]
ARCHS_WITH_OUTPUTS = [name for name, arch in ARCHS.items() if "logits" in arch]


def random_images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def eval_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(x)


def reference_weights(entries: list) -> dict[str, torch.Tensor]:
    """The fixture recipe's deterministic state_dict."""
    state = {}
    for index, (key, shape, dtype) in enumerate(entries):
        numel = math.prod(shape)
        s = torch.sin(0.7 * torch.arange(numel, dtype=torch.float64) + 0.3 * index)
        if key.endswith("num_batches_tracked"):
            value = torch.zeros(numel, dtype=torch.float64)
        elif key.endswith("running_var"):
            value = 0.5 + s**2
        elif key.endswith("running_mean"):
            value = 0.05 * s
        elif len(shape) > 1:
            value = s * math.sqrt(2 / (numel / shape[0]))
        elif key.endswith("weight"):
            value = 0.3 + 0.1 * s
        else:
            value = 0.1 * s
        state[key] = value.reshape(shape).to(getattr(torch, dtype))
    return state


def reference_input() -> torch.Tensor:
    """The fixture recipe's input batch."""
    return torch.sin(0.01 * torch.arange(4 * 3 * 32 * 32, dtype=torch.float64)).reshape(4, 3, 32, 32).float()


def test_zoo_names_are_the_fixture_architectures():
    assert sorted(CIFAR_ZOO) == sorted(ARCHS)


@pytest.mark.parametrize("name", list(ARCHS))
def test_state_dict_layout_matches_reference(name):
    with torch.device("meta"):  # layout only: skip allocating and initialising weights
        model = create_model(name, 100)
    layout = [
        [key, list(value.shape), str(value.dtype).removeprefix("torch.")] for key, value in model.state_dict().items()
    ]
    assert layout == ARCHS[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == int(ARCHS[name]["params"])


@pytest.mark.parametrize("name", ARCHS_WITH_OUTPUTS)
def test_reproduces_reference_outputs(name):
    model = create_model(name, 100)
    model.load_state_dict(reference_weights(ARCHS[name]["state_dict"]), strict=True)
    logits, pooled = eval_outputs(model, reference_input())
    tolerance = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(logits, torch.tensor(ARCHS[name]["logits"]), **tolerance)
    torch.testing.assert_close(pooled, torch.tensor(ARCHS[name]["pooled_feat"]), **tolerance)


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_contract_with_ten_classes(name):
    model = create_model(name, 10)
    logits, pooled = eval_outputs(model, random_images(2))
    assert model.num_classes == 10 and model.arch == name
    assert logits.shape == (2, 10)
    assert pooled.shape == (2, model.feature_dim)
    torch.testing.assert_close(model.get_submodule(model.classifier_name)(pooled), logits)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_model_keeps_library_keys_and_outputs(name):
    model = create_model(f"tv:{name}", 7)
    library_model = torchvision.models.get_model(name, weights=None, num_classes=7)
    assert list(model.state_dict()) == list(library_model.state_dict())
    library_model.load_state_dict(model.state_dict(), strict=True)
    x = random_images(2)
    logits, pooled = eval_outputs(model, x)
    assert logits.shape == (2, 7) and model.num_classes == 7
    assert pooled.shape == (2, model.feature_dim)
    torch.testing.assert_close(logits, eval_outputs(library_model, x))
    torch.testing.assert_close(model.get_submodule(model.classifier_name)(pooled), logits)


@pytest.mark.parametrize(("name", "image_size"), [("resnet10t", 32), ("vit_tiny_patch16_224", 224)])
def test_timm_model_keeps_library_keys_and_outputs(name, image_size):
    model = create_model(f"timm:{name}", 5)
    library_model = timm.create_model(name, pretrained=False, num_classes=5)
    assert list(model.state_dict()) == list(library_model.state_dict())
    library_model.load_state_dict(model.state_dict(), strict=True)
    x = random_images(2, image_size)
    logits, pooled = eval_outputs(model, x)
    assert logits.shape == (2, 5) and pooled.shape == (2, model.feature_dim)
    torch.testing.assert_close(logits, eval_outputs(library_model, x))
    with torch.no_grad():
        features = library_model.forward_features(x)
        torch.testing.assert_close(pooled, library_model.forward_head(features, pre_logits=True))
        torch.testing.assert_close(library_model.get_classifier()(pooled), logits)


@pytest.mark.parametrize("name, message", [
    ("tv:squeezenet1_0", "'tv:squeezenet1_0' is not supported: its classifier is not a final Linear layer"),
    ("timm:dla34", "'timm:dla34' is not supported: its classifier is not a single Linear layer"),
])
def test_library_model_without_linear_classifier_is_refused(name, message):
    with pytest.raises(UserError, match=re.escape(message)):
        create_model(name, 10)


@pytest.mark.parametrize("name, start", [
    ("resnet9", "unknown model 'resnet9': choose one of"),
    ("tv:resnet9000", "unknown torchvision classification model 'tv:resnet9000'"),
    ("timm:resnet9000", "unknown timm model 'timm:resnet9000'"),
    ("xx:resnet18", "unknown model 'xx:resnet18': choose one of"),
])
def test_unknown_model_name(name, start):
    with pytest.raises(UserError) as raised:
        create_model(name, 10)
    message = str(raised.value)
    assert message.startswith(start) and "\n" not in message
    if ":" not in name or name.startswith("xx:"):
        assert all(zoo_name in message for zoo_name in CIFAR_ZOO)
        assert "tv:" in message and "timm:" in message


@pytest.fixture
def trained_resnet8() -> nn.Module:
    """A resnet8 whose BN running statistics differ from a fresh model's."""
    model = create_model("resnet8", 10)
    with torch.no_grad():
        model.train()(random_images(8, seed=1))
    return model.eval()


def assert_same_model(loaded: nn.Module, source: nn.Module) -> None:
    for (key, value), expected in zip(loaded.state_dict().items(), source.state_dict().values(), strict=True):
        torch.testing.assert_close(value, expected, msg=key)
    x = random_images(3, seed=2)
    for got, expected in zip(eval_outputs(loaded, x), eval_outputs(source, x), strict=True):
        torch.testing.assert_close(got, expected)


def mdistiller_payload(model: nn.Module) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return {"model": model.state_dict(), "epoch": 240, "optimizer": optimizer.state_dict(),
            "best_acc": torch.tensor(77.1)}


CHECKPOINT_PAYLOADS = {
    "mdistiller": (mdistiller_payload, {"epoch": 240}),
    "plain_state_dict": (lambda model: model.state_dict(), {}),
    "state_dict_entry": (lambda model: {"state_dict": model.state_dict(), "epoch": 3}, {"epoch": 3}),
    "ddp_prefix": (lambda model: {"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, {}),
}


@pytest.mark.parametrize("payload_format", list(CHECKPOINT_PAYLOADS))
def test_checkpoint_formats_round_trip(payload_format, trained_resnet8, tmp_path):
    make_payload, expected_metadata = CHECKPOINT_PAYLOADS[payload_format]
    path = tmp_path / "ckpt.pth"
    torch.save(make_payload(trained_resnet8), path)
    loaded = create_model("resnet8", 10)
    metadata = load_checkpoint(loaded, path)
    assert_same_model(loaded, trained_resnet8)
    for key, value in expected_metadata.items():
        assert metadata[key] == value


def test_richkd_checkpoint_round_trip(trained_resnet8, tmp_path):
    path = tmp_path / "runs" / "student.pth"
    save_checkpoint(trained_resnet8, path, arch="resnet8", num_classes=10, epoch=5)
    save_checkpoint(trained_resnet8, path, arch="resnet8", num_classes=10, epoch=6)  # replaces in place
    assert [p.name for p in path.parent.iterdir()] == ["student.pth"]
    loaded = create_model("resnet8", 10)
    assert load_checkpoint(loaded, path) == {"arch": "resnet8", "num_classes": 10, "epoch": 6}
    assert_same_model(loaded, trained_resnet8)


def test_plain_torchvision_state_dict_loads_into_tv_model(tmp_path):
    library_model = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "resnet18.pth"
    torch.save(library_model.state_dict(), path)
    model = create_model("tv:resnet18", 5)
    load_checkpoint(model, path)
    x = random_images(2)
    torch.testing.assert_close(eval_outputs(model, x)[0], eval_outputs(library_model, x))


def test_file_sha256_streams_whole_file(tmp_path):
    path = tmp_path / "blob.bin"
    content = torch.randint(0, 256, (5 * 2**19 + 7,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path.write_bytes(content.numpy().tobytes())
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def load_error(model: nn.Module, path: Path) -> str:
    with pytest.raises(UserError) as raised:
        load_checkpoint(model, path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    return message


def test_load_errors_missing_and_unreadable_files(tmp_path):
    model = create_model("resnet8", 10)
    assert "no such file" in load_error(model, tmp_path / "absent.pth")
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not a checkpoint\n")
    assert "not a torch checkpoint" in load_error(model, text_file)
    no_weights = tmp_path / "metrics.pth"
    torch.save({"epoch": 3, "acc": 71.2}, no_weights)
    assert "holds no state_dict" in load_error(model, no_weights)


def test_load_error_wrong_class_count(trained_resnet8, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": trained_resnet8.state_dict()}, path)
    assert "checkpoint has 10 classes, model has 100" in load_error(create_model("resnet8", 100), path)


def test_load_error_other_architecture(trained_resnet8, tmp_path):
    richkd_path = tmp_path / "richkd.pth"
    save_checkpoint(trained_resnet8, richkd_path, arch="resnet8", num_classes=10)
    assert "'resnet8', the model is 'resnet20'" in load_error(create_model("resnet20", 10), richkd_path)

    mdistiller_path = tmp_path / "mdistiller.pth"
    torch.save({"model": trained_resnet8.state_dict()}, mdistiller_path)
    missing = load_error(create_model("resnet20", 10), mdistiller_path)
    assert "missing 72 keys (layer1.1.conv1.weight, layer1.1.bn1.weight, layer1.1.bn1.bias, ...)" in missing
    resnet20 = create_model("resnet20", 10)
    torch.save(resnet20.state_dict(), mdistiller_path)
    assert "72 unexpected keys (layer1.1.conv1.weight," in load_error(trained_resnet8, mdistiller_path)


def test_load_error_shape_mismatch(trained_resnet8, tmp_path):
    state = trained_resnet8.state_dict()
    state["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    message = load_error(create_model("resnet8", 10), path)
    assert "1 shape mismatches: conv1.weight is [16, 3, 5, 5] in the checkpoint, [16, 3, 3, 3] in the model" in message


def test_load_error_weights_that_compute_nonsense(trained_resnet8, tmp_path):
    path = tmp_path / "ckpt.pth"
    state = trained_resnet8.state_dict()
    torch.save({**state, "fc.weight": torch.full_like(state["fc.weight"], float("nan"))}, path)
    assert "1 weights hold NaN or infinite values: fc.weight" in load_error(create_model("resnet8", 10), path)
    torch.save({**state, "conv1.weight": state["conv1.weight"].long()}, path)
    assert "1 weights are not floating point: conv1.weight is torch.int64" in load_error(create_model("resnet8", 10),
                                                                                       path)
