"""`fedhpc sweep` resolves each point's config once per process (checked before anything runs, then
used to run or check the point), counted against the number of points."""
import json

import fedhpc.api
from conftest import REPO, TINY
from fedhpc.cli import main


def test_each_point_config_is_resolved_once(tmp_path, monkeypatch):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(json.dumps({  # JSON is YAML; two methods, one seed: two points
        "name": "t", "out_dir": str(tmp_path / "runs"), "base": str(REPO / "configs" / "quickstart.yaml"),
        "overrides": [*TINY, "rounds=1"], "methods": {"fedit": ["strategy.name=fedit"],
                                                      "fedsa": ["strategy.name=fedsa_lora"]}, "seeds": [0]}))
    calls = []
    resolve = fedhpc.api.resolve_config
    monkeypatch.setattr(fedhpc.api, "resolve_config", lambda *a, **k: calls.append(a) or resolve(*a, **k))
    assert main(["sweep", str(sweep)]) == 0  # runs both points
    assert len(calls) == 2
    calls.clear()
    assert main(["sweep", str(sweep)]) == 0  # both done: each checked against its config, skipped
    assert len(calls) == 2
    assert len(list((tmp_path / "runs" / "t").rglob("summary.json"))) == 2
