"""Method recipes: Q-Diffusion and the linear baseline differ exactly in the paper's choices."""

import sys
from types import SimpleNamespace

import pytest

from bench.errors import UnknownNameError
from bench.registry import METHODS
from bench.spec import Bits, Budget


def test_qdiffusion_and_linear_recipes():
    q = METHODS.get("qdiff").qconfig(Bits(4, 8))
    lin = METHODS.get("linear").qconfig(Bits(4, 8))
    assert (q.calib.strategy, q.split_shortcut, q.recon.method) == ("uniform", True, "brecq")
    assert (lin.calib.strategy, lin.split_shortcut, lin.recon.method) == ("final", False, "none")
    assert q.weight.bits == lin.weight.bits == 4 and q.act.bits == lin.act.bits == 8
    assert q.weight.granularity == lin.weight.granularity == "channel"
    assert METHODS.get("qdiff").qconfig(Bits(4, None)).act is None


def test_budget_sets_calibration_for_all_and_schedule_only_where_reconstructing():
    budget = Budget(calib_timesteps=5, calib_samples=8, weight_iters=7, act_iters=3, weight_lr=0.5)
    q = budget.apply(METHODS.get("qdiff").qconfig(Bits(8, 8)))
    lin = budget.apply(METHODS.get("linear").qconfig(Bits(8, 8)))
    assert q.calib.size == lin.calib.size == 40
    assert (q.recon.weight_iters, q.recon.act_iters, q.recon.weight_lr) == (7, 3, 0.5)
    assert lin.recon.method == "none"


def test_ablations_undo_exactly_one_choice():
    full = METHODS.get("qdiff").qconfig(Bits(4, 8))
    changed = {
        "qdiff-no-calib": ("calib", "strategy", "final"),
        "qdiff-no-split": (None, "split_shortcut", False),
        "qdiff-no-recon": ("recon", "method", "none"),
    }
    for name, (group, field, value) in changed.items():
        cfg = METHODS.get(name).qconfig(Bits(4, 8))
        assert getattr(getattr(cfg, group) if group else cfg, field) == value
        differing = [f for f in ("weight", "act", "calib", "recon", "split_shortcut")
                     if getattr(cfg, f) != getattr(full, f)]  # fmt: skip
        assert differing == [group or field], name


def test_registry_imports_its_package_on_first_lookup_so_a_new_file_registers_itself(tmp_path, monkeypatch):
    (tmp_path / "widget_registry.py").write_text(
        "from qdiff.registry import Registry\nWIDGETS = Registry('widget', ('widget_pkg',))\n"
    )
    (tmp_path / "widget_pkg").mkdir()
    (tmp_path / "widget_pkg" / "__init__.py").write_text("")
    for name in ("good", "bad"):  # each file declares its name once, where it defines the object
        (tmp_path / "widget_pkg" / f"{name}.py").write_text(
            f"from types import SimpleNamespace\nfrom widget_registry import WIDGETS\n"
            f"WIDGET = WIDGETS.add(SimpleNamespace(name={name!r}))\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("widget_registry", "widget_pkg", "widget_pkg.good", "widget_pkg.bad"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    from widget_registry import WIDGETS

    assert "widget_pkg.good" not in sys.modules  # importing the registry imports no entry
    assert WIDGETS.get("good") is sys.modules["widget_pkg.good"].WIDGET and WIDGETS.names() == ["bad", "good"]
    with pytest.raises(
        UnknownNameError, match=r"unknown widget 'god' \(did you mean 'good'\?\); valid: bad, good"
    ):
        WIDGETS.get("god")
    with pytest.raises(ValueError, match="widget 'good' is already registered"):
        WIDGETS.add(SimpleNamespace(name="good"))
