"""vision_probe: the image tokens are those the language model receives, object features weight
them by hand-counted coverage, and the probe separates what is separable and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from star_edge.export.tiny_reasoner import write_tiny_reasoner
from star_edge.reasoner.torch_backend import TorchReasoner
from star_edge.train.object_pooling import coverage_weights, object_features
from star_edge.train.vision_probe import image_tokens, probe_accuracy


def test_image_tokens_are_what_the_language_model_receives_at_the_image_positions(tmp_path):
    section = write_tiny_reasoner(tmp_path / "r", seed=0, family="qwen3_vl")
    reasoner = TorchReasoner.from_dir(tmp_path / "r", section, dtype=torch.float32)
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    tokens = image_tokens(reasoner, image)

    from PIL import Image

    inputs = reasoner.hf_inputs(Image.fromarray(image), "find every object")
    received = {}

    def keep(module, args, kwargs):
        received["embeds"] = kwargs["inputs_embeds"].detach()

    hook = reasoner.model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            reasoner.model(**inputs)
    finally:
        hook.remove()
    at_images = received["embeds"][0][inputs["mm_token_type_ids"][0] == 1].numpy()
    patch = reasoner.model.config.vision_config.patch_size * reasoner.model.config.vision_config.spatial_merge_size
    width, height = reasoner.input_size
    assert tokens.shape == (height // patch, width // patch, at_images.shape[1])
    np.testing.assert_allclose(tokens.reshape(-1, tokens.shape[-1]), at_images, rtol=1e-5, atol=1e-5)


def test_object_features_weight_tokens_by_the_pixels_each_covers():
    tokens = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True  # the top-left cell only
    masks[1, 0, 1] = True  # one pixel in the top-left cell,
    masks[1, 0, 2:] = masks[1, 1, 2] = True  # three in the top-right one
    features = object_features(tokens, masks)
    np.testing.assert_allclose(features[0], tokens[0, 0])
    np.testing.assert_allclose(features[1], 0.25 * tokens[0, 0] + 0.75 * tokens[0, 1], rtol=1e-6)
    np.testing.assert_array_equal(coverage_weights(masks, (2, 2)), [[1, 0, 0, 0], [0.25, 0.75, 0, 0]])
    with pytest.raises(ValueError, match="object 1 has an empty mask"):
        coverage_weights(np.stack([masks[0], np.zeros((4, 4), bool)]), (2, 2))


def test_the_probe_reads_separable_labels_and_not_random_ones():
    generator = np.random.default_rng(0)
    labels = [str(v) for v in generator.integers(0, 5, 1000)]
    centres = generator.normal(0.0, 4.0, (5, 16))
    separable = centres[[int(v) for v in labels]] + generator.normal(0.0, 1.0, (1000, 16))
    scores = probe_accuracy(separable, labels)
    assert scores["classes"] == 5 and scores["held_out"] > 0.95
    noise = probe_accuracy(generator.normal(0.0, 1.0, (1000, 16)), labels)
    assert noise["held_out"] < noise["majority"] + 0.1
    with pytest.raises(ValueError, match="leaves no rows"):
        probe_accuracy(separable[:3], labels[:3], train_share=0.2)
