"""The architecture registry: every registered model type has a tiny model under test, a multi-exit
class built from its declared HF class, and (decoder-only) an ORT fusion set ORT really has."""

from __future__ import annotations

import pytest

from autocontrast.errors import UnsupportedArchitectureError
from autocontrast.models.families import family_for, labels, model_types
from autocontrast.models.multi_exit import model_class
from tests.tiny_models import ARCHITECTURES, TINY_CONFIGS, tiny_config


def test_every_registered_model_type_has_a_tiny_config_under_test():
    missing = set(model_types()) - set(TINY_CONFIGS)
    assert not missing, f"model types without a tiny test model in tests/tiny_models.py: {sorted(missing)}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_config_resolves_to_its_family_and_a_multi_exit_subclass_of_the_declared_hf_class(arch):
    config = tiny_config(arch)
    family = family_for(config)
    assert config.model_type == arch and arch in family.model_types
    cls = model_class(arch)
    declared = next(m.hf_class for m in family.models if m.model_type == arch)
    assert declared in [base.__name__ for base in cls.__mro__] and cls.family is family


def test_multi_exit_classes_are_importable_by_name():
    from autocontrast.models import multi_exit

    assert multi_exit.MultiExitLlama is model_class("llama")
    assert multi_exit.MultiExitPhi3 is model_class("phi3")


def test_an_unregistered_model_type_is_a_clear_error():
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom' has no multi-exit support.*granite"):
        model_class("bloom")


def test_export_help_names_every_registered_architecture():
    from autocontrast.export.cli import parser

    text = " ".join(parser().format_help().split())  # argparse wraps the help text
    for label in labels().split(", "):
        assert label in text
    assert "T5" not in labels(decoder_only=True)
