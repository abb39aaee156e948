"""The batched layout's spare model services (service/spares.py): a new model name gets one spare, whichever entry
worker asks, however many ask at once."""

from __future__ import annotations

import json
import threading
import time

import pytest

from transferkit.core.errors import ServiceError
from transferkit.core.repository import ModelSource
from transferkit.service import spares


def _source(name: str, tmp_path) -> ModelSource:
    return ModelSource(name, path=tmp_path / "repo" / name / "1")


def test_a_name_keeps_its_spare_and_a_new_name_takes_the_next_free_one(tmp_path):
    assert spares.assign(tmp_path, "x", _source("x", tmp_path), 3) == 0
    assert spares.assign(tmp_path, "x", _source("x", tmp_path), 3) == 0
    assert spares.assign(tmp_path, "y", _source("y", tmp_path), 3) == 1
    given = spares.assignments(tmp_path)
    assert {name: index for name, (index, _) in given.items()} == {"x": 0, "y": 1}
    assert given["y"][1].where == _source("y", tmp_path).where
    assert sorted(p.name for p in (tmp_path / spares.FOLDER).iterdir() if not p.name.startswith(".")) == \
        ["0.json", "1.json"]  # no draft left behind


def test_every_spare_taken_is_a_409_that_names_them(tmp_path):
    spares.assign(tmp_path, "x", _source("x", tmp_path), 1)
    with pytest.raises(ServiceError) as refused:
        spares.assign(tmp_path, "y", _source("y", tmp_path), 1)
    assert refused.value.status == 409 and "every spare model service is taken (1: x)" in refused.value.message


def test_a_name_found_twice_keeps_its_lowest_spare_in_numeric_order(tmp_path):
    folder = tmp_path / spares.FOLDER
    folder.mkdir()
    for index in (10, 1):  # "10.json" sorts before "2.json" as text
        (folder / f"{index}.json").write_text(json.dumps({"model": "x", "source": _source("x", tmp_path).as_dict()}))
    assert spares.assignments(tmp_path)["x"][0] == 1


def test_an_assignment_waits_for_the_one_in_progress(tmp_path):
    """Entry workers assign one at a time: two loads of one new name at once each took a spare before."""
    answers = []
    with spares._assigning(tmp_path / spares.FOLDER):
        worker = threading.Thread(target=lambda: answers.append(spares.assign(tmp_path, "x", _source("x", tmp_path),
                                                                              2)))
        worker.start()
        time.sleep(0.3)
        assert answers == []  # still waiting for the lock
    worker.join(10)
    assert answers == [0]
