"""Text in and out: the bundle's tokenizer and its chat template. Torch-free (tokenizers + jinja2)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from autocontrast.bundle import Manifest
from autocontrast.errors import BundleError, PromptError

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def load_tokenizer(bundle_dir: Path) -> Tokenizer:
    path = bundle_dir / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a plain Exception on a bad file
        raise BundleError(f"cannot load the bundle's tokenizer {path}: {err}") from None


def chat_template(bundle_dir: Path, manifest: Manifest) -> str | None:
    if manifest.chat_template:
        return manifest.chat_template
    path = bundle_dir / CHAT_TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def render_chat(template: str | None, prompt: str | list[dict[str, str]], *, special_tokens: dict[str, str]) -> str:
    """The prompt (one user message, or a list of {role, content} messages) through the bundle's chat
    template, ready for the assistant."""
    if template is None:
        raise PromptError("this bundle has no chat template; generate without --chat / chat=True")
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)

    def raise_exception(message: str) -> None:
        raise PromptError(f"chat template refused the prompt: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=True, **special_tokens)
    except jinja2.TemplateError as err:
        raise BundleError(f"the bundle's chat template cannot be rendered: {err}") from None
