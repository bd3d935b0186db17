"""`hyperforget query` and `hyperforget view` through typer's CliRunner."""

from __future__ import annotations

import json
import sys

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hyperforget.pipelines.cli import app, main
from hyperforget.zoo.errors import HyperForgetError

runner = CliRunner()


def test_query_prints_a_table(qzoo):
    res = runner.invoke(app, ["query", qzoo, "SELECT run_id, count(*) AS n FROM checkpoints GROUP BY run_id ORDER BY 1"])
    assert res.exit_code == 0, res.output
    assert "run_id" in res.output and "9 rows" in res.output


@pytest.mark.parametrize("ext", ["csv", "parquet", "json"])
def test_query_writes_files(qzoo, tmp_path, ext):
    out = tmp_path / f"r.{ext}"
    res = runner.invoke(app, ["query", qzoo, "SELECT checkpoint_id, loss_2 FROM checkpoints", "--out", str(out),
                              "--limit", "20"])
    assert res.exit_code == 0, res.output
    if ext == "csv":
        t = pcsv.read_csv(out)
    elif ext == "parquet":
        t = pq.read_table(out)
    else:
        t = json.loads(out.read_text())
    assert len(t) == 20


def test_view_build_and_list(qzoo):
    res = runner.invoke(app, ["view", "build", qzoo, "pairs", "--name", "p3", "-p", "cap=3", "-p", "split=train"])
    assert res.exit_code == 0, res.output
    assert "view p3:" in res.output and '"cap": 3' in res.output
    res = runner.invoke(app, ["view", "list", qzoo])
    assert res.exit_code == 0 and "p3" in res.output and "pairs" in res.output
    res = runner.invoke(app, ["query", qzoo, "SELECT count(*) AS n FROM p3"])
    assert res.exit_code == 0 and "1 rows" in res.output
    assert runner.invoke(app, ["view", "kinds"]).exit_code == 0


@pytest.mark.parametrize("args", [
    ["query", "{zoo}", "COPY checkpoints TO '/tmp/hf-leak.csv'"],
    ["query", "{zoo}", "SELECT * FROM read_csv('/etc/passwd')"],
    ["view", "build", "{zoo}", "pairs", "-p", "cap"],
    ["view", "build", "{zoo}", "triples"],
    ["query", "{zoo}", "SELECT 1", "--out", "x.txt"],
])
def test_errors_exit_2_with_one_line(qzoo, monkeypatch, capsys, args):
    res = runner.invoke(app, [a.format(zoo=qzoo) for a in args])
    assert isinstance(res.exception, HyperForgetError)
    monkeypatch.setattr(sys, "argv", ["hyperforget"] + [a.format(zoo=qzoo) for a in args])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
