"""`cryoprior bench NAME --out FILE`: the JSON at FILE, the tables in a folder beside it."""

import json

import cryoprior.bench.cdae as bench_cdae
from cryoprior.cli.main import main as cli


def test_tables_go_next_to_the_json_not_into_the_working_folder(tmp_path, monkeypatch):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"grid": {}}

    monkeypatch.setattr(bench_cdae, "run", fake_run)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "results" / "bench_cdae.json"
    out.parent.mkdir()
    assert cli(["bench", "cdae", "--quick", "--out", str(out)]) == 0
    assert seen["out_dir"] == str(out.parent / "bench_cdae_quick") and seen["quick"] is True
    assert json.loads(out.read_text())["bench"] == "cdae"
    assert cli(["bench", "cdae", "--quick"]) == 0  # without --out: the working folder, as before
    assert seen["out_dir"] == "bench_cdae_quick"
