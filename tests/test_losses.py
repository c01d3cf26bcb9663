"""The RichKD losses against the reference values of `richkd_loss_reference.json`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES

from richkd.pipeline.fusion import fuse_logits
from richkd.pipeline.losses import FusedCRD, dkd_loss, kd_loss

REFERENCE = json.loads((FIXTURES / "richkd_loss_reference.json").read_text())


def tensor(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_cross_entropy_and_kd_on_fused_logits():
    r = REFERENCE
    student, labels = tensor(r["student_logits"]), tensor(r["target"], torch.long)
    fused = fuse_logits([(tensor(r["teacher_logits"]), r["alpha"], 1.0),
                         (tensor(r["clip_cosine_logits"]), 1 - r["alpha"], 1.0)])
    assert F.cross_entropy(student, labels).item() == pytest.approx(r["expected"]["loss_ce"], rel=1e-6)
    loss = r["logit_weight"] * kd_loss(student, fused, r["temperature"])
    assert loss.item() == pytest.approx(r["expected"]["loss_logit"], rel=1e-6)


def test_two_crd_steps_on_fused_features():
    r = REFERENCE
    dims = {name: len(r["embed"][name]["weight"][0]) for name in ("student", "teacher", "clip")}
    crd = FusedCRD(dims["student"], {"teacher": dims["teacher"], "clip": dims["clip"]},
                   {"teacher": r["alpha"], "clip": 1 - r["alpha"]}, num_data=r["num_data"], embed_dim=r["feat_dim"],
                   nce_temperature=r["nce_temperature"], momentum=r["nce_momentum"])
    with torch.no_grad():
        for name, embed in (("student", crd.embed_student), *crd.embeds.items()):
            embed.linear.weight.copy_(tensor(r["embed"][name]["weight"]))
            embed.linear.bias.copy_(tensor(r["embed"][name]["bias"]))
        crd.memory.memory_v1.copy_(tensor(r["memory_init"]["memory_v1"]))
        crd.memory.memory_v2.copy_(tensor(r["memory_init"]["memory_v2"]))
    for step in r["crd_steps"]:
        features = {"teacher": tensor(step["f_t"]), "clip": tensor(step["f_c"])}
        loss = r["feature_weight"] * crd(tensor(step["f_s"]), features, tensor(step["index"], torch.long),
                                         tensor(step["contrast_index"], torch.long))
        assert loss.item() == pytest.approx(step["loss_feature"], rel=1e-5)
        assert crd.memory.Z_v1.item() == pytest.approx(step["Z_v1"], rel=1e-5)
        assert crd.memory.Z_v2.item() == pytest.approx(step["Z_v2"], rel=1e-5)
    torch.testing.assert_close(crd.memory.memory_v1, tensor(r["memory_after"]["memory_v1"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crd.memory.memory_v2, tensor(r["memory_after"]["memory_v2"]), rtol=1e-5, atol=1e-6)


def test_dkd_against_its_definition():
    """DKD = alpha * KL of (label, rest) binaries + beta * KL among the non-label classes, times T^2."""
    generator = torch.Generator().manual_seed(0)
    student, target = torch.randn(6, 10, generator=generator), torch.randn(6, 10, generator=generator) * 3
    labels = torch.randint(0, 10, (6,), generator=generator)
    T = 4.0
    total = 0.0
    for s, t, y in zip(student, target, labels):
        ps, pt = F.softmax(s / T, dim=0), F.softmax(t / T, dim=0)
        bs, bt = torch.stack([ps[y], 1 - ps[y]]), torch.stack([pt[y], 1 - pt[y]])
        tckd = (bt * (bt / bs).log()).sum()
        rest = torch.arange(10) != y
        qs, qt = F.softmax(s[rest] / T, dim=0), F.softmax(t[rest] / T, dim=0)
        nckd = (qt * (qt / qs).log()).sum()
        total += (1.0 * tckd + 8.0 * nckd) * T**2
    expected = total / 6
    assert dkd_loss(student, target, labels, 1.0, 8.0, T).item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("bank_size", [50, 5000])  # scored whole (50 < 8 x 33) or gathered row by row
def test_memory_similarities_either_way(bank_size):
    from richkd.pipeline.losses import ContrastMemory

    generator = torch.Generator().manual_seed(0)
    memory, values = torch.randn(bank_size, 16, generator=generator), torch.randn(8, 16, generator=generator)
    contrast_index = torch.randint(0, bank_size, (8, 33), generator=generator)
    expected = torch.einsum("bkd,bd->bk", memory[contrast_index], values)
    torch.testing.assert_close(ContrastMemory._similarities(memory, values, contrast_index), expected)


def test_crd_loads_the_embeddings_of_a_checkpoint_from_before_sources_had_names():
    """Runs checkpointed when the embeddings were `embed_teacher` and `embed_clip` resume with them."""
    def crd(seed: int) -> FusedCRD:
        torch.manual_seed(seed)
        return FusedCRD(6, {"teacher": 5, "clip": 4}, {"teacher": 0.7, "clip": 0.3}, num_data=10, embed_dim=3)

    saved = {key.replace("embeds.", "embed_"): value for key, value in crd(0).state_dict().items()}
    assert "embed_teacher.linear.weight" in saved
    resumed = crd(1)
    resumed.load_state_dict(saved)
    for key, value in crd(0).state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
