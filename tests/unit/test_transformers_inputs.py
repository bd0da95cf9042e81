"""Example inputs for a model rebuilt with transformers: a vision config may give
``image_size`` as [height, width] (trial: ``int([32, 32])`` was an InternalError)."""

from __future__ import annotations

import pytest

from kquant_api import Reason
from kquant_job.errors import PassError
from kquant_job.passes.transformers_export import example_inputs


def _vit(image_size: object):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=37)  # fmt: skip
    model = ViTModel(config).eval()
    model.config.image_size = image_size
    return model


@pytest.mark.parametrize(("size", "shape"), [(32, (1, 3, 32, 32)), ([32, 48], (1, 3, 32, 48))])
def test_image_size_is_an_int_or_height_and_width(size: object, shape: tuple) -> None:
    assert tuple(example_inputs(_vit(size), 16)["pixel_values"].shape) == shape


@pytest.mark.parametrize("size", [[32], [8, 16, 32]])
def test_another_image_size_is_refused_with_the_reason(size: object) -> None:
    with pytest.raises(PassError, match="image_size") as err:
        example_inputs(_vit(size), 16)
    assert err.value.reason is Reason.ConversionFailed


def test_a_config_far_larger_than_its_weights_is_a_corrupt_model(tmp_path) -> None:
    """Trial: vocab_size 2**33 beside small weights; transformers allocated the model first
    and the run ended in MemoryLimitExceeded, naming the pod's memory."""
    import json

    from corpus.hf import bert

    from kquant_job.hf_folder import read_hf_folder
    from kquant_job.passes.transformers_export import load_model

    folder = bert(tmp_path / "bert")
    hf = read_hf_folder(folder)
    assert hf is not None and load_model(folder, hf).config.vocab_size == 1000  # it loads
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 2**33}))
    with pytest.raises(PassError, match="describes a BertModel of") as info:
        load_model(folder, read_hf_folder(folder))
    assert info.value.reason is Reason.CorruptModel
