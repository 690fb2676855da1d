"""Bad input, end to end (RELIABILITY.md): a corpus of planted bad files through the whole pipeline,
and invalid parameters refused by the `mockingjay` commands before any work."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from mockingjay.featstore import RaggedArray
from mockingjay.manifest import read_manifest

from .conftest import (
    ARCTIC_DIR,
    PARAMS,
    copy_repo,
    file_stats,
    make_repo,
    mlflow_runs,
    plant_bad_files,
    run,
)

pytestmark = pytest.mark.slow


def unreadable(path: Path) -> list[str]:
    """Make `path` unreadable and return the command prefix under which reading it really fails.

    File modes do not stop root (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH), and the tests run as root
    in CI: there the command runs under `setpriv` with those two capabilities dropped from its
    bounding set, so the open() of the mode-000 file fails with EACCES as it would for a user.
    """
    os.chmod(path, 0)
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a mode-000 file stays readable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def plant_more_bad_files(folder: Path) -> tuple[dict[str, str], list[str]]:
    """Beside plant_bad_files: a file this process may not read, two files with one utterance id,
    and a good recording whose transcript has a word missing from the pronunciation dictionary."""
    good = ARCTIC_DIR / "aew_a0003.wav"
    text = good.with_suffix(".txt").read_text().strip()
    for name in ("unreadable", "dup", "oov"):
        (folder / f"{name}.txt").write_text(text + "\n")
    (folder / "oov.txt").write_text(f"qwzxvk {text}\n")
    shutil.copy(good, folder / "oov.wav")
    shutil.copy(good, folder / "dup.wav")
    data, rate = sf.read(good, dtype="float32")
    sf.write(folder / "dup.flac", data, rate)
    shutil.copy(good, folder / "unreadable.wav")
    prefix = unreadable(folder / "unreadable.wav")
    return {
        "unreadable.wav": "unreadable",
        "dup.wav": "duplicate_id",
        "dup.flac": "duplicate_id",
    }, prefix


# What each bad file's message says (beside its path).
DETAILS = {
    "empty.wav": "empty file (0 bytes)",
    "truncated.flac": "truncated",
    "noise.wav": "not readable as audio",
    "nan.wav": "NaN or inf samples",
    "tiny.wav": "too short: 5.0 ms",
    "notext.wav": "no transcript",
    "unreadable.wav": "permission denied",
    "dup.wav": "utterance id 'bad_dup' occurs 2 times",
    "dup.flac": "utterance id 'bad_dup' occurs 2 times",
}


def test_bad_files_are_each_named_and_skip_runs_the_data_stages_reporting_every_one(tmp_path):
    bad_corpus = {"name": "bad", "format": "arctic", "path": "data/bad", "align": True}
    params = {
        **PARAMS,
        "prepare": {**PARAMS["prepare"], "corpora": [*PARAMS["prepare"]["corpora"], bad_corpus]},
    }
    repo = make_repo(tmp_path / "repo", params)
    # data/bad is not a DVC dependency: DVC itself must not need to read the unreadable file.
    expected = plant_bad_files(repo / "data/bad")
    more, as_user = plant_more_bad_files(repo / "data/bad")
    expected.update(more)
    assert set(expected) == set(DETAILS)

    failed = run([*as_user, "mockingjay", "prepare"], repo)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and "nothing was written" in failed.stderr
    for name, detail in DETAILS.items():
        assert re.search(rf"data/bad/{re.escape(name)}: .*{re.escape(detail)}", failed.stderr), (
            name,
            failed.stderr,
        )
    assert not (repo / "data/prepared").exists()

    params["prepare"]["on_error"] = "skip"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The data stages: pretrain, extract and probe read only the features (which hold none of the
    # skipped files) and run on them like on any others (the pipeline tests), so they are left out.
    done = run([*as_user, "dvc", "repro", "featurize"], repo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, detail in DETAILS.items():  # one line per skipped file, naming it and saying why
        assert re.search(
            rf"prepare: skipped data/bad/{re.escape(name)}: .*{re.escape(detail)}", done.stderr
        ), name
    skipped = (repo / "data/prepared/skipped.tsv").read_text().splitlines()[1:]
    assert sorted(
        (Path(line.split("\t")[1]).name, line.split("\t")[2]) for line in skipped
    ) == sorted(expected.items())
    prepare_run = next(r for r in mlflow_runs(repo) if r.data.params.get("on_error") == "skip")
    assert prepare_run.data.metrics["skipped"] == len(expected)

    # Valid: the 44.1 kHz stereo file is down-mixed and resampled, and kept.
    rows = {r.utt_id: r for r in read_manifest(repo / "data/prepared/manifest.tsv")}
    stereo = rows["bad_stereo44k"]
    assert (stereo.sample_rate, stereo.channels) == (44_100, 2)
    assert abs(stereo.num_samples / 16_000 - sf.info(ARCTIC_DIR / "aew_a0001.wav").duration) < 0.01
    assert "bad_stereo44k" in RaggedArray(repo / "data/features" / stereo.split).ids
    # The out-of-vocabulary transcript: align reports it and labels the rest.
    assert re.search(r"align: failed data/bad/oov.wav: .*qwzxvk", done.stderr), done.stderr[-3000:]
    failures = (repo / "data/alignments/failures.tsv").read_text()
    assert "bad_oov" in failures and "OutOfVocabularyError" in failures
    assert "bad_oov" not in RaggedArray(repo / "data/alignments/frame_labels").ids
    assert (
        "arctic_aew_a0003" in RaggedArray(repo / "data/alignments/frame_labels").ids
    )  # same audio, good text

    status = run(["dvc", "status", "featurize"], repo)
    assert "up to date" in status.stdout, status.stdout


# -- invalid parameters ------------------------------------------------------------------------------


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def finished(pristine_pipeline_repo, tmp_path_factory) -> Path:
    """A finished pipeline; the commands below must leave every file in it as it was."""
    return copy_repo(pristine_pipeline_repo, tmp_path_factory.mktemp("invalid") / "repo")


OUTPUT_OPTIONS = {
    "prepare": ["--out", "{tmp}/out"],
    "featurize": ["--out", "{tmp}/out"],
    "pretrain": ["--out", "{tmp}/out", "--checkpoints", "{tmp}/checkpoints"],
    "finetune": [
        "--out",
        "{tmp}/out",
        "--checkpoints",
        "{tmp}/checkpoints",
        "--metrics",
        "{tmp}/finetune.json",
        "--report",
        "{tmp}/report",
    ],
    "probe": [
        "--metrics",
        "{tmp}/out/probe.json",
        "--plot",
        "{tmp}/out/plot.tsv",
        "--report",
        "{tmp}/report",
    ],
}

INVALID = {  # id: (command, params.yaml change or None, what the message must name)
    "negative-learning-rate": (
        ["pretrain"],
        ("pretrain.train.learning_rate", -1e-3),
        "pretrain.train.learning_rate",
    ),
    "mask-proportion-above-1": (
        ["pretrain"],
        ("pretrain.mask.mask_proportion", 1.5),
        "pretrain.mask.mask_proportion",
    ),
    "mask-proportion-0": (
        ["pretrain"],
        ("pretrain.mask.mask_proportion", 0.0),
        "pretrain.mask.mask_proportion",
    ),
    "unknown-preset": (["pretrain"], ("pretrain.preset", "giant"), "pretrain.preset"),
    "preset-for-other-features": (
        ["pretrain"],
        ("pretrain.preset", "paper-base"),
        "pretrain.model.input_dim",
    ),
    "batch-cap-below-one-utterance": (
        ["pretrain"],
        ("pretrain.train.max_frames_per_batch", 10),
        "pretrain.train.max_frames_per_batch",
    ),
    "unknown-device": (["pretrain", "--device", "tpu"], None, "--device"),
    "negative-hop": (["featurize"], ("featurize.hop_ms", -10), "featurize.hop_ms"),
    "probe-layer-99": (["probe", "--layer", "99"], None, "--layer"),
    "finetune-unknown-variant": (
        ["finetune"],
        ("finetune.variants", ["finetuned", "pretrained"]),
        "finetune.variants",
    ),
    "finetune-head-kind": (["finetune"], ("finetune.head.kind", "lstm"), "finetune.head.kind"),
    "corpus-path-does-not-exist": (
        ["prepare"],
        ("prepare.corpora.0.path", "data/does-not-exist"),
        "prepare.corpora[0].path",
    ),
}


def changed(params: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return params


def imported_modules(stderr: str) -> set[str]:
    """Top-level modules a process imported, from its PYTHONPROFILEIMPORTTIME lines on stderr."""
    return {
        m.group(1).split(".")[0]
        for m in re.finditer(r"^import time:.*\|\s*([\w.]+)$", stderr, re.M)
    }


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_param_is_named_before_any_work(finished, tmp_path, case):
    command, change, name = INVALID[case]
    params = yaml.safe_load((finished / "params.yaml").read_text())
    if change:
        changed(params, *change)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = file_stats(finished)
    options = [o.format(tmp=tmp_path) for o in OUTPUT_OPTIONS[command[0]]]
    result = run(
        ["mockingjay", *command, "--params", str(tmp_path / "params.yaml"), *options],
        finished,
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "typer" in imported_modules(result.stderr)  # the import log is there to be read
    # every command validates its settings without torch: a mistake is reported before it loads (~2 s)
    assert not {"torch", "mlflow"} & imported_modules(result.stderr)
    assert f"error: invalid parameter: {name}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "params.yaml"
    ]  # no output, not even a folder
    assert file_stats(finished) == before  # nothing in the repository changed: no MLflow run either


def test_help_starts_without_loading_torch_or_mlflow(tmp_path):
    for command in (
        [],
        ["probe"],
        ["pretrain"],
        ["finetune"],
        ["import-checkpoint"],
        ["checkpoints", "list"],
    ):
        result = run(
            ["mockingjay", *command, "--help"], tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"}
        )
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
        imported = imported_modules(result.stderr)
        assert "typer" in imported and not {"torch", "mlflow", "sklearn"} & imported, (
            command,
            imported,
        )
