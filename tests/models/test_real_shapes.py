"""`acd-random-model`: random-weight folders of real configurations, held to the published models' sizes."""

from __future__ import annotations

import json

import pytest

from autocontrast.errors import ConfigurationError
from autocontrast.models.real_shapes import REAL_SHAPES, parameter_count, shape_config, write_random_model

# parameters as the model cards and checkpoints publish them (a tied head counted once)
PUBLISHED = {"SmolLM2-135M": 134_515_008, "SmolLM2-360M": 361_821_120, "SmolLM2-1.7B": 1_711_376_384,
             "Llama-3.2-1B": 1_235_814_400, "Qwen2.5-1.5B": 1_543_714_304, "Llama-3.2-3B": 3_212_749_824}


def test_every_shape_has_a_published_size():
    assert set(PUBLISHED) == set(REAL_SHAPES)


@pytest.mark.parametrize("name", PUBLISHED)
def test_a_shape_has_the_published_models_parameter_count(name):
    assert parameter_count(name) == pytest.approx(PUBLISHED[name], rel=1e-3)


@pytest.mark.parametrize("name", PUBLISHED)
def test_a_shapes_config_names_its_architecture_and_keeps_the_borrowed_tokenizers_ids_in_range(name):
    config = shape_config(name)
    assert config.architectures == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]]
    assert config.vocab_size >= 49_152  # SmolLM2's tokenizer
    assert max(config.bos_token_id, config.eos_token_id, config.pad_token_id) < config.vocab_size


def test_a_written_folder_loads_as_the_shape_with_its_tokenizer(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write_random_model("SmolLM2-135M", tmp_path / "smollm2", log=lambda m: None)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == parameter_count("SmolLM2-135M")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert 0.015 < float(weight.detach().std()) < 0.025  # random, not zeros
    ids = AutoTokenizer.from_pretrained(folder)("The history of Paris")["input_ids"]
    assert ids and max(ids) < config["vocab_size"]


def test_an_unknown_shape_or_a_used_folder_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown shape 'GPT-5'"):
        shape_config("GPT-5")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="not empty"):
        write_random_model("SmolLM2-135M", tmp_path / "used", log=lambda m: None)
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
