"""The keyword task end to end through the CLI: a Speech Commands layout (real FSDD digit
recordings renamed `<hash>_nohash_<n>`), held out by speaker, pretrained, extracted, probed with
linear, weighted-sum and label-fraction heads; the Opus fixtures ride along in a Kaldi corpus."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import FIXTURES, FSDD_DIR, TINY_PIPELINE, run

pytestmark = pytest.mark.slow
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def speech_commands_from_fsdd(root: Path, exclude: str = "", only: str = "") -> dict[str, str]:
    """`<word>/<speaker hash>_nohash_0.wav` for FSDD fixture files; returns hash -> speaker."""
    speakers = {}
    for path in sorted(FSDD_DIR.glob("*.wav")):
        digit, speaker, take = path.stem.split("_")
        if speaker == exclude or (only and speaker != only):
            continue
        hashed = hashlib.sha1(speaker.encode()).hexdigest()[:8]
        speakers[hashed] = speaker
        folder = root / DIGITS[int(digit)]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{hashed}_nohash_{take}.wav")
    return speakers


def test_keyword_probe_through_the_cli(tmp_path):
    speakers = speech_commands_from_fsdd(tmp_path / "corpora" / "sc", exclude="yweweler")
    speech_commands_from_fsdd(
        tmp_path / "corpora" / "sc_unseen", only="yweweler"
    )  # a test-only corpus
    shutil.copytree(FIXTURES / "corpora" / "kaldi", tmp_path / "corpora" / "kaldi")
    params = {
        "prepare": {
            "seed": 0,
            "dev_fraction": 0.2,
            "test_fraction": 0.2,
            "workers": 1,
            "corpora": [
                {
                    "name": "sc",
                    "format": "speech_commands",
                    "path": "corpora/sc",
                    "split_by": "speaker",
                },
                {
                    "name": "sc_unseen",
                    "format": "speech_commands",
                    "path": "corpora/sc_unseen",
                    "test_only": True,
                },
                {"name": "so", "format": "kaldi", "path": "corpora/kaldi/train"},
            ],
        },
        "featurize": {"preset": "tera", "workers": 1},
        **{k: v for k, v in TINY_PIPELINE.items() if k != "probe"},
        # 10 steps, not 30: what is checked here is which utterances and classes each probe
        # uses, and the log-mel baseline, none of which depends on how well the model trained
        "pretrain": {
            **TINY_PIPELINE["pretrain"],
            "train": {**TINY_PIPELINE["pretrain"]["train"], "total_steps": 10},
        },
        "probe": {
            "tasks": ["keyword", "speaker"],
            "layers": "all",
            "device": "cpu",
            "test_corpora": ["sc_unseen"],
            "keyword": {
                "epochs": 60,
                "batch_size": 0,
                "learning_rates": [0.01],
                "weight_decays": [0.0],
                "kinds": ["linear", "weighted_sum"],
                "label_fractions": [0.5, 1.0],
                "speaker_independent": True,
                "corpora": ["sc"],
            },
            "speaker": {
                "epochs": 60,
                "batch_size": 0,
                "learning_rates": [0.01],
                "weight_decays": [0.0],
            },
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    steps = [
        ["mockingjay", "prepare", "--out", "data/prepared"],
        [
            "mockingjay",
            "featurize",
            "--manifest",
            "data/prepared/manifest.tsv",
            "--no-labels",
            "--out",
            "data/features",
        ],
        [
            "mockingjay",
            "pretrain",
            "--features",
            "data/features",
            "--out",
            "models/pretrain",
            "--checkpoints",
            "models/checkpoints",
        ],
        [
            "mockingjay",
            "extract",
            "--model",
            "models/pretrain/model",
            "--features",
            "data/features",
            "--out",
            "data/representations",
        ],
        [
            "mockingjay",
            "probe",
            "--representations",
            "data/representations",
            "--features",
            "data/features",
            "--model",
            "models/pretrain/model",
            "--metrics",
            "metrics/probe.json",
            "--report",
            "reports/probe",
        ],
    ]
    for step in steps:
        result = run(step, tmp_path, env)
        assert result.returncode == 0, (
            f"{step[1]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    probe_out = result.stdout

    held = list(
        csv.DictReader(open(tmp_path / "data/prepared/heldout_speakers.tsv"), delimiter="\t")
    )
    test_speakers = {row["speaker"] for row in held if row["split"] == "test"}
    assert len(test_speakers) == 1  # round(5 speakers * 0.2)
    rows = list(csv.DictReader(open(tmp_path / "data/prepared/manifest.tsv"), delimiter="\t"))
    assert {r["split"] for r in rows if r["speaker"] in test_speakers} == {"test"}
    assert {r["keyword"] for r in rows if r["corpus"] == "sc"} == set(DIGITS)
    assert {r["split"] for r in rows if r["corpus"] == "sc_unseen"} == {
        "test"
    }  # never pretrained on

    metrics = json.loads((tmp_path / "metrics/probe.json").read_text())
    keyword = metrics["keyword"]
    assert {"input", "layer_00", "layer_01", "layer_02", "weighted_sum", "fraction_0.5"} <= set(
        keyword
    )
    results = json.loads((tmp_path / "reports/probe/results.json").read_text())["keyword"]
    # the held-out speaker's ten digits, nobody else's (a digit that no train utterance has is left out)
    assert results["examples"]["test"] + results["ignored"]["test"]["utterances"] == 10
    assert results["examples"]["test"] >= 8
    # classes are the train split's keywords: with 28 train clips one digit may have none
    assert set(results["classes"]) <= set(DIGITS) and len(results["classes"]) >= 8
    assert results["ignored"]["test"]["classes"] == sorted(set(DIGITS) - set(results["classes"]))
    assert results["fraction_utterances"]["0.5"] * 2 >= results["fraction_utterances"]["1"]
    assert (
        "weighted_sum" in probe_out and "keyword acc" in probe_out and "unseen corpus" in probe_out
    )
    unseen = keyword["test_corpus_sc_unseen"]  # scored on its own, beside the test split
    assert set(unseen) == {"input", "layer_00", "layer_01", "layer_02"}
    assert results["extra_tests"]["sc_unseen"]["examples"] == len(
        results["classes"]
    )  # one clip a known digit
    speaker = json.loads((tmp_path / "reports/probe/results.json").read_text())["speaker"]
    held_name = f"sc_{next(iter(test_speakers)).split('_', 1)[1]}"
    assert (
        held_name in speaker["ignored"]["test"]["classes"]
    )  # unheard speakers cannot be identified
    assert speakers  # the layout was made from real recordings

    # The log-mel baseline from features made with global CMVN: per-utterance mean-and-variance
    # CMVN leaves statistics pooling nothing of the speaker; global CMVN keeps it.
    global_params = {
        **params,
        "featurize": {"preset": "tera", "workers": 1, "cmvn": "global"},
        "probe": {**params["probe"], "test_corpora": [], "tasks": ["speaker"]},
    }
    (tmp_path / "global.yaml").write_text(yaml.safe_dump(global_params, sort_keys=False))
    for step in (
        [
            "mockingjay",
            "featurize",
            "--params",
            "global.yaml",
            "--manifest",
            "data/prepared/manifest.tsv",
            "--no-labels",
            "--out",
            "data/features_global",
        ],
        [
            "mockingjay",
            "probe",
            "--params",
            "global.yaml",
            "--layer",
            "input",
            "--representations",
            "data/representations",
            "--features",
            "data/features",
            "--baseline-features",
            "data/features_global",
            "--model",
            "models/pretrain/model",
            "--metrics",
            "metrics/global.json",
        ],
    ):
        result = run(step, tmp_path, env)
        assert result.returncode == 0, (
            f"{step[1]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    per_utterance = metrics["speaker"]["input"]["accuracy"]
    global_cmvn = json.loads((tmp_path / "metrics/global.json").read_text())["speaker"]["input"][
        "accuracy"
    ]
    assert set(json.loads((tmp_path / "metrics/global.json").read_text())["speaker"]) == {"input"}
    assert global_cmvn > per_utterance + 0.2, (global_cmvn, per_utterance)
