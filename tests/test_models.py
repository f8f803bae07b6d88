import numpy as np
import pytest
import torch

from grasp_cli.config import load_config
from grasp_cli.errors import ConfigError
from grasp_cli.models import DataShape, build_model
from grasp_cli.models.transformer import PAD_ID
from grasp_cli.sketch import Sketcher


def test_transformer_loss_ignores_padding_and_is_causal():
    bundle = build_model(
        load_config(None, ["model.d_model=16"]).model, DataShape(seq_len=8), seed=0
    )
    tokens = torch.randint(0, 256, (2, 9))
    padded = tokens.clone()
    padded[1, 6:] = PAD_ID
    loss = bundle.loss({"tokens": padded})
    # example 1 counts only its first 5 targets: equal to the loss of the truncated sequence
    short = bundle.loss({"tokens": tokens[1:, :6]})
    assert torch.allclose(loss[1], short[0], atol=1e-5)
    # causality: changing the last input token does not change the logits before it
    logits = bundle.module(tokens[:, :-1])
    changed = tokens[:, :-1].clone()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    assert torch.allclose(bundle.module(changed)[:, :-1], logits[:, :-1], atol=1e-6)


def test_plugin_factory_is_loaded_and_sketchable():
    config = load_config(
        None,
        [
            "model.kind='plugin'",
            "model.factory='tests.plugin_model:make'",
            "model.options={width = 6}",
            "sketch.k=16",
            "surrogate.k_grid=[8, 16]",
            "sketch.projection='gaussian'",
        ],
    )
    bundle = build_model(config.model, DataShape(seq_len=8), seed=0)
    assert type(bundle.module).__name__ == "TinyBigram"
    sketch = Sketcher(bundle, config.sketch, seed=1).sketch_batch(
        {"tokens": torch.randint(0, 256, (3, 9))}
    )
    assert sketch.shape == (3, 16) and np.isfinite(sketch).all() and np.abs(sketch).sum() > 0


def test_plugin_errors_are_config_errors():
    config = load_config(None, ["model.kind='plugin'", "model.factory='tests.nope:make'"])
    with pytest.raises(ConfigError, match="cannot be imported"):
        build_model(config.model, DataShape(seq_len=8), seed=0)
    with pytest.raises(ConfigError, match="package.module:function"):
        load_config(None, ["model.kind='plugin'", "model.factory='nocolon'"])
