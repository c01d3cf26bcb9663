"""CLIP through open_clip: the ways to name its weights, and the prompt-ensemble classifier."""

from __future__ import annotations

import huggingface_hub
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP

from richkd.pipeline.clip import DEFAULT_TEMPLATES, load_clip, prompt_class_name
from richkd.pipeline.errors import UserError
from richkd.pipeline.prompts import composes_prompts, cuts_context, encode_prompts, prompt_tokens, zero_shot_classifier


def test_prompt_class_names():
    assert prompt_class_name("aquarium_fish") == "aquarium fish"
    assert prompt_class_name("sweet_pepper ") == "sweet pepper"
    assert prompt_class_name("maple tree") == "maple tree"


def test_checkpoint_file_and_local_dir_bundle_load_the_same_weights(tiny_world):
    from_file = load_clip(TINY_CLIP, str(tiny_world.clip_checkpoint))
    from_bundle = load_clip(f"local-dir:{tiny_world.clip_bundle}", None)
    for (name, a), (_, b) in zip(from_file.model.state_dict().items(), from_bundle.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(from_file.checkpoint_sha256) == 64 and len(from_bundle.checkpoint_sha256) == 64
    assert from_file.image_size == (40, 40)
    assert from_file.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_zero_shot_classifier_averages_normalised_prompt_embeddings(tiny_world):
    clip = load_clip(TINY_CLIP, str(tiny_world.clip_checkpoint))
    names = ["apple", "maple tree", "sweet pepper"]
    class_embeds, prompt_embeds = zero_shot_classifier(clip, names, list(DEFAULT_TEMPLATES))
    assert class_embeds.shape == (3, 32) and prompt_embeds.shape == (3, 12, 32)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        for c, name in enumerate(names):
            texts = tokenizer([template.format(name) for template in DEFAULT_TEMPLATES])
            per_prompt = F.normalize(clip.model.encode_text(texts), dim=-1)
            torch.testing.assert_close(prompt_embeds[c], per_prompt, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(class_embeds[c], F.normalize(per_prompt.mean(0), dim=0), rtol=1e-4,
                                       atol=1e-5)


# Names where putting a prompt together from its parts is, or would be, wrong: a word or punctuation run across
# the slot, contractions, digits, a special token, html and mojibake (which ftfy mends) whole or across the slot,
# and names and templates too long for the context.
TRICKY_NAMES = ["apple", "maple tree", "t-shirt", "3d printer", "o'clock", "rock 'n' roll", "dog'", "(x)", "x.",
                "<|endoftext|>", "fish &amp; chips", "caf\u00e9", "na\u00efve", "\u201cquoted\u201d", "MiXeD Case",
                "  spaced  out  ", "7", "route 66", "long " * 40, "endoftext", "&amp", "caf\u00c3"]
TRICKY_TEMPLATES = ["a photo of a {}.", "{}s in a row", "{}'s picture", "a '{}' sign", "itap of a {}!", "{}",
                    "a {}", "{}: a photo", "x{}y", "braces {{like}} these around {}", "a picture of 1{}1", "<|{}|>",
                    "{}; and more", "{}\u00a9 mojibake", "a very " * 40 + "{}", "{}" + " and so on" * 30]


def test_prompts_put_together_from_their_parts_equal_open_clip_tokenizing_them_whole():
    tokenizer = open_clip.get_tokenizer("RN50")
    assert composes_prompts(tokenizer)
    whole = tokenizer([template.format(name) for template in TRICKY_TEMPLATES for name in TRICKY_NAMES])
    assert torch.equal(prompt_tokens(tokenizer, TRICKY_NAMES, TRICKY_TEMPLATES), whole)


def test_text_tower_cut_after_the_longest_prompt_equals_open_clips_encode_text(tiny_world):
    clip = load_clip(TINY_CLIP, str(tiny_world.clip_checkpoint))
    tokens = prompt_tokens(clip.tokenizer, TRICKY_NAMES[:6], ["a photo of a {}", "{}"])
    assert cuts_context(clip.model) and tokens.argmax(dim=-1).max() < 12  # the cut leaves most of the 77 positions out
    with torch.inference_mode():
        torch.testing.assert_close(encode_prompts(clip.model, tokens), clip.model.encode_text(tokens, normalize=True),
                                   rtol=1e-5, atol=1e-6)


def test_hub_weights_need_a_connection(monkeypatch, tmp_path):
    # HF_HUB_OFFLINE=1 (set for the suite): the real hub path runs, finds the weights missing from the local
    # cache and stops at once, before open_clip's download retries and their warnings.
    weights = (r"the weights 'openai' of CLIP ViT-B-32 \(timm/vit_base_patch32_clip_224\.openai "
               r"on the Hugging Face hub\)")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=f"{weights} are not in the local cache and HF_HUB_OFFLINE is set: download "
                                        "them once with a network connection, or pass a checkpoint file"):
        load_clip("ViT-B-32", "openai")
    # Online, with a hub that does not answer (a closed port): one request, refused, and a clear error.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match=f"{weights} are not in the local cache and cannot be downloaded: "):
        load_clip("ViT-B-32", "openai")
    # A checkpoint file whose weights do not fit the architecture.
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=f"cannot load CLIP ViT-B-32 with weights {tmp_path / 'other.pt'}: "):
        load_clip("ViT-B-32", str(tmp_path / "other.pt"))


@pytest.mark.parametrize("name, pretrained, message", [
    ("ViT-Nope", "openai", "unknown CLIP model 'ViT-Nope'"),
    (TINY_CLIP, None, "--clip-pretrained is required"),
    (TINY_CLIP, "laion2b", "'laion2b' is not a pretrained tag of richkd-test-tiny"),
    ("local-dir:/nowhere", None, "cannot load CLIP local-dir:/nowhere"),
])
def test_bad_clip_names(tiny_world, name, pretrained, message):
    with pytest.raises(UserError, match=message):
        load_clip(name, pretrained)
