"""json_safe and its inverse: non-finite floats survive strict JSON, names stay names."""

from __future__ import annotations

import json
import math

from autoseg2d.evaluation.tables import from_json_safe, json_safe


def test_non_finite_floats_come_back_at_any_depth_and_text_keys_stay_text():
    row = {"case": "nan", "dice": math.nan, "hd_mm": math.inf, "member_dice": [0.5, math.nan],
           "classes": {"IPH": {"rvd": -math.inf}}, "flags": ["empty"]}
    back = from_json_safe(json.loads(json.dumps(json_safe(row), allow_nan=False)), text_keys=("case",))
    assert back["case"] == "nan" and math.isnan(back["dice"]) and back["hd_mm"] == math.inf
    assert back["member_dice"][0] == 0.5 and math.isnan(back["member_dice"][1])
    assert back["classes"]["IPH"]["rvd"] == -math.inf and back["flags"] == ["empty"]
