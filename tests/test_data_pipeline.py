"""End to end: prepare, align and featurize as `mockingjay` subprocesses under `dvc repro`,
in a temporary git + DVC repository built from the real audio fixtures, with MLflow checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mockingjay.featstore import RaggedArray
from mockingjay.manifest import read_manifest

from .conftest import copy_repo, mlflow_runs, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def repo(featurized_repo, tmp_path_factory) -> Path:
    """A private copy: these tests change params."""
    return copy_repo(featurized_repo, tmp_path_factory.mktemp("data") / "repo")


def test_repro_writes_manifest_alignments_and_features(repo):
    rows = read_manifest(repo / "data/prepared/manifest.tsv")
    assert len(rows) == 60 + 8 + 10
    assert {r.split for r in rows} == {"train", "dev", "test"}
    fsdd = [r for r in rows if r.corpus == "fsdd"]
    assert all(r.sample_rate == 8000 for r in fsdd)
    assert abs(fsdd[0].num_samples / fsdd[0].duration - 16000) < 1
    labels = RaggedArray(repo / "data/alignments/frame_labels")
    assert len(labels) >= 60  # most FSDD + ARCTIC utterances align
    assert (repo / "data/alignments/lab/arctic_slt_a0009.lab").is_file()
    total = 0
    for split in ("train", "dev", "test"):
        feats = RaggedArray(repo / "data/features" / split)
        frame_labels = RaggedArray(repo / "data/features/labels" / split)
        assert feats.dim == 80 and feats.dtype == np.float16
        assert feats.ids == frame_labels.ids
        np.testing.assert_array_equal(feats.lengths, frame_labels.lengths)
        total += len(feats)
    assert total == len(rows)
    train = RaggedArray(repo / "data/features/train")
    some = np.asarray(train[0], dtype=np.float32)
    assert abs(some.mean()) < 0.05 and abs(some.std() - 1) < 0.05  # per-utterance CMVN
    assert (repo / "dvc.lock").is_file()


def test_every_stage_logged_an_mlflow_run_with_tags(repo):
    runs = mlflow_runs(repo)
    stages = sorted(r.data.tags["mockingjay.stage"] for r in runs)
    assert stages == ["align", "featurize", "prepare"]
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["git_commit"] == commit
        assert "duration_sec" in r.data.metrics
    prepare = next(r for r in runs if r.data.tags["mockingjay.stage"] == "prepare")
    assert prepare.data.metrics["utterances"] == 78
    assert prepare.data.params["on_error"] == "fail"


def test_second_repro_does_nothing_and_featurize_param_reruns_only_featurize(repo):
    before = len(mlflow_runs(repo))
    again = run(["dvc", "repro", "featurize"], repo)
    assert again.returncode == 0
    assert "Running stage" not in again.stdout
    assert len(mlflow_runs(repo)) == before
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["featurize"]["cmvn"] = "global"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = run(["dvc", "repro", "featurize"], repo)
    assert changed.returncode == 0, changed.stderr
    assert "Running stage 'featurize'" in changed.stdout
    assert "Running stage 'prepare'" not in changed.stdout
    assert "Running stage 'align'" not in changed.stdout
    train = RaggedArray(repo / "data/features/train")
    frames = np.asarray(train.data, dtype=np.float32)
    np.testing.assert_allclose(frames.mean(axis=0), 0, atol=0.02)
    np.testing.assert_allclose(frames.std(axis=0), 1, atol=0.02)


def test_dvc_exp_name_is_tagged(repo, tmp_path):
    result = run(
        ["mockingjay", "prepare", "--out", str(tmp_path / "prep")],
        repo,
        env={"DVC_EXP_NAME": "exp-xyz"},
    )
    assert result.returncode == 0, result.stderr
    tagged = [r for r in mlflow_runs(repo) if r.data.tags.get("dvc_exp_name") == "exp-xyz"]
    assert len(tagged) == 1 and tagged[0].data.tags["mockingjay.stage"] == "prepare"


def test_align_imports_existing_lab_files_instead_of_aligning(repo, tmp_path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    labs = Path(__file__).parent / "fixtures" / "cmu_arctic" / "lab_pocketsphinx"
    params["align"]["imports"] = [{"corpus": "arctic", "format": "lab", "path": str(labs)}]
    custom = tmp_path / "params.yaml"
    custom.write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(
        ["mockingjay", "align", "--params", str(custom), "--out", str(tmp_path / "aligned")], repo
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "aligned" / "summary.json").read_text())
    assert summary["imported"] == 8 and summary["aligned_with_pocketsphinx"] == 60
    imported = RaggedArray(tmp_path / "aligned" / "frame_labels").get("arctic_slt_a0009")[:, 0]
    aligned = RaggedArray(repo / "data/alignments/frame_labels").get("arctic_slt_a0009")[:, 0]
    assert len(imported) == len(aligned)
    assert (
        np.mean(imported == aligned) > 0.8
    )  # the shipped machine labels agree with our own alignment
    params["align"]["imports"] = [{"corpus": "nosuch", "format": "lab", "path": str(labs)}]
    custom.write_text(yaml.safe_dump(params, sort_keys=False))
    bad = run(["mockingjay", "align", "--params", str(custom), "--out", str(tmp_path / "x")], repo)
    assert bad.returncode == 1 and "'nosuch' is not in the manifest" in bad.stderr


def test_unreachable_tracking_server_fails_fast_before_any_output(repo, tmp_path):
    import socket
    import time

    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = run(
        ["mockingjay", "prepare", "--out", str(tmp_path / "out")],
        repo,
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
    )
    assert result.returncode == 1
    assert (
        f"http://127.0.0.1:{port} is unreachable" in result.stderr
        and "MLFLOW_TRACKING_URI" in result.stderr
    )
    assert time.monotonic() - started < 60  # MLflow's own HTTP retries would take minutes
    assert not (tmp_path / "out").exists()


def test_align_reports_each_failure_and_carries_on(repo, tmp_path):
    lines = (repo / "data/prepared/manifest.tsv").read_text().splitlines()
    header, arctic = lines[0], [line for line in lines[1:] if line.startswith("arctic_")][:2]
    columns = header.split("\t")
    bad = arctic[1].split("\t")
    bad[columns.index("transcript")] = "qwzxvk " + bad[columns.index("transcript")]
    (tmp_path / "m.tsv").write_text("\n".join([header, arctic[0], "\t".join(bad)]) + "\n")
    result = run(
        [
            "mockingjay",
            "align",
            "--manifest",
            str(tmp_path / "m.tsv"),
            "--out",
            str(tmp_path / "out"),
        ],
        repo,
    )
    assert result.returncode == 0, result.stderr
    assert f"align: failed {bad[1]}" in result.stderr and "qwzxvk" in result.stderr
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["failed"] == 1 and summary["labelled"] == 1
    failures = (tmp_path / "out/failures.tsv").read_text().splitlines()
    assert (
        len(failures) == 2
        and failures[1].startswith(bad[0])
        and "OutOfVocabularyError" in failures[1]
    )
    assert RaggedArray(tmp_path / "out/frame_labels").ids == [arctic[0].split("\t")[0]]
