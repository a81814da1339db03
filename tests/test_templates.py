import pytest

from autoseg2d.templates import ENV_VARIABLE, template_config, templates_root
from tests.conftest import TEMPLATES


def test_the_checkout_template_is_found(monkeypatch):
    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    assert templates_root() == TEMPLATES
    assert template_config().is_file()


def test_a_missing_template_says_how_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VARIABLE, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip install -e \.|SEGRESNET2D_TEMPLATES") as error:
        templates_root()
    assert str(tmp_path) in str(error.value)
