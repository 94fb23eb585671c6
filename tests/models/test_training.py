"""acd-train-heads: heads start as the model's head, training lowers the loss and touches only
the heads, the checkpoint reloads (and exports), resuming loses nothing, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.errors import ConfigurationError, DataError, UnknownExitError
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.models.training import HeadTrainingOptions, load_for_training, main, train_heads
from autocontrast.models.training_data import (
    IGNORE_INDEX,
    PairCollator,
    chunk_tokens,
    encode_pair,
    read_text_files,
)

LAYERS = (1, 3)
FAST = dict(block_size=32, batch_size=2, max_steps=6, learning_rate=1e-2, logging_steps=1, save_steps=2)


@pytest.fixture(scope="module")
def text_file(wikitext_sample) -> Path:
    return wikitext_sample(20_000)



@pytest.fixture(scope="module")
def trained(plain_llama, text_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("trained") / "heads"
    train_heads(plain_llama, output, layers=LAYERS, data_files=[text_file], options=HeadTrainingOptions(**FAST))
    return output


def _blocks(model_dir: Path, text_file: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from autocontrast.models.training_data import tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return chunk_tokens(tokenize_texts(tokenizer, [text_file.read_text()]), block_size=32)[:16]


def _summed_head_loss(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


def test_new_heads_start_as_copies_of_the_models_own_head(plain_llama):
    model = load_for_training(plain_llama, LAYERS)
    for layer in LAYERS:
        head = model.name_to_lm_exit_head[f"lm_head_{layer}"].weight
        assert torch.equal(head, model.lm_head.weight)
        assert head.data_ptr() != model.lm_head.weight.data_ptr()  # a copy, not tied to the shared head


def test_only_exit_heads_are_trainable(plain_llama):
    model = load_for_training(plain_llama, LAYERS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"name_to_lm_exit_head.lm_head_{layer}.weight" for layer in LAYERS}


def test_training_lowers_the_summed_head_loss(plain_llama, trained, text_file):
    blocks = _blocks(plain_llama, text_file)
    before = _summed_head_loss(load_for_training(plain_llama, LAYERS).eval(), blocks)
    after_model = AutoMultiExitModel.from_pretrained(
        trained, MultiExitConfiguration(vocab_projection_mode=VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION))
    after = _summed_head_loss(after_model, blocks)
    assert after < before - 0.1, (before, after)


def test_training_changes_the_heads_and_nothing_else(plain_llama, trained):
    base = load_file(str(plain_llama / "model.safetensors"))
    result = load_file(str(trained / "model.safetensors"))
    heads = {f"name_to_lm_exit_head.lm_head_{layer}.weight" for layer in LAYERS}
    assert set(result) - set(base) == heads
    for name, tensor in base.items():
        if name in result:
            assert torch.equal(result[name], tensor), f"{name} changed"
    shared = result.get("lm_head.weight", result["model.embed_tokens.weight"])
    for name in heads:
        assert not torch.equal(result[name], shared), f"{name} was not trained"


def test_trained_checkpoint_is_in_the_original_format_and_reloads(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["lm_head_layer_indices"] == list(LAYERS)
    model = AutoMultiExitModel.from_pretrained(trained, MultiExitConfiguration(
        vocab_projection_mode="LAYER_SPECIFIC_PROJECTION", use_original_head=False, contrast_layer_indices="3;1"))
    assert model.available_exits == (1, 3, "original")
    assert (trained / "tokenizer.json").is_file()


def test_trained_checkpoint_exports_and_generates_in_the_runtime_like_pytorch(trained, tmp_path):
    from autocontrast.export.exporter import ExportOptions, export_bundle
    from autocontrast.runtime import Generator

    result = export_bundle(trained, tmp_path / "bundle", options=ExportOptions(validation_steps=2), log=lambda _: None)
    assert set(LAYERS) <= set(result.manifest.exits)
    mec = MultiExitConfiguration(vocab_projection_mode="LAYER_SPECIFIC_PROJECTION", use_original_head=False,
                                 contrast_layer_indices="3;1")
    prompt = [1, 450, 231, 404, 302]  # ids within the tiny vocabulary
    runtime = Generator(result.path).generate([prompt], multi_exit=mec, max_new_tokens=6, ignore_eos=True)
    model = AutoMultiExitModel.from_pretrained(trained, mec)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert runtime.token_ids[0] == expected[0, len(prompt):].tolist()


def test_resuming_an_interrupted_run_gives_the_uninterrupted_result(plain_llama, trained, text_file, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise KeyboardInterrupt

    output = tmp_path / "heads"
    with pytest.raises(KeyboardInterrupt):
        train_heads(plain_llama, output, layers=LAYERS, data_files=[text_file], options=HeadTrainingOptions(**FAST),
                    callbacks=[Interrupt()])
    assert not (output / "model.safetensors").exists()
    train_heads(plain_llama, output, layers=LAYERS, data_files=[text_file], options=HeadTrainingOptions(**FAST),
                resume=True)
    resumed, straight = load_file(str(output / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    for layer in LAYERS:
        name = f"name_to_lm_exit_head.lm_head_{layer}.weight"
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)


def test_output_of_an_earlier_run_is_not_overwritten_without_resume(plain_llama, trained, text_file):
    with pytest.raises(ConfigurationError, match="--resume"):
        train_heads(plain_llama, trained, layers=LAYERS, data_files=[text_file])


def test_missing_data_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text_files([tmp_path / "nope.txt"])


def test_empty_data_file_is_a_data_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        read_text_files([tmp_path / "empty.txt"])


def test_text_shorter_than_a_block_is_a_data_error():
    with pytest.raises(DataError, match="fewer than one block"):
        chunk_tokens([1, 2, 3], block_size=8)


def test_blocks_drop_the_remainder():
    assert chunk_tokens(list(range(10)), block_size=3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_layer_beyond_the_top_is_refused(plain_llama):
    with pytest.raises(UnknownExitError, match="outside 0..4"):
        load_for_training(plain_llama, (2, 9))


def test_base_without_a_head_to_copy_is_refused(tmp_path, smollm2_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = False
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigurationError, match="no trained vocabulary head"):
        load_for_training(tmp_path, (1,))


def test_cli_reports_bad_input_without_a_traceback(plain_llama, tmp_path, capsys):
    from autocontrast.cli_support import run_cli

    code = run_cli(main, [str(plain_llama), "--layers", "1", "--data", str(tmp_path / "missing.txt"),
                          "--output", str(tmp_path / "out")])
    assert code == 2
    assert "error: data file" in capsys.readouterr().err


def test_task_pair_masks_the_source_out_of_the_loss(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    source_ids = tokenizer("Translate: chat ->", add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(" cat", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pair = encode_pair(tokenizer, "Translate: chat ->", " cat", max_length=64)
    assert pair.input_ids == source_ids + target_ids
    assert pair.labels == [IGNORE_INDEX] * len(source_ids) + target_ids


def test_task_pair_longer_than_a_block_loses_the_start_of_its_source(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path))
    pair = encode_pair(tokenizer, "one two three four five six seven eight nine ten", " end", max_length=6)
    assert len(pair.input_ids) == 6
    assert pair.input_ids[-2:] == tokenizer(" end", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(pair.input_ids[:4]).strip().endswith("ten")


def test_pair_collator_pads_with_ignored_labels():
    from autocontrast.models.training_data import EncodedPair

    batch = PairCollator(pad_token_id=0)([EncodedPair([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedPair([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_training_on_task_pairs_lowers_the_loss_on_their_targets(plain_llama, tmp_path):
    pairs = [{"source": f"Question {i}: what follows {i}?", "target": f" {i + 1}"} for i in range(12)]
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    result = train_heads(plain_llama, tmp_path / "out", layers=(2,), task_files=[task],
                         options=HeadTrainingOptions(**{**FAST, "max_steps": 8}))
    assert result.losses[-1] < result.losses[0]


def test_trainer_arguments_pass_through_and_override_the_defaults(tmp_path):
    from autocontrast.models.training import training_arguments

    options = HeadTrainingOptions(batch_size=3, trainer_args=("--gradient_accumulation_steps", "4",
                                                              "--per_device_train_batch_size", "5"))
    args = training_arguments(options, tmp_path)
    assert (args.gradient_accumulation_steps, args.per_device_train_batch_size) == (4, 5)
    assert args.output_dir == str(tmp_path)


def test_unknown_trainer_argument_is_a_configuration_error(tmp_path):
    from autocontrast.models.training import training_arguments

    with pytest.raises(ConfigurationError, match="invalid Trainer arguments"):
        training_arguments(HeadTrainingOptions(trainer_args=("--no_such_option", "1")), tmp_path)
