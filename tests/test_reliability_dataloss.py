"""Data loss (RELIABILITY.md): output folders that are not the stage's own, metrics files at fixed
paths, a copied repository's MLflow artifacts, and export-checkpoint onto existing paths.

Each test runs the `mockingjay` command as a subprocess on real files and checks what is on disk
afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mockingjay.checkpoint import save_model_dir
from mockingjay.model import MockingjayForMAM, ModelConfig

from .conftest import FSDD_DIR, file_stats, mlflow_runs, run
from .test_reliability_input import imported_modules

pytestmark = pytest.mark.slow


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of the user's: a note and a table in a subfolder. Returns its content."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return contents(path)


def contents(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture
def repo(featurized_repo, tmp_path) -> Path:
    from .conftest import copy_repo

    return copy_repo(featurized_repo, tmp_path / "repo")


def test_out_and_report_refuse_a_folder_the_stage_did_not_make_and_never_touch_inputs(repo):
    notes = user_folder(repo / "adv/mynotes")
    records = file_stats(repo / "metrics")
    runs_before = len(mlflow_runs(repo))

    refused = run(["mockingjay", "probe", "--report", "adv/mynotes"], repo)
    assert refused.returncode == 1, refused.stderr
    assert (
        "--report adv/mynotes is a non-empty folder" in refused.stderr
        and "--force" in refused.stderr
    )
    assert "notes.txt" in refused.stderr and "Traceback" not in refused.stderr
    here = run(["mockingjay", "probe", "--report", "./"], repo)
    assert here.returncode == 1 and "--report . is the current directory" in here.stderr, (
        here.stderr
    )
    prepare = run(["mockingjay", "prepare", "--out", "adv/mynotes"], repo)
    assert (
        prepare.returncode == 1 and "--out adv/mynotes is a non-empty folder" in prepare.stderr
    ), prepare.stderr
    assert contents(repo / "adv/mynotes") == notes
    assert (
        len(mlflow_runs(repo)) == runs_before
    )  # refused before any work: no MLflow run was started

    # The input corpus inside the output folder: refused, --force or not.
    corpus = repo / "adv/mydata/corpus"
    shutil.copytree(FSDD_DIR, corpus)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prepare"]["corpora"] = [{"name": "fsdd", "format": "fsdd", "path": "adv/mydata/corpus"}]
    (repo / "adv/params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = contents(corpus)
    for force in ([], ["--force"]):
        inside = run(
            ["mockingjay", "prepare", "--params", "adv/params.yaml", "--out", "adv/mydata", *force],
            repo,
        )
        assert inside.returncode == 1, inside.stderr
        assert "--out adv/mydata holds the input adv/mydata/corpus" in inside.stderr, inside.stderr
        within = run(
            [
                "mockingjay",
                "prepare",
                "--params",
                "adv/params.yaml",
                "--out",
                "adv/mydata/corpus/x",
                *force,
            ],
            repo,
        )
        assert (
            within.returncode == 1 and "is inside the input adv/mydata/corpus" in within.stderr
        ), within.stderr
    assert contents(corpus) == before

    # --force replaces the user's folder (asked for); the stage's own output may be replaced again.
    forced = run(["mockingjay", "prepare", "--out", "adv/mynotes", "--force"], repo)
    assert forced.returncode == 0, forced.stderr
    assert sorted(contents(repo / "adv/mynotes")) == [
        ".mockingjay-output",
        "heldout_speakers.tsv",
        "manifest.tsv",
        "skipped.tsv",
        "summary.json",
    ]
    again = run(["mockingjay", "prepare", "--out", "adv/mynotes"], repo)
    assert again.returncode == 0, again.stderr
    other_stage = run(
        [
            "mockingjay",
            "featurize",
            "--manifest",
            "adv/mynotes/manifest.tsv",
            "--no-labels",
            "--out",
            "adv/mynotes",
        ],
        repo,
    )
    assert other_stage.returncode == 1, other_stage.stderr
    assert "holds the input adv/mynotes/manifest.tsv" in other_stage.stderr
    made = run(
        [
            "mockingjay",
            "featurize",
            "--manifest",
            "adv/mynotes/manifest.tsv",
            "--out",
            "data/prepared",
        ],
        repo,
    )
    assert made.returncode == 1 and "made by mockingjay prepare" in made.stderr, made.stderr
    assert (
        file_stats(repo / "metrics") == records
    )  # runs by hand wrote none of the pipeline's metrics


def test_stages_write_metrics_and_plots_only_where_told(repo, tmp_path):
    """A stage run by hand writes none of the pipeline's metrics or plots; dvc.yaml names each one."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"] = {
        "preset": "tera-base",
        "model": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "num_layers": 1},
        "train": {
            "total_steps": 2,
            "max_frames_per_batch": 3000,
            "max_length": 300,
            "log_every": 1,
            "checkpoint_every": 2,
            "device": "cpu",
        },
    }
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    records = {
        **file_stats(repo / "metrics"),
        **{f"plots/{k}": v for k, v in file_stats(repo / "plots").items()},
    }
    featurized = run(["mockingjay", "featurize", "--out", "adhoc/features"], repo)
    assert featurized.returncode == 0, featurized.stderr
    pretrained = run(
        [
            "mockingjay",
            "pretrain",
            "--features",
            "adhoc/features",
            "--out",
            "adhoc/pretrain",
            "--checkpoints",
            "adhoc/checkpoints",
            "--metrics",
            str(tmp_path / "m.json"),
            "--plot",
            str(tmp_path / "loss.tsv"),
        ],
        repo,
    )
    assert pretrained.returncode == 0, pretrained.stderr
    assert {
        **file_stats(repo / "metrics"),
        **{f"plots/{k}": v for k, v in file_stats(repo / "plots").items()},
    } == records
    assert '"steps": 2' in (tmp_path / "m.json").read_text()
    assert (tmp_path / "loss.tsv").read_text().splitlines()[0].startswith("step\tloss")
    folder = run(["mockingjay", "prepare", "--out", "adhoc/p", "--metrics", "adhoc"], repo)
    assert folder.returncode == 1 and "--metrics adhoc is a folder" in folder.stderr, folder.stderr

    options = {"metrics": "--metrics", "plots": "--plot"}
    for name, stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].items():
        words = stage["cmd"].split()
        for kind, option in options.items():
            for entry in stage.get(kind, []):
                path = entry if isinstance(entry, str) else next(iter(entry))
                assert path in words and words[words.index(path) - 1] == option, (
                    name,
                    path,
                    stage["cmd"],
                )


def test_a_copied_repository_never_writes_mlflow_artifacts_into_the_original(
    featurized_repo, tmp_path
):
    original = featurized_repo
    before = file_stats(original)
    copy = tmp_path / "copy"
    shutil.copytree(
        original, copy, symlinks=True
    )  # what `cp -a` does: the store's absolute paths stay

    refused = run(["mockingjay", "prepare", "--out", "data/again"], copy)
    assert refused.returncode == 1, refused.stderr
    assert f"keeps its artifacts in {original / 'mlartifacts'}" in refused.stderr, refused.stderr
    assert "mockingjay relocate-artifacts" in refused.stderr and not (copy / "data/again").exists()
    count = len(mlflow_runs(copy))

    relocated = run(["mockingjay", "relocate-artifacts"], copy)
    assert relocated.returncode == 0, relocated.stderr
    done = run(["mockingjay", "prepare", "--out", "data/again"], copy)
    assert done.returncode == 0, done.stderr
    runs = mlflow_runs(copy)
    assert len(runs) == count + 1
    assert all(
        r.info.artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/") for r in runs
    )  # old runs too
    assert (copy / "mlartifacts" / runs[0].info.run_id / "artifacts" / "summary.json").is_file()
    assert file_stats(original) == before  # nothing of the original changed, its store included


def tiny_model_dir(path: Path) -> Path:
    config = ModelConfig(
        input_dim=80, target_dim=80, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )
    return save_model_dir(path, MockingjayForMAM(config), config)


def test_export_checkpoint_refuses_existing_files_and_folders_and_leaves_no_partial(tmp_path):
    tiny_model_dir(tmp_path / "model")
    (tmp_path / "mine.ckpt").write_bytes(b"the user's own checkpoint")
    refused = run(["mockingjay", "export-checkpoint", "model", "mine.ckpt"], tmp_path)
    assert refused.returncode == 1 and "mine.ckpt exists; pass --force" in refused.stderr, (
        refused.stderr
    )
    assert (tmp_path / "mine.ckpt").read_bytes() == b"the user's own checkpoint"

    folder = user_folder(tmp_path / "exports")
    into_folder = run(
        ["mockingjay", "export-checkpoint", "model", "exports"],
        tmp_path,
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert into_folder.returncode == 1 and "exports is a folder" in into_folder.stderr, (
        into_folder.stderr[-2000:]
    )
    assert "torch" not in imported_modules(
        into_folder.stderr
    )  # refused before the model was even loaded
    inside = run(["mockingjay", "export-checkpoint", "model", "model/x.ckpt"], tmp_path)
    assert inside.returncode == 1 and "is inside the input model" in inside.stderr, inside.stderr
    assert contents(tmp_path / "exports") == folder
    assert [p for p in tmp_path.rglob("*.partial")] == [] and not (
        tmp_path / "model/x.ckpt"
    ).exists()

    forced = run(["mockingjay", "export-checkpoint", "model", "mine.ckpt", "--force"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "Transformer" in torch.load(tmp_path / "mine.ckpt", weights_only=True)
    assert [p for p in tmp_path.rglob("*.partial")] == []
