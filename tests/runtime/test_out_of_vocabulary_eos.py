"""A checkpoint whose end-of-sequence id lies beyond its vocabulary (GPT-2's 50256 kept over a resized
one): `min_new_tokens` suppresses stop ids of the vocabulary only, as transformers' own
MinNewTokensLengthLogitsProcessor does, so the runtime returns the same tokens as PyTorch `generate()`
instead of an IndexError; the export records and reports the stray id."""

from __future__ import annotations

import shutil

import pytest
import torch

from autocontrast.bundle import read_manifest
from autocontrast.config import MultiExitConfiguration, VocabularyProjectionMode
from autocontrast.export.cache import cached_bundle
from autocontrast.export.checkpoint import TOKENIZER_FILES
from autocontrast.export.exporter import ExportOptions
from autocontrast.models.auto import AutoMultiExitModel
from autocontrast.runtime import Generator
from tests.tiny_models import VOCAB, left_padded_prompts, make_tiny_model

MODE = VocabularyProjectionMode.SHARED_PROJECTION_DIRECT
GPT2_EOS = 50256
NEW = 10
CONTRAST = MultiExitConfiguration(use_original_head=False, contrast_layer_indices=(3, 1))


@pytest.fixture(scope="module", params=["gpt2", "gpt_neo"])
def stray_eos(request, tmp_path_factory, tiny_tokenizer):
    """(checkpoint, bundle) of a tiny model whose config says eos = pad = 50256 over a 512-token vocabulary."""
    arch = request.param

    def save():
        directory = tmp_path_factory.mktemp(f"stray-eos-{arch}")
        model = make_tiny_model(arch, MODE)
        for config in (model.config, model.generation_config):
            config.eos_token_id = config.bos_token_id = GPT2_EOS
            config.pad_token_id = None
        model.save_pretrained(directory)
        for name in TOKENIZER_FILES:
            if (tiny_tokenizer / name).is_file():
                shutil.copy(tiny_tokenizer / name, directory / name)
        return directory

    checkpoint = save()
    bundle = cached_bundle(lambda: checkpoint, ExportOptions(projection=MODE.name),
                           identity=f"tiny-{arch}-stray-eos-{GPT2_EOS}")
    return checkpoint, bundle


def _torch_tokens(checkpoint, config, prompt, new):
    """PyTorch reference: the multi-exit model's own generate() with HF's min_new_tokens processor."""
    model = AutoMultiExitModel.from_pretrained(str(checkpoint), config.replace(vocab_projection_mode=MODE))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_the_export_records_special_ids_outside_the_vocabulary(stray_eos):
    manifest = read_manifest(stray_eos[1])
    assert manifest.special_tokens["outside_vocabulary"] == [GPT2_EOS]
    assert manifest.eos_token_ids == (GPT2_EOS,) and 0 <= manifest.padding_token_id < VOCAB


@pytest.mark.parametrize("config", [MultiExitConfiguration(), CONTRAST], ids=["original", "acd"])
def test_min_new_tokens_with_a_stray_eos_equals_pytorch_generate(stray_eos, config):
    checkpoint, bundle = stray_eos
    prompt = left_padded_prompts([9], seed=3)[0][0].tolist()
    ours = Generator(bundle).generate(prompt, multi_exit=config, max_new_tokens=NEW, min_new_tokens=NEW)
    assert ours.token_ids[0] == _torch_tokens(checkpoint, config, prompt, NEW)
    assert ours.finish_reasons == ["length"]


def test_a_left_padded_batch_pads_with_an_id_of_the_vocabulary(stray_eos):
    checkpoint, bundle = stray_eos
    generator = Generator(bundle)
    prompts = [left_padded_prompts([n], seed=n)[0][0].tolist() for n in (9, 4)]
    batch = generator.generate(prompts, max_new_tokens=NEW, min_new_tokens=NEW)
    alone = [generator.generate(p, max_new_tokens=NEW, min_new_tokens=NEW).token_ids[0] for p in prompts]
    assert batch.token_ids == alone and all(len(t) == NEW for t in alone)
