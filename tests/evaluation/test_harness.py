"""lm-eval adapters: multi_exit_hf (PyTorch) and acd_onnx (bundle via the runtime) give the same
log-likelihoods as each other and as a direct PyTorch computation, and run a local task end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from autocontrast.config import VocabularyProjectionMode
from autocontrast.evaluation.harness import AcdOnnxLM, MultiExitHFLM
from autocontrast.evaluation.lm_eval import evaluate

MODE = VocabularyProjectionMode.LAYER_SPECIFIC_PROJECTION
SETTINGS = {
    "original": {},
    "exit": {"use_original_head": False, "output_layer_index": 2},
    "contrast": {"use_original_head": False, "contrast_layer_indices": "original;2", "alpha": 0.2},
}
PAIRS = [("The history of Paris", " is long and old"), ("A cat", " sat on the mat."), ("Hello", " world")]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("llama", MODE)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle("llama", MODE)


@pytest.fixture(scope="module")
def direct(checkpoint):
    """Per setting, a function (context, continuation) -> summed log p, from the plain HF model's
    logits and hidden states with the exit-2 head read from the checkpoint's weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autocontrast.models.contrast import calculate_contrasted_logits

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    head = load_file(str(checkpoint / "model.safetensors"))["name_to_lm_exit_head.lm_head_2.weight"]

    def score(setting: str, context: str, continuation: str) -> float:
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([whole])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            upper = out.logits[0]  # (seq, vocab)
            lower = model.model.norm(out.hidden_states[2])[0] @ head.T  # (seq, vocab)
            logits = {"original": upper, "exit": lower,
                      "contrast": calculate_contrasted_logits(upper, lower, alpha=0.2, minimum_candidates=1)}[setting]
            log_probs = torch.log_softmax(logits.double(), dim=-1)
        return float(sum(log_probs[i - 1, whole[i]] for i in range(n_context, len(whole))))

    return score


def _requests(kind: str, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_both_adapters_match_direct_pytorch_loglikelihoods(setting, checkpoint, bundle, direct):
    hf = MultiExitHFLM(str(checkpoint), batch_size=2, **SETTINGS[setting])
    onnx = AcdOnnxLM(str(bundle), batch_size=2, **SETTINGS[setting])
    expected = [direct(setting, c, x) for c, x in PAIRS]
    got_hf = [ll for ll, _ in hf.loglikelihood(_requests("loglikelihood", PAIRS))]
    got_onnx = [ll for ll, _ in onnx.loglikelihood(_requests("loglikelihood", PAIRS))]
    np.testing.assert_allclose(got_hf, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got_onnx, expected, rtol=1e-4, atol=1e-3)


def test_rolling_loglikelihood_windows_cover_every_token_once(checkpoint):
    # max_length 8 forces two windows (12 tokens); with room for all, one window scores the whole document
    text = "one two three four five six seven eight nine ten eleven twelve"
    lm = MultiExitHFLM(str(checkpoint), max_length=8)
    ids = lm.tok_encode(text)
    (rolling,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    full = MultiExitHFLM(str(checkpoint), max_length=512)
    (whole,) = full.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert len(ids) > 8
    assert rolling != pytest.approx(whole)  # truncated contexts change the score...
    first, _ = full._loglikelihood_tokens([(None, [full.prefix_token_id], ids)])[0]
    assert whole == pytest.approx(first)  # ...and one window is the plain sum over the document


def test_generate_until_is_identical_on_both_adapters_and_stops_at_until(checkpoint, bundle):
    args = [("The history of Paris", {"until": ["zzz_never"], "max_gen_toks": 6}),
            ("A cat", {"until": ["\n"], "max_gen_toks": 6})]
    setting = SETTINGS["exit"]  # the tiny bundle has no decode graph returning both original and 2
    hf = MultiExitHFLM(str(checkpoint), **setting).generate_until(_requests("generate_until", args))
    onnx = AcdOnnxLM(str(bundle), **setting).generate_until(_requests("generate_until", args))
    assert hf == onnx
    assert all("\n" not in text for text in hf[1:])
    assert hf[0]


def test_local_wikitext_task_gives_the_same_perplexity_through_both_adapters(checkpoint, bundle, tmp_path):
    text = (" = First = \n \n The first article is short and plain . \n"
            " = Second = \n \n A second article , also short , ends here . \n")
    path = tmp_path / "tiny-wiki.txt"
    path.write_text(text, encoding="utf-8")
    results = {}
    for model, where in (("multi_exit_hf", checkpoint), ("acd_onnx", bundle)):
        out = evaluate(model, f"pretrained={where},use_original_head=False,contrast_layer_indices='original;2'",
                       ["wikitext_local"], metadata={"path": str(path)})
        results[model] = out["results"]["wikitext_local"]
    hf, onnx = results["multi_exit_hf"], results["acd_onnx"]
    assert hf["word_perplexity,none"] > 1.0
    assert onnx["word_perplexity,none"] == pytest.approx(hf["word_perplexity,none"], rel=1e-4)
    assert onnx["bits_per_byte,none"] == pytest.approx(hf["bits_per_byte,none"], rel=1e-4)


SERVED = {"original": (["--mode", "original"], ""),
          "contrast": (["--mode", "contrast", "--exits", "original,2", "--alpha", "0.2"],
                       ",use_original_head=False,contrast_layer_indices='original;2',alpha=0.2")}


@pytest.mark.parametrize("setting", sorted(SERVED))
def test_wikitext_through_acd_serve_with_lm_evals_own_client_equals_the_adapter(checkpoint, tiny_bundle, tmp_path,
                                                                               setting):
    # lm-eval's local-completions scores text through the server: echo + logprobs of token-id prompts, under the
    # server's mode (the contrast's distribution for ACD)
    from autocontrast.bundle import read_manifest
    from tests.serve.conftest import ServerProcess

    flags, adapter_args = SERVED[setting]
    bundle = tiny_bundle("llama", MODE, fuse_contrast=("original", 2))  # one decode graph returns both exits

    text = (" = First = \n \n The first article is short and plain . \n"
            " = Second = \n \n A second article , also short , ends here . \n")
    path = tmp_path / "tiny-wiki.txt"
    path.write_text(text, encoding="utf-8")
    direct = evaluate("acd_onnx", f"pretrained={bundle}{adapter_args}", ["wikitext_local"],
                      metadata={"path": str(path)})
    # rolling windows start with a prefix token: the adapter's (the bundle's end-of-sequence id), not the HF
    # tokenizer's own, so both score the same token windows
    prefix = read_manifest(bundle).eos_token_ids[0]
    server = ServerProcess(bundle, *flags)
    try:
        served = evaluate("local-completions", f"model={bundle.name},base_url={server.base}/v1/completions,"
                          f"tokenizer_backend=huggingface,tokenizer={checkpoint},num_concurrent=1,max_retries=1,"
                          f"custom_prefix_token_id={prefix}", ["wikitext_local"], metadata={"path": str(path)})
    finally:
        server.stop()
    want, got = direct["results"]["wikitext_local"], served["results"]["wikitext_local"]
    assert want["word_perplexity,none"] > 1.0
    assert got["word_perplexity,none"] == pytest.approx(want["word_perplexity,none"], rel=1e-3)
    assert got["bits_per_byte,none"] == pytest.approx(want["bits_per_byte,none"], rel=1e-3)
