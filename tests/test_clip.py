"""CLIP score through open_clip with a tiny random model built from a config (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from bench.errors import AvailabilityError
from bench.metrics.clip import CLIP_SCORE, clip_scores, load_clip
from bench.spec import Evaluation


@pytest.fixture
def clip(tiny_clip):
    name, path = tiny_clip
    return load_clip(name, path, "cpu")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


PROMPTS = ["a cat", "a dog on a bike", "red", "blue sky", "x", "a photo of a car"]


def test_score_is_100_cosine_clipped_at_zero_per_image(clip):
    import open_clip

    model, preprocess, tokenizer = clip
    batch = images(6)
    ours = clip_scores(batch, PROMPTS, model, preprocess, tokenizer, torch.device("cpu"), batch_size=4)
    # The same quantity from open_clip's forward (normalised features) and torch's cosine.
    pixels = torch.stack([preprocess(TF.to_pil_image(img)) for img in batch])
    with torch.no_grad():
        image, text, _ = model(pixels, open_clip.tokenize(PROMPTS))
    expected = (100 * torch.nn.functional.cosine_similarity(image, text)).clamp(min=0)
    assert torch.allclose(ours, expected, atol=1e-4)
    assert (ours == 0).any() and (ours > 0).any()  # the clip at zero is exercised


def test_local_checkpoint_loads_the_saved_weights(tiny_clip, clip):
    import open_clip

    name, _ = tiny_clip
    torch.manual_seed(1)  # other random weights than the saved checkpoint's
    random_model = open_clip.create_model(name, pretrained=None)
    model, preprocess, tokenizer = clip
    args = (images(4), PROMPTS[:4])
    saved = clip_scores(*args, model, preprocess, tokenizer, torch.device("cpu"))
    other = clip_scores(*args, random_model.eval(), preprocess, tokenizer, torch.device("cpu"))
    assert not torch.allclose(saved, other)
    with pytest.raises(ValueError, match=r"clip_pretrained /no/such\.pt: no such file"):
        load_clip(name, "/no/such.pt", "cpu")


def test_mismatched_inputs_are_a_clear_error(clip):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_scores(images(3), PROMPTS[:2], *clip, torch.device("cpu"))
    with pytest.raises(ValueError, match="must be uint8"):
        clip_scores(torch.rand(2, 3, 16, 16), PROMPTS[:2], *clip, torch.device("cpu"))


def test_named_weights_offline_are_unavailable_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        AvailabilityError, match=r"ViT-B-32/openai are not available offline.*clip_pretrained: /path"
    ):
        load_clip("ViT-B-32", "openai", "cpu")


def test_unknown_model_is_caught_when_the_matrix_loads():
    assert "unknown clip_model 'ViT-B-99'" in CLIP_SCORE.check(Evaluation(clip_model="ViT-B-99"))
    assert CLIP_SCORE.check(Evaluation()) is None
