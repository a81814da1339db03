"""split_by_fold: one fold validates and the others train; fold -1 trains on every case and validates none."""

import pytest
from datalist_split import DatalistError, split_by_fold

DATALIST = {"training": [{"image": f"img/{i}.nii.gz", "label": f"lab/{i}.nii.gz", "fold": i % 2} for i in range(4)]}


def images(cases: list[dict]) -> list[str]:
    return [case["image"] for case in cases]


def test_a_fold_validates_and_the_others_train():
    training, validation = split_by_fold(DATALIST, "/data", 1)
    assert images(training) == ["/data/img/0.nii.gz", "/data/img/2.nii.gz"]
    assert images(validation) == ["/data/img/1.nii.gz", "/data/img/3.nii.gz"]


def test_fold_minus_one_trains_on_every_case_without_validation():
    training, validation = split_by_fold(DATALIST, "/data", -1)
    assert images(training) == [f"/data/img/{i}.nii.gz" for i in range(4)] and validation == []


@pytest.mark.parametrize("datalist, fold, message", [
    (DATALIST, 2, r"no training case has fold 2; the folds present are \[0, 1\] \(fold -1 trains on every case"),
    ({"training": [{**e, "fold": 0} for e in DATALIST["training"]]}, 0, "every training case is in fold 0"),
    ({"training": []}, -1, "the 'training' list is empty"),
    ({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}, -1, r"training entry 0 \(a.nii.gz\) has no fold"),
])
def test_a_split_that_cannot_train_says_why(datalist, fold, message):
    with pytest.raises(DatalistError, match=message):
        split_by_fold(datalist, "/data", fold, source="list.json")
