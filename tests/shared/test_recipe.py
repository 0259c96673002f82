"""shared.recipe: the model a config asks for, shaped by the data spec, the same on both sides."""

import pytest
import torch

from shared.config import ConfigError, RunConfig
from shared.data.federation import DataSpec, data_spec
from shared.recipe import model_from_config


def test_text_models_take_their_shape_from_config_and_spec():
    cfg = RunConfig(dataset="imdb", model="transformer-classifier", d_model=8, num_heads=2, num_layers=3, ff_dim=12)
    lm_cfg = RunConfig(dataset="shakespeare", model="char-lm", d_model=8, num_heads=2, num_layers=1)

    classifier = model_from_config(cfg, DataSpec(input_dim=20, num_classes=3, vocab_size=50))
    lm = model_from_config(lm_cfg, DataSpec(input_dim=10, num_classes=30, vocab_size=30))

    assert classifier(torch.randint(0, 50, (2, 20))).shape == (2, 3)
    assert len(classifier.blocks) == 3 and classifier.blocks[0].ff[0].out_features == 12
    assert lm(torch.randint(0, 30, (2, 25))).shape == (2, 25, 30)
    assert lm.receptive_field <= 10 and lm.blocks[0].ff[0].out_features == 32  # ff-dim 0 = 4 x d-model


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, on importing its compiler
def test_both_sides_build_the_same_weights_and_compile_keeps_them():
    cfg = RunConfig(dataset="imdb", model="transformer-classifier", d_model=8, num_heads=2, seed=3)
    spec = DataSpec(input_dim=20, num_classes=2, vocab_size=50)

    server, client = model_from_config(cfg, spec), model_from_config(cfg, spec)
    compiled = model_from_config(cfg.replace(compile=True), spec)

    expected = server.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in client.state_dict().items())
    assert list(compiled.state_dict()) == list(expected)
    assert all(torch.equal(expected[k], v) for k, v in compiled.state_dict().items())
    assert compiled._compiled_call_impl is not None and server._compiled_call_impl is None


@pytest.mark.parametrize(
    ("dataset", "cnn_hidden", "hidden", "classes"),
    [("mnist", 0, 512, 10), ("fashion-mnist", 0, 512, 10), ("femnist", 0, 2048, 62), ("mnist", 128, 128, 10)],
)
def test_cnn_is_mcmahans_or_leafs_by_dataset_unless_cnn_hidden_says(dataset, cnn_hidden, hidden, classes):
    cfg = RunConfig(dataset=dataset, model="cnn", cnn_hidden=cnn_hidden)

    model = model_from_config(cfg, data_spec(cfg))

    assert model.classifier[0].out_features == hidden
    assert model(torch.rand(2, 784)).shape == (2, classes)


def test_cnn_on_features_that_are_no_square_image_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^model 'cnn' cannot take dataset 'synthetic': .*60 input features[^\n]*$"):
        model_from_config(RunConfig(model="cnn"), DataSpec(input_dim=60, num_classes=10))
    with pytest.raises(ConfigError, match=r"^model 'cnn' cannot take dataset 'npz': .*785 input features"):
        model_from_config(RunConfig(dataset="npz", model="cnn", input_dim=785), DataSpec(785, 10))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(dataset="imdb"), "dataset 'imdb' needs model 'transformer-classifier', got 'cnn'"),
        (dict(dataset="shakespeare"), "dataset 'shakespeare' needs model 'char-lm', got 'cnn'"),
        (dict(cnn_hidden=-1), "config key 'cnn-hidden' must be >= 0, got -1"),
    ],
)
def test_cnn_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(model="cnn", **changes)
