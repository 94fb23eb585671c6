"""A GGUF file of a random-weight shape folder (`acd-random-model`), for the llama.cpp peer in `acd-bench`.

llama.cpp's own converter (`convert_hf_to_gguf.py`, in the llama.cpp source tree; llama-cpp-python's
source distribution carries one under `vendor/llama.cpp`) reads a Llama folder's vocabulary as
SentencePiece, as a Hugging Face Llama vocabulary (which must have as many tokens as the embedding
has rows) or as a BPE vocabulary whose pre-tokenizer it knows by the hash of a test string's tokens.
The shape folders borrow SmolLM2's tokenizer (49,152 tokens; its hash under this environment's
tokenizers is not in the converter's table), and the Llama-3.2 shapes keep their 128,256 embedding
rows. This runs the converter with the Llama model's vocabulary read as BPE with SmolLM's
pre-tokenizer (`smollm`, what the folders' tokenizer is), which pads the vocabulary to the
embedding's rows; everything else is the converter's own.

    python benchmarks/gguf_convert.py --llama-cpp /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp \
        /tmp/shapes/llama-3.2-1b --outtype f32 --outfile /tmp/gguf/llama-3.2-1b-f32.gguf

The converter needs torch, transformers, numpy and sentencepiece importable (`--extra-path` adds a
folder, such as one made by `pip install --target DIR sentencepiece`); its `gguf` package is taken
from the source tree's `gguf-py`.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (holds convert_hf_to_gguf.py)")
    parser.add_argument("--extra-path", action="append", default=[], help="folder to import from (repeatable)")
    args, converter_args = parser.parse_known_args()
    script = args.llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        parser.error(f"no convert_hf_to_gguf.py in {args.llama_cpp}")
    sys.path[:0] = [str(args.llama_cpp), str(args.llama_cpp / "gguf-py"), *args.extra_path]
    import conversion.llama as llama  # the converter's own module, importable once the tree is on the path

    llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
    llama.LlamaModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
    sys.argv = [str(script), *converter_args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
