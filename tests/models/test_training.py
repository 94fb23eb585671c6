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


# -- distillation from the top layer (--objective kl) and self-sampled text (--self-sample) ----------

KL_FAST = dict(FAST, batch_size=4, max_steps=10, learning_rate=3e-3, objective="kl")


def _reference_kl(top: torch.Tensor, heads: list[torch.Tensor]) -> torch.Tensor:
    """sum over heads of mean-over-positions KL(softmax(top) || softmax(head)), by torch's kl_div in float64."""
    target = torch.log_softmax(top.detach().double(), dim=-1).flatten(0, -2)  # (positions, vocab)
    return sum(torch.nn.functional.kl_div(torch.log_softmax(h.double(), dim=-1).flatten(0, -2), target,
                                          log_target=True, reduction="batchmean") for h in heads)


def test_distillation_loss_and_its_gradient_match_torch_kl_div():
    from autocontrast.models.training import distillation_loss

    generator = torch.Generator().manual_seed(0)
    top = torch.randn(2, 5, 50, generator=generator) * 3
    heads = [(torch.randn(2, 5, 50, generator=generator) * 3).requires_grad_() for _ in range(2)]
    references = [h.detach().double().requires_grad_() for h in heads]
    top.requires_grad_()

    loss, expected = distillation_loss(top, heads), _reference_kl(top, references)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for head, reference in zip(heads, references, strict=True):
        torch.testing.assert_close(head.grad.double(), reference.grad, rtol=1e-4, atol=1e-7)
    assert top.grad is None  # the top layer is the fixed teacher


def test_distillation_loss_is_zero_for_the_top_itself_and_finite_where_the_top_rules_a_token_out():
    from autocontrast.models.training import distillation_loss

    top = torch.tensor([[0.5, -1.0, float("-inf"), 2.0]])
    assert float(distillation_loss(top, [top.clone()])) == pytest.approx(0.0, abs=1e-7)
    head = torch.tensor([[0.0, 0.0, 5.0, 0.0]])
    p = torch.softmax(top, dim=-1)[0, [0, 1, 3]]
    q = torch.softmax(head, dim=-1)[0, [0, 1, 3]]
    assert float(distillation_loss(top, [head])) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)


@pytest.fixture(scope="module")
def distilled(plain_llama, text_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("distilled") / "heads"
    train_heads(plain_llama, output, layers=LAYERS, data_files=[text_file], options=HeadTrainingOptions(**KL_FAST))
    return output


def _held_out_blocks(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from autocontrast.data import wikitext_path
    from autocontrast.models.training_data import tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = wikitext_path("test").read_text(encoding="utf-8")[:20_000]  # training read the validation split
    return chunk_tokens(tokenize_texts(tokenizer, [text]), block_size=32)[:16]


def _logits(model_dir: Path, blocks: torch.Tensor, **config) -> torch.Tensor:
    model = AutoMultiExitModel.from_pretrained(model_dir, MultiExitConfiguration(**config))
    with torch.no_grad():
        return model(input_ids=blocks).logits


def test_kl_training_brings_each_head_closer_to_the_top_layer_on_held_out_text(plain_llama, distilled):
    blocks = _held_out_blocks(plain_llama)
    top = _logits(plain_llama, blocks, vocab_projection_mode="SHARED_PROJECTION_DIRECT")
    fresh = load_for_training(plain_llama, LAYERS).eval()
    with torch.no_grad():
        outputs = fresh(input_ids=blocks, output_hidden_states=True)
        copies = fresh.exit_logits(LAYERS, outputs.logits, outputs.hidden_states)
    for layer in LAYERS:
        # an untrained head is a copy of the model's own head: the direct projection of the layer
        untrained = _logits(plain_llama, blocks, vocab_projection_mode="SHARED_PROJECTION_DIRECT",
                            use_original_head=False, output_layer_index=layer)
        torch.testing.assert_close(copies[layer], untrained)
        trained = _logits(distilled, blocks, vocab_projection_mode="LAYER_SPECIFIC_PROJECTION",
                          use_original_head=False, output_layer_index=layer)
        before, after = float(_reference_kl(top, [untrained])), float(_reference_kl(top, [trained]))
        assert after < 0.9 * before, (layer, before, after)


def test_kl_training_keeps_the_base_and_the_checkpoint_format(plain_llama, distilled):
    base = load_file(str(plain_llama / "model.safetensors"))
    result = load_file(str(distilled / "model.safetensors"))
    assert set(result) - set(base) == {f"name_to_lm_exit_head.lm_head_{layer}.weight" for layer in LAYERS}
    assert all(torch.equal(result[name], tensor) for name, tensor in base.items() if name in result)
    assert json.loads((distilled / "config.json").read_text())["lm_head_layer_indices"] == list(LAYERS)


def test_self_sampled_blocks_have_the_block_shape_and_ids_of_the_vocabulary(plain_llama, capsys):
    from transformers import AutoTokenizer

    from autocontrast.models.training_data import sample_blocks, start_token_id

    tokenizer = AutoTokenizer.from_pretrained(str(plain_llama))
    model = load_for_training(plain_llama, LAYERS)
    blocks = sample_blocks(model, tokenizer, blocks=5, block_size=24, seed=1, batch_size=2)
    assert blocks.shape == (5, 24) and blocks.dtype == torch.long
    assert int(blocks.min()) >= 0 and int(blocks.max()) < model.config.vocab_size
    assert (blocks[:, 0] == start_token_id(tokenizer)).all()
    assert len(set(map(tuple, blocks.tolist()))) == 5  # sampled, not one greedy continuation
    assert model.training  # left as it was
    assert "self-sampled 5/5 blocks of 24 tokens" in capsys.readouterr().err


def test_self_sampling_is_deterministic_under_a_seed_and_leaves_the_global_rng_alone(plain_llama):
    from transformers import AutoTokenizer

    from autocontrast.models.training_data import sample_blocks

    tokenizer = AutoTokenizer.from_pretrained(str(plain_llama))
    model = load_for_training(plain_llama, LAYERS)
    state = torch.random.get_rng_state()
    first = sample_blocks(model, tokenizer, blocks=3, block_size=16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(sample_blocks(model, tokenizer, blocks=3, block_size=16, seed=7), first)
    assert not torch.equal(sample_blocks(model, tokenizer, blocks=3, block_size=16, seed=8), first)


def test_end_of_sequence_does_not_end_a_self_sampled_block(plain_llama):
    from transformers import AutoTokenizer

    from autocontrast.models.training_data import sample_blocks

    tokenizer = AutoTokenizer.from_pretrained(str(plain_llama))
    model = load_for_training(plain_llama, LAYERS)
    eos = model.generation_config.eos_token_id

    def favour_eos(module, args, output):  # make EOS the likeliest next token everywhere
        output = output.clone()
        output[..., eos] += 10.0
        return output

    model.lm_head.register_forward_hook(favour_eos)
    blocks = sample_blocks(model, tokenizer, blocks=2, block_size=12, seed=0)
    assert blocks.shape == (2, 12)
    assert (blocks[:, 1:-1] == eos).float().mean() > 0.5  # sampled EOS, and the block went on after it


def test_training_on_self_sampled_text_saves_a_checkpoint_that_reloads(plain_llama, tmp_path, capsys):
    output = tmp_path / "heads"
    result = train_heads(plain_llama, output, layers=LAYERS, self_sample=4,
                         options=HeadTrainingOptions(**{**KL_FAST, "max_steps": 2}))
    assert len(result.losses) == 2
    assert "self-sampled 4/4 blocks of 32 tokens" in capsys.readouterr().err
    model = AutoMultiExitModel.from_pretrained(output, MultiExitConfiguration(
        vocab_projection_mode="LAYER_SPECIFIC_PROJECTION", use_original_head=False, contrast_layer_indices="3;1"))
    assert model.available_exits == (1, 3, "original")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 450, 231]])).logits).all()


@pytest.mark.parametrize(("sources", "options", "error", "match"), [
    (dict(self_sample=4, data_files=["x.txt"]), {}, DataError, "--data and --self-sample"),
    ({}, {}, DataError, "got none"),
    (dict(self_sample=0), {}, DataError, "positive number of blocks"),
    (dict(task_files=["x.jsonl"]), dict(objective="kl"), ConfigurationError, "--task-data"),
])
def test_bad_combinations_of_data_and_objective_are_refused_before_any_work(plain_llama, tmp_path, sources, options,
                                                                            error, match):
    with pytest.raises(error, match=match):
        train_heads(plain_llama, tmp_path / "out", layers=LAYERS, options=HeadTrainingOptions(**options), **sources)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("options", "match"), [
    (dict(objective="kl", train_base=True), "--train-base"),
    (dict(objective="mse"), "unknown objective 'mse'"),
])
def test_bad_objective_options_are_configuration_errors(options, match):
    with pytest.raises(ConfigurationError, match=match):
        HeadTrainingOptions(**options)


@pytest.mark.parametrize("sources", [dict(self_sample=2), dict(data_files=["TEXT"])])
def test_distillation_and_self_sampling_refuse_an_encoder_decoder(tiny_checkpoint, text_file, tmp_path, sources):
    checkpoint = tiny_checkpoint("t5", VocabularyProjectionMode.SHARED_PROJECTION_DIRECT)
    sources = {k: [text_file] if v == ["TEXT"] else v for k, v in sources.items()}
    with pytest.raises(ConfigurationError, match="encoder-decoder"):
        train_heads(checkpoint, tmp_path / "out", layers=(2,), options=HeadTrainingOptions(objective="kl"), **sources)


def test_cli_reports_a_bad_objective_combination_without_a_traceback(plain_llama, tmp_path, capsys):
    from autocontrast.cli_support import run_cli

    code = run_cli(main, [str(plain_llama), "--layers", "1", "--self-sample", "2", "--objective", "kl",
                          "--train-base", "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --objective kl") and "Traceback" not in err


def test_cli_takes_one_data_source(plain_llama, text_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(plain_llama), "--layers", "1", "--self-sample", "2", "--data", str(text_file),
              "--output", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
