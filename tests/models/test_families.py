"""Every registered architecture family is covered by a tiny-model test."""

from __future__ import annotations

from autocontrast.models.families import FAMILIES, family_for
from autocontrast.models.multi_exit import MODEL_CLASSES
from tests.tiny_models import ARCHITECTURES, tiny_config


def test_every_registered_model_type_has_a_tiny_config_under_test():
    registered = {t for family in FAMILIES.values() for t in family.model_types}
    missing = registered - set(ARCHITECTURES)
    assert not missing, f"model types without a tiny test model in tests/tiny_models.py: {sorted(missing)}"


def test_every_tiny_config_resolves_to_its_family_and_a_multi_exit_class():
    for arch in ARCHITECTURES:
        config = tiny_config(arch)
        assert config.model_type == arch
        assert arch in family_for(config).model_types
        assert arch in MODEL_CLASSES


def test_every_multi_exit_class_belongs_to_a_registered_family():
    registered = {t for family in FAMILIES.values() for t in family.model_types}
    assert set(MODEL_CLASSES) <= registered
