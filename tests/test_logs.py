"""The JSON logs stay valid, strict JSON after every append."""

import json
import math

from embedrag.train.logs import JsonListFile


def test_json_list_is_valid_after_every_append_and_non_finite_is_null(tmp_path):
    log = JsonListFile(str(tmp_path / "log.json"))
    assert json.loads((tmp_path / "log.json").read_text()) == []
    records = [{"step": 1, "loss": 1.5}, {"step": 2, "loss": math.nan, "grad_norm": math.inf},
               {"step": 3, "loss": 0.5, "note": "台北"}]
    for i, record in enumerate(records, 1):
        log.append(record)
        text = (tmp_path / "log.json").read_text(encoding="utf-8")
        got = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        assert len(got) == i
    assert got[1] == {"step": 2, "loss": None, "grad_norm": None}
    assert got[2]["note"] == "台北"
