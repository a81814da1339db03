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


def scripts_copy(folder, extra_predictor_code: str = ""):
    """A bundle folder holding a copy of the template's scripts, its predictor.py optionally changed."""
    import shutil

    shutil.copytree(TEMPLATES / "segresnet2d" / "scripts", folder / "scripts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(folder / "scripts" / "predictor.py", "a") as stream:
        stream.write(extra_predictor_code)
    return folder


def test_bundles_with_different_scripts_run_their_own_siblings_in_one_process(tmp_path):
    """infer.py imports `predictor` by its plain name: each bundle must get its own predictor.py."""
    import sys

    import torch

    from autoseg2d.templates import bundle_module

    before = {name: sys.modules.get(name) for name in ("predictor", "infer", "volumes")}
    old = scripts_copy(tmp_path / "old")
    new = scripts_copy(tmp_path / "new", "\n\ndef autocast_dtype(device, amp):\n    return 'new predictor'\n")
    old_infer, new_infer = bundle_module(old, "infer"), bundle_module(new, "infer")
    cpu_fp32 = (torch.device("cpu"), False)
    assert new_infer.autocast_dtype(*cpu_fp32) == "new predictor" and old_infer.autocast_dtype(*cpu_fp32) is None
    assert bundle_module(new, "predictor").autocast_dtype is new_infer.autocast_dtype  # one copy per bundle
    assert {name: sys.modules.get(name) for name in before} == before  # nothing left under the plain names
    assert str(old / "scripts") not in sys.path and str(new / "scripts") not in sys.path


def test_bundles_with_identical_scripts_share_one_loaded_copy(tmp_path):
    from autoseg2d.templates import bundle_module, scripts_digest

    first, second = scripts_copy(tmp_path / "a"), scripts_copy(tmp_path / "b")
    assert scripts_digest(first / "scripts") == scripts_digest(second / "scripts")
    assert bundle_module(first, "infer") is bundle_module(second, "infer")
    assert bundle_module(first, "volumes").load_volume is bundle_module(second, "infer").load_volume
