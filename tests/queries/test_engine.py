"""DuckDB over a zoo: tables, and confinement of ad-hoc SQL."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hyperforget.queries import engine
from hyperforget.queries.views import build_view
from hyperforget.zoo.errors import HyperForgetError


def test_checkpoints_and_runs_match_metadata(qzoo, zoo_meta):
    t = engine.run_query(qzoo, "SELECT * FROM checkpoints ORDER BY checkpoint_id")
    assert t.num_rows == 117
    assert np.array_equal(t.column("checkpoint_id").to_numpy(), np.arange(117))
    assert np.allclose(t.column("loss_2").to_numpy(), zoo_meta["loss_2"].to_numpy())

    runs = engine.run_query(qzoo, "SELECT * FROM runs ORDER BY run_id").to_pandas()
    expect = zoo_meta.groupby("run_id")
    assert list(runs["run_id"]) == sorted(zoo_meta["run_id"].unique())
    assert list(runs["num_checkpoints"]) == list(expect.size())
    assert list(runs["num_originals"]) == list(expect["perm_index"].apply(lambda s: int((s == 0).sum())))
    assert list(runs["last_step"]) == list(expect["step"].max())
    # final_loss_k: loss of the run's last original checkpoint
    last = zoo_meta[zoo_meta.perm_index == 0].sort_values("step").groupby("run_id").tail(1).sort_values("run_id")
    assert np.allclose(runs["final_loss_3"], last["loss_3"])


def test_materialized_views_are_tables(qzoo):
    rec = build_view(qzoo, "split", "train_side", split="train", test_fraction=0.3)
    t = engine.run_query(qzoo, "SELECT count(*) AS n FROM train_side")
    assert t.column("n")[0].as_py() == rec["rows"] > 0


def test_limit_and_params(qzoo):
    t = engine.run_query(qzoo, "SELECT checkpoint_id FROM checkpoints WHERE run_id = $r", params={"r": 2}, limit=5)
    assert t.num_rows == 5
    assert engine.run_query(qzoo, "DESCRIBE checkpoints").num_rows > 20
    assert engine.run_query(qzoo, "EXPLAIN SELECT * FROM runs").num_rows >= 1


@pytest.mark.parametrize("sql, word", [
    ("COPY checkpoints TO '{tmp}/leak.csv'", "COPY"),
    ("COPY (SELECT 1) TO '{tmp}/leak.csv' (FORMAT csv)", "COPY"),
    ("ATTACH '{tmp}/other.db' AS other", "ATTACH"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("INSERT INTO checkpoints SELECT * FROM checkpoints", "INSERT"),
    ("SET enable_external_access = true", "SET"),
    ("PRAGMA version", "PRAGMA"),
    ("SELECT 1; COPY checkpoints TO '{tmp}/leak.csv'", "COPY"),
    ("EXPLAIN ANALYZE COPY checkpoints TO '{tmp}/leak.csv'", "EXPLAIN of a COPY"),
])
def test_refused_statements(qzoo, tmp_path, sql, word):
    with pytest.raises(HyperForgetError) as err:
        engine.run_query(qzoo, sql.format(tmp=tmp_path))
    msg = str(err.value)
    assert word in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "leak.csv") and not os.path.exists(tmp_path / "other.db")


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('{zoo}/../outside.parquet')",
    "SELECT * FROM query('COPY checkpoints TO ''{zoo}/leak.csv''')",
])
def test_no_file_access_outside_the_zoo(qzoo, sql):
    with pytest.raises(HyperForgetError) as err:
        engine.run_query(qzoo, sql.format(zoo=qzoo))
    assert "\n" not in str(err.value)
    assert not os.path.exists(os.path.join(qzoo, "leak.csv"))


def test_configuration_is_locked(qzoo):
    con = engine.connect(qzoo)
    try:
        import duckdb

        with pytest.raises(duckdb.Error):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error):
            con.execute("SELECT * FROM read_csv('/etc/passwd')")
        # the zoo's own tables still work after locking
        assert con.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 117
    finally:
        con.close()


@pytest.mark.parametrize("sql, start", [
    ("SELEC 1", "bad SQL: Parser Error"),
    ("SELECT nope FROM checkpoints", "query failed: Binder Error"),
    ("SELECT * FROM no_such_table", "query failed: Catalog Error"),
    ("   ", "empty SQL"),
])
def test_bad_sql_is_one_line(qzoo, sql, start):
    with pytest.raises(HyperForgetError) as err:
        engine.run_query(qzoo, sql)
    assert str(err.value).startswith(start) and "\n" not in str(err.value)


def test_template_placeholders_are_generated_per_class():
    frag = engine.column_fragments(3, pivots=[1])
    assert frag["losses"] == "loss_0, loss_1, loss_2"
    assert frag["nonpivot_losses"] == "loss_0, loss_2"
    assert "CAST(b.loss_2 - a.loss_2 AS FLOAT) AS delta_2" in frag["pair_losses"]
    assert "nonpivot_losses" not in engine.column_fragments(2, pivots=[0, 1])
    for name in ("checkpoints", "runs", "split", "balanced", "pairs"):
        assert engine.sql_template(name).strip()
