"""Bad input through the real entry point: one line `error: ...`, exit code 2, no traceback, nothing written.

Each case is one row of docs/cli.md's table of refused inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from hyperforget.pipelines.cli import main

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `hyperforget ARGS` run in this process."""
    monkeypatch.setattr(sys, "argv", ["hyperforget", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def refused(monkeypatch, capsys, *args, naming: str | tuple = ()) -> str:
    """Assert `hyperforget ARGS` is refused as the project's standard says; returns the message."""
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in (naming,) if isinstance(naming, str) else naming:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def digest(path: Path) -> str:
    """Hash of a file or of every file under a directory (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def zoo(tiny_zoo):
    path, _ = tiny_zoo(rows=45, chunk_rows=8, shard_rows=16)
    return Path(path)


@pytest.fixture
def model_dir(tmp_path):
    """An existing directory passed where a hypernetwork directory goes (refused before it is read)."""
    d = tmp_path / "model"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------------------------
# Outputs never land inside a zoo or over an existing file


@pytest.mark.parametrize("target", ["manifest.json", "zoo.json", "meta/part-000000.parquet"])
def test_query_out_inside_the_zoo_is_refused(zoo, monkeypatch, capsys, target):
    before = digest(zoo)
    refused(monkeypatch, capsys, "query", zoo, "select 1 as a", "--out", zoo / target, naming=("--out", "inside the zoo"))
    assert digest(zoo) == before


def test_sample_out_over_the_manifest_is_refused(zoo, model_dir, monkeypatch, capsys):
    before = digest(zoo)
    refused(monkeypatch, capsys, "sample", model_dir, "--targets", "1,1,1,1", "--out", zoo / "manifest.json",
            naming=("--out", "inside the zoo"))
    assert digest(zoo) == before


def test_existing_file_needs_force(zoo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.csv"
    out.write_text("keep me\n")
    refused(monkeypatch, capsys, "query", zoo, "select 1 as a", "--out", out, naming=("--out", "--force"))
    assert out.read_text() == "keep me\n"
    code, _, err = run_main(monkeypatch, capsys, "query", zoo, "select 1 as a", "--out", out, "--force")
    assert code == 0, err
    assert out.read_text().splitlines() == ['"a"', "1"]


@pytest.mark.parametrize("args", [
    ["query", "{zoo}", "select 1", "--out", "{tmp}/missing/r.csv"],
    ["sample", "{model}", "--targets", "1,1,1,1", "--out", "{tmp}/missing/s.safetensors"],
])
def test_out_into_a_missing_directory(zoo, model_dir, tmp_path, monkeypatch, capsys, args):
    args = [a.format(zoo=zoo, tmp=tmp_path, model=model_dir) for a in args]
    refused(monkeypatch, capsys, *args, naming=("--out", "does not exist"))
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(ROOT, reason="root writes into read-only directories")
@pytest.mark.parametrize("args", [
    ["query", "{zoo}", "select 1", "--out", "{ro}/r.csv"],
    ["zoo", "collect", "--out", "{ro}/zoo"],
    ["train", "--variant", "dihyfo2", "--zoo", "{zoo}", "--out", "{ro}/model"],
])
def test_out_into_a_read_only_directory(zoo, tmp_path, monkeypatch, capsys, args):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(monkeypatch, capsys, *[a.format(zoo=zoo, ro=ro) for a in args], naming="not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# Malformed zoo files are named, never a traceback


def test_malformed_manifest_is_named_by_every_reader(zoo, monkeypatch, capsys):
    (zoo / "manifest.json").write_text("[1, 2]\n")
    code, out, err = run_main(monkeypatch, capsys, "zoo", "verify", zoo)
    assert code == 1 and "PROBLEM manifest.json" in out and "Traceback" not in err
    refused(monkeypatch, capsys, "zoo", "info", zoo, naming="manifest.json")
    refused(monkeypatch, capsys, "query", zoo, "select 1", naming="manifest.json")


def test_manifest_with_garbled_parts_is_named(zoo, monkeypatch, capsys):
    m = json.loads((zoo / "manifest.json").read_text())
    m["parts"][0] = {"file": "../../etc/passwd", "start": 0, "stop": 5}
    (zoo / "manifest.json").write_text(json.dumps(m))
    refused(monkeypatch, capsys, "zoo", "info", zoo, naming=("manifest.json", "parts[0]"))


def test_malformed_zoo_json_and_part(zoo, monkeypatch, capsys):
    part = zoo / "meta" / "part-000000.parquet"
    part.write_bytes(b"not parquet")
    code, out, _ = run_main(monkeypatch, capsys, "zoo", "verify", zoo)
    assert code == 1 and "part-000000.parquet" in out
    (zoo / "zoo.json").write_text("[]")
    refused(monkeypatch, capsys, "zoo", "info", zoo, naming="zoo.json")


@pytest.mark.parametrize("args", [
    ["zoo", "verify", "{zoo}/zoo.json"],
    ["zoo", "info", "{zoo}/manifest.json"],
    ["query", "{zoo}/zoo.json", "select 1"],
])
def test_a_file_given_as_the_zoo(zoo, monkeypatch, capsys, args):
    refused(monkeypatch, capsys, *[a.format(zoo=zoo) for a in args], naming="is a file")


def test_a_url_without_its_filesystem_package(monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    refused(monkeypatch, capsys, "zoo", "verify", "s3://bucket/zoo", naming=("s3://bucket/zoo", "s3fs"))


# ----------------------------------------------------------------------------------------------
# Readers that train or evaluate refuse a damaged zoo


def _delete_a_shard(zoo: Path) -> None:
    shards = sorted((zoo / "params.zarr").rglob("c/*/*"))
    shards[1].unlink()


def _nan_rows(zoo: Path) -> None:
    import zarr

    arr = zarr.open_array(str(zoo / "params.zarr"), mode="r+")
    block = np.asarray(arr[16:32])
    block[3] = np.nan
    arr[16:32] = block


def _phantom_rows(zoo: Path) -> None:
    # More rows than the parts hold, but within params.zarr's allocated rows (64 here).
    m = json.loads((zoo / "manifest.json").read_text())
    m["num_rows"] += 10
    (zoo / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage", [_delete_a_shard, _nan_rows, _phantom_rows])
def test_train_refuses_a_damaged_zoo(zoo, tmp_path, monkeypatch, capsys, damage):
    from hyperforget.zoo.errors import HyperForgetError
    from hyperforget.zoo.store import require_sound_zoo, verify_zoo

    require_sound_zoo(zoo)  # sound before the damage
    damage(zoo)
    assert not verify_zoo(zoo).ok
    with pytest.raises(HyperForgetError, match="hyperforget zoo verify"):
        require_sound_zoo(zoo)
    refused(monkeypatch, capsys, "train", "--variant", "dihyfo2", "--zoo", zoo, "--out", tmp_path / "m",
            "--preset", "tiny", naming="zoo verify")
    assert not (tmp_path / "m").exists()


def test_info_does_not_count_phantom_rows_as_augmented(zoo, monkeypatch, capsys):
    from hyperforget.zoo.store import zoo_info

    before = zoo_info(zoo)
    _phantom_rows(zoo)
    after = zoo_info(zoo)
    assert after["augmented"] == before["augmented"]
    assert after["metadata_rows"] == 45 and after["checkpoints"] == 55
    code, out, _ = run_main(monkeypatch, capsys, "zoo", "info", zoo)
    assert code == 0 and "DAMAGED" in out and "zoo verify" in out


# ----------------------------------------------------------------------------------------------
# Values that are refused before any work


@pytest.mark.parametrize("args,naming", [
    (["sample", "{model}", "--targets", "1,1,1,1", "--out", "{tmp}/s.safetensors", "--steps", "0"], "--steps"),
    (["sample", "{model}", "--targets", "1,1,1,1", "--out", "{tmp}/s.safetensors", "--n", "10000000000000"], "--n"),
    (["sample", "{model}", "--targets", "1,1,1,1", "--out", "{tmp}/s.safetensors", "--n", "0"], "--n"),
    (["train", "--variant", "dihyfo2", "--zoo", "{zoo}", "--out", "{tmp}/m", "--lr", "nan"], "--lr"),
    (["train", "--variant", "dihyfo2", "--zoo", "{zoo}", "--out", "{tmp}/m", "--lr", "-0.1"], "--lr"),
    (["train", "--variant", "dihyfo2", "--zoo", "{zoo}", "--out", "{tmp}/m", "--steps", "0"], "--steps"),
    (["train", "--variant", "dihyfo2", "--zoo", "{zoo}", "--out", "{tmp}/empty", "--resume"], "--resume"),
    (["train", "--variant", "dihyfo2", "--zoo", "{zoo}", "--out", "{tmp}/afile"], "is a file"),
    (["unlearn", "--run", "{tmp}/run", "--zoo", "{zoo}", "--forget", "2", "--method", "finetune",
      "--set", "epochs=-1"], "epochs"),
    (["unlearn", "--run", "{tmp}/run", "--zoo", "{zoo}", "--forget", "2", "--method", "finetune",
      "--set", "epochs=1.5"], "epochs"),
    (["unlearn", "--run", "{tmp}/run", "--zoo", "{zoo}", "--forget", "2,2", "--method", "finetune"], "more than once"),
    (["unlearn", "--run", "{tmp}/afile", "--zoo", "{zoo}", "--forget", "2", "--method", "finetune"], "--run"),
    (["unlearn", "--run", "{tmp}/run", "--forget", "2", "--method", "finetune", "--out", "{tmp}/afile"], "--out"),
    (["retrain", "--run", "{tmp}/afile", "--forget", "2"], "--run"),
    (["report", "{tmp}/afile"], "is a file"),
    (["quality", "{tmp}/nomodel"], ("MODEL", "existing hypernetwork directory", "hyperforget train")),
    (["quality", "{tmp}/afile"], ("MODEL", "is a file", "hyperforget train")),
    (["evaluate", "{tmp}/empty", "--baseline-seeds", "0"], "--baseline-seeds"),
    (["evaluate", "{tmp}/empty", "--max-zoo-rows", "-1"], "--max-zoo-rows"),
    (["evaluate", "{tmp}/afile"], "is a file"),
    (["zoo", "collect", "--out", "{tmp}/newzoo", "--runs", "1000000000000"], "runs"),
    (["zoo", "collect", "--out", "{tmp}/afile"], "is a file"),
    (["zoo", "collect", "--out", "{tmp}/newzoo", "--holdout", "0,2"], "pivots"),
    (["zoo", "collect", "--out", "{tmp}/newzoo", "--holdout", "2,x"], "--holdout"),
    (["demo", "--out", "{tmp}/afile", "--quick"], "is a file"),
    (["query", "{zoo}", "select 1", "--limit", "100000000000000000000"], "--limit"),
    (["query", "{zoo}", "select 1", "--limit", "-1"], "--limit"),
    (["query", "{zoo}", "select 1", "--timeout", "0"], "--timeout"),
    (["query", "{zoo}", "select 1", "--memory-limit", "lots"], "--memory-limit"),
])
def test_refused_values(zoo, model_dir, tmp_path, monkeypatch, capsys, args, naming):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    zoo_before = digest(zoo)
    refused(monkeypatch, capsys, *[a.format(zoo=zoo, tmp=tmp_path, model=model_dir) for a in args], naming=naming)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert list((tmp_path / "empty").iterdir()) == []
    assert (tmp_path / "afile").read_text() == "x"
    assert digest(zoo) == zoo_before


def test_train_device_cuda_without_cuda(zoo, tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    refused(monkeypatch, capsys, "train", "--variant", "dihyfo2", "--zoo", zoo, "--out", tmp_path / "m",
            "--device", "cuda", naming=("--device", "CUDA"))


def test_non_utf8_path(tmp_path, monkeypatch, capsys):
    bad = os.path.join(str(tmp_path), os.fsdecode(b"zoo-\xff"))
    refused(monkeypatch, capsys, "zoo", "collect", "--out", bad, naming=("--out", "UTF-8"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,naming", [(["--train-steps", "0"], "--train-steps"),
                                          (["--methods", "nosuch"], "nosuch"),
                                          (["--runs", "0"], "runs")])
def test_refused_demo_writes_nothing(tmp_path, monkeypatch, capsys, extra, naming):
    out = tmp_path / "demo"
    refused(monkeypatch, capsys, "demo", "--out", out, "--quick", *extra, naming=naming)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Ad-hoc SQL is bounded in time


@pytest.mark.parametrize("sql", [
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT count(*) FROM t",
    "SELECT sum(a.loss_0 * b.loss_1 * c.loss_2 * d.loss_3 * e.test_loss * f.test_acc) "
    "FROM checkpoints a, checkpoints b, checkpoints c, checkpoints d, checkpoints e, checkpoints f",
])
def test_query_time_limit(zoo, monkeypatch, capsys, sql):
    import time

    t0 = time.perf_counter()
    refused(monkeypatch, capsys, "query", zoo, sql, "--timeout", "1", naming=("time limit", "--timeout"))
    assert time.perf_counter() - t0 < 30


def test_query_memory_limit(zoo, monkeypatch, capsys):
    sql = "SELECT list(range) AS l FROM range(30000000)"
    refused(monkeypatch, capsys, "query", zoo, sql, "--memory-limit", "64MB", "--timeout", "30",
            naming=("memory limit", "--memory-limit"))


# ----------------------------------------------------------------------------------------------
# Ctrl-C: the resume line, exit 130, no traceback from this process or dask's workers


@pytest.mark.parametrize("mode", [["--no-dask"], ["--workers", "1"]])
def test_ctrl_c_prints_the_resume_line(tmp_path, mode):
    import signal
    import subprocess
    import time

    out = tmp_path / "zoo"
    cmd = [sys.executable, "-m", "hyperforget", "zoo", "collect", "--out", str(out), "--dataset", "digits",
           "--runs", "4000", "--runs-per-group", "4", "--epochs", "10", *mode]
    # SIGINT as a terminal sends it: to the whole process group, which starts with the default handler.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            cwd=Path(__file__).resolve().parents[1])
    try:
        # Interrupt once the first group is committed, i.e. while groups train.
        deadline, manifest = time.time() + 90, out / "manifest.json"
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists() and json.loads(manifest.read_text() or "{}").get("num_rows", 0) > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "error: interrupted; re-run the same command to resume" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # nothing beside the zoo


# ----------------------------------------------------------------------------------------------
# View filters that leave nothing to train on


def test_train_names_the_filters_that_leave_its_view_short_of_a_batch(normalized_zoo, tmp_path, monkeypatch, capsys):
    refused(monkeypatch, capsys, "train", "--variant", "dihyfo1", "--zoo", normalized_zoo, "--out", tmp_path / "m",
            "--preset", "tiny", "--set", 'view={"pairs": {"start_max_loss": 0.0001}}',
            naming=("fewer than one batch", "start_max_loss 0.0001"))
    assert not (tmp_path / "m").exists()


def test_view_build_start_loss_factor_needs_plainly_trained_runs(zoo, monkeypatch, capsys):
    before = digest(zoo)
    refused(monkeypatch, capsys, "view", "build", zoo, "pairs", "-p", "start_loss_factor=1.5",
            naming=("start_loss_factor", "start_max_loss instead"))
    assert digest(zoo) == before
