"""Silent wrong answers and errors a user can act on (issue 13, RELIABILITY.md): each test makes the
fault happen for real (real stores, files, audio and filesystems; the `mockingjay` command as a
subprocess where the user met the fault through it) and checks what the user now sees."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_model

from mockingjay.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_model_dir,
    save_checkpoint,
    save_model_dir,
)
from mockingjay.config import ParamError
from mockingjay.corpora import read_corpus
from mockingjay.corpus_spec import CorpusSpec, is_safe_id
from mockingjay.extract import extract_representations
from mockingjay.featstore import RaggedArray, RaggedWriter, StoreError
from mockingjay.manifest import (
    ManifestRow,
    find_duplicate_ids,
    read_manifest,
    validate_utterance,
    write_tsv,
)
from mockingjay.model import MockingjayForMAM, ModelConfig
from mockingjay.probe_stores import open_representations
from mockingjay.safe_load import load_untrusted
from stages.pretrain_params import resolve_configs

from .conftest import ARCTIC_DIR, FSDD_DIR, ROOT, run
from .test_reliability_input import imported_modules

TINY = ModelConfig(
    input_dim=8, target_dim=8, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64
)


@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """Tiny tensors here: see conftest.one_torch_thread."""


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# -- 1. NaN or inf in stores ----------------------------------------------------------------


def test_non_finite_values_are_refused_where_stores_are_written_and_read(tmp_path):
    rows = np.ones((5, 4))
    rows[2, 1] = 70000.0  # above float16's largest value: stored as inf
    store = tmp_path / "representations" / "train" / "layer_02"
    with pytest.raises(
        StoreError,
        match=r"layer_02: split train, utterance 'u1' has 0 NaN and 1 inf values "
        r"\(float16 holds at most 65504\)",
    ):
        with RaggedWriter(store, 4) as writer:
            writer.append("u0", np.zeros((3, 4)))
            writer.append("u1", rows)
    assert list(store.parent.iterdir()) == []  # nothing published, no temporary left

    # A finished store spoilt afterwards (written by older code, or edited): its readers refuse it.
    root = tmp_path / "reps"
    for split in ("train", "dev", "test"):
        for layer in ("input", "layer_00", "layer_01"):
            with RaggedWriter(root / split / layer, 4) as writer:
                for i in range(6):
                    writer.append(f"{split}_{i}", np.full((3 + i, 4), i, dtype=np.float32))
    spoilt = RaggedArray(root / "dev" / "layer_01", mode="r+")
    spoilt.get("dev_4")[1, 3] = np.nan
    spoilt.data.flush()
    with pytest.raises(
        StoreError, match=r"dev/layer_01: split dev, utterance 'dev_4' has 1 NaN and 0 inf"
    ):
        open_representations(root)  # what the probe stage reads
    for chunk_values in (4, 7, 1 << 24):  # the bad row found whatever the chunk boundaries
        with pytest.raises(StoreError, match="'dev_4'"):
            RaggedArray(root / "dev" / "layer_01").check_finite(chunk_values)
    assert len(RaggedArray(root / "dev" / "layer_01")) == 6  # opening without the check still works
    open_representations(root, layers=[0])  # the other layer is fine


def test_pretrain_refuses_features_holding_inf_naming_the_store_before_training(tmp_path):
    """The features of a finished featurize, spoilt afterwards: `mockingjay pretrain` stops before
    any run starts (no checkpoint, no model, no MLflow run) with one line naming the utterance."""
    from mockingjay.feature_config import FeatureConfig

    features = tmp_path / "features"
    features.mkdir()
    settings = FeatureConfig()
    (features / "feature_config.json").write_text(json.dumps(settings.to_dict()))
    rng = np.random.default_rng(0)
    for split in ("train", "dev", "test"):
        with RaggedWriter(
            features / split, settings.dim, attrs={"feature_config": settings.to_dict()}
        ) as writer:
            for i in range(3):
                writer.append(f"{split}_{i}", rng.standard_normal((40, settings.dim)))
    spoilt = RaggedArray(features / "train", mode="r+")
    spoilt.get("train_2")[5, 0] = np.inf
    spoilt.data.flush()
    result = run(
        [
            "mockingjay",
            "pretrain",
            "--params",
            str(ROOT / "params.yaml"),
            "--features",
            "features",
            "--out",
            "models",
            "--checkpoints",
            "checkpoints",
        ],
        tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert one_line_error(result).startswith(
        "error: features/train: split train, utterance 'train_2' has 0 NaN and 1 inf values"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]


def test_extract_refuses_representations_that_overflow_float16_naming_the_layer_and_utterance(
    tmp_path,
):
    """A model whose last layer gives values above 65504 (an output LayerNorm bias of 70000): extract
    stores float16, so they would be inf. The writer refuses the first item written (the longest),
    naming the layer's store, the split and the utterance, and publishes no store."""
    rng = np.random.default_rng(0)
    with RaggedWriter(tmp_path / "features" / "dev", 8) as writer:
        for i in range(3):
            writer.append(f"dev_{i}", rng.standard_normal((20 + 10 * i, 8)))
    model = MockingjayForMAM(TINY).eval()
    with torch.no_grad():
        model.encoder.layers[-1].output_norm.bias[3] = 70000.0
    with pytest.raises(
        StoreError,
        match=r"reps/dev/layer_01: split dev, utterance 'dev_2' has 0 NaN and 40 inf "
        r"values \(float16 holds at most 65504\)",
    ):
        extract_representations(
            model,
            RaggedArray(tmp_path / "features" / "dev"),
            tmp_path / "reps" / "dev",
            progress=False,
        )
    assert list((tmp_path / "reps" / "dev").iterdir()) == []  # no store, no temporary folder


@pytest.mark.slow
def test_extract_and_online_probe_refuse_features_holding_nan_naming_the_store(
    featurized_repo, tmp_path
):
    """The features of a real featurize run, one value of a dev utterance made NaN afterwards:
    `mockingjay extract` and `mockingjay probe` in online mode (which reads the features itself)
    each stop with one line naming the store, the split and the utterance, and write no output."""
    shutil.copytree(featurized_repo / "data" / "features", tmp_path / "features")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"extract": {"device": "cpu"}, "probe": {"mode": "online", "device": "cpu"}})
    )
    settings = json.loads((tmp_path / "features" / "feature_config.json").read_text())
    config = ModelConfig(
        input_dim=settings["n_mels"],
        target_dim=settings["n_mels"],
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
    )
    save_model_dir(tmp_path / "model", MockingjayForMAM(config), config, {"features": settings})
    spoilt = RaggedArray(tmp_path / "features" / "dev", mode="r+")
    utterance = spoilt.ids[-1]
    spoilt.get(utterance)[-1, -1] = np.nan
    spoilt.data.flush()
    expected = f"error: features/dev: split dev, utterance '{utterance}' has 1 NaN and 0 inf values"
    commands = {
        "extract": ["--features", "features", "--out", "reps"],
        "probe": ["--features", "features", "--report", "report", "--metrics", "probe.json"],
    }
    for command, options in commands.items():
        result = run(["mockingjay", command, "--model", "model", *options], tmp_path)
        assert result.returncode == 1, result.stderr
        assert one_line_error(result).startswith(expected), command
    assert not {"reps", "report", "probe.json"} & {p.name for p in tmp_path.iterdir()}


# -- 2 and 3. Misspelt sections, unknown keys, a num_heads that does not divide -----------------


def test_a_misspelt_section_or_unknown_key_is_refused_naming_it_and_the_file(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cases = {
        "pretrian": (
            {
                **{k: v for k, v in params.items() if k != "pretrain"},
                "pretrian": params["pretrain"],
            },
            "error: invalid parameter: pretrian: unknown section in {file} (did you mean pretrain?)",
        ),
        "key": (
            {**params, "featurize": {**params["featurize"], "hopms": 12.5}},
            "error: invalid parameter: featurize: unknown parameter(s) hopms; valid: ",
        ),
    }
    for name, (content, expected) in cases.items():
        file = tmp_path / f"{name}.yaml"
        file.write_text(yaml.safe_dump(content))
        result = run(
            [
                "mockingjay",
                "featurize",
                "--params",
                str(file),
                "--manifest",
                "none.tsv",
                "--out",
                str(tmp_path / "features"),
            ],
            tmp_path,
            env={"PYTHONPROFILEIMPORTTIME": "1"},
        )
        assert result.returncode == 2, result.stderr
        line = one_line_error(result)
        assert line.startswith(expected.format(file=file)) and str(file) in line, line
        assert not {"torch", "mlflow"} & imported_modules(result.stderr)
    # A study's file holds the sections it changes, of other stages too: accepted.
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump({"extract": params["extract"], "featurize": params["featurize"]})
    )
    result = run(
        [
            "mockingjay",
            "featurize",
            "--params",
            str(study),
            "--manifest",
            "none.tsv",
            "--out",
            str(tmp_path / "features"),
        ],
        tmp_path,
    )
    assert result.returncode == 1 and "none.tsv: manifest not found" in one_line_error(result)

    with pytest.raises(
        ParamError, match=r"^pretrain\.model\.num_heads: 3 does not divide hidden_size 256"
    ):
        resolve_configs(
            {**params["pretrain"], "model": {**params["pretrain"]["model"], "num_heads": 3}}, 80, 80
        )


def test_an_edited_checkpoint_config_is_refused_and_files_without_a_fingerprint_still_load(
    tmp_path,
):
    torch.manual_seed(0)
    model = MockingjayForMAM(TINY)
    folder = save_model_dir(tmp_path / "model", model, TINY)
    config_file = folder / "config.json"
    original = config_file.read_text()
    features = torch.randn(1, 20, 8)

    def edited(**model_changes) -> None:
        payload = json.loads(original)
        payload["model"].update(model_changes)
        config_file.write_text(json.dumps(payload))

    edited(num_heads=8)  # the same tensor shapes: loaded silently before, with other features out
    with pytest.raises(CheckpointError) as refused:
        load_model_dir(folder)
    assert str(folder / "model.safetensors") in str(refused.value)
    assert "num_heads: weights 4 vs config.json 8" in str(refused.value)
    edited(num_heads=3)
    with pytest.raises(
        CheckpointError, match=r"config.json: invalid model config: .*num_heads: 3 does not divide"
    ):
        load_model_dir(folder)
    # A checkpoint, as a resumed run reads it, is checked the same way.
    step = save_checkpoint(tmp_path / "ckpt", 1, model, {"model": TINY.to_dict()}, {"step": 1})
    payload = json.loads((step / "config.json").read_text())
    payload["model"]["num_heads"] = 2
    (step / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="num_heads: weights 4 vs config.json 2"):
        load_model_dir(step)
    # A file written before the fingerprint existed (no metadata) loads as before.
    config_file.write_text(original)
    save_model(model, str(folder / "model.safetensors"))
    loaded, _ = load_model_dir(folder)
    with torch.no_grad():
        assert torch.equal(
            loaded.encoder(features).hidden_states[-1],
            model.eval().encoder(features).hidden_states[-1],
        )


# -- 4. import-checkpoint on a file that is not a checkpoint -----------------------------------


def test_import_checkpoint_names_a_missing_empty_or_foreign_file_before_loading_torch(tmp_path):
    (tmp_path / "folder.ckpt").mkdir()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "zeros.ckpt").write_bytes(bytes(4096))
    (tmp_path / "notes.ckpt").write_text("not a model\n")
    expected = {
        "missing.ckpt": "not found",
        "folder.ckpt": "not a file",
        "empty.ckpt": "empty file (0 bytes)",
        "zeros.ckpt": "not a torch checkpoint (neither a zip archive nor a pickle; starts with 00 00 00 00)",
        "notes.ckpt": "not a torch checkpoint",
    }
    for name, message in expected.items():
        result = run(
            ["mockingjay", "import-checkpoint", name, "out"],
            tmp_path,
            env={"PYTHONPROFILEIMPORTTIME": "1"},
        )
        assert result.returncode == 1, result.stderr
        assert one_line_error(result).startswith(f"error: {name}: {message}")
        assert "torch" not in imported_modules(result.stderr)
        assert "weights_only" not in result.stderr
        assert not (tmp_path / "out").exists()
    # A file that looks like a pickle but is not one: torch's own error, without its advice to
    # retry with weights_only=False (which would run the file's code).
    (tmp_path / "fake.ckpt").write_bytes(b"\x80\x02" + bytes(64))
    with pytest.raises(CheckpointError) as refused:
        load_untrusted(tmp_path / "fake.ckpt")
    assert "fake.ckpt" in str(refused.value) and "weights_only" not in str(refused.value)
    assert "arbitrary code" not in str(refused.value)


# -- 5. File modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"]
)
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    model = MockingjayForMAM(TINY)
    previous = os.umask(umask)
    try:
        folders = [
            save_model_dir(tmp_path / "model", model, TINY),
            save_checkpoint(tmp_path / "ckpt", 1, model, {"model": TINY.to_dict()}, {"step": 1}),
        ]
    finally:
        os.umask(previous)
    modes = {
        f"{f.parent.name}/{f.name}": oct(f.stat().st_mode & 0o777)
        for folder in folders
        for f in folder.iterdir()
    }
    assert set(modes) == {
        "model/model.safetensors",
        "model/config.json",
        "step-000001/model.safetensors",
        "step-000001/config.json",
        "step-000001/trainer_state.pt",
    }
    assert set(modes.values()) == {oct(mode)}, modes


# -- 6. Read-only folders, files in the way, full disks ----------------------------------------


def _without_root_overrides() -> list[str]:
    """Root ignores file modes (CAP_DAC_OVERRIDE): run the command with that capability dropped
    from its bounding set, so a mode-0555 folder refuses it as it refuses a user."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a mode-0555 folder stays writable")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_a_read_only_folder_or_a_file_in_the_way_is_named_before_any_work(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(ARCTIC_DIR / "aew_a0001.wav", corpus)
    shutil.copy(ARCTIC_DIR / "aew_a0001.txt", corpus)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {"prepare": {"corpora": [{"name": "arc", "format": "arctic", "path": str(corpus)}]}}
        )
    )
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    (tmp_path / "afile").write_text("a file, not a folder\n")
    os.chmod(readonly, 0o555)
    try:
        cases = {
            (
                "prepare",
                "--out",
                "readonly/prepared",
            ): "error: --out readonly/prepared: cannot write in {tmp}/readonly: permission denied",
            (
                "prepare",
                "--out",
                "afile/prepared",
            ): "error: --out afile/prepared: {tmp}/afile is a file, not a folder",
            (
                "prepare",
                "--out",
                "p",
                "--metrics",
                "readonly/m.json",
            ): "error: --metrics readonly/m.json: cannot write in {tmp}/readonly: permission denied",
        }
        for args, expected in cases.items():
            result = run(
                [*_without_root_overrides(), "mockingjay", *args],
                tmp_path,
                env={"PYTHONPROFILEIMPORTTIME": "1"},
            )
            assert result.returncode == 1, result.stderr
            assert one_line_error(result) == expected.format(tmp=tmp_path.resolve())
            assert not {"torch", "mlflow"} & imported_modules(result.stderr)  # before any work
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "afile",
            "corpus",
            "params.yaml",
            "readonly",
        ]
        assert list(readonly.iterdir()) == []
    finally:
        os.chmod(readonly, 0o755)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    """A real full filesystem: an 8 KiB tmpfs (two pages) mounted in the command's own user and mount
    namespace (`unshare -rm`, no privileges needed), holding a README and the metrics it is rendered
    from, so that `mockingjay results-table` has no page left for the new README."""
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True)
        if shutil.which("unshare")
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip(
            "unshare -rm is not available: cannot mount a small filesystem without privileges"
        )
    readme = "# results\n<!-- results:demo -->\nold\n<!-- /results:demo -->\n" + "x" * 3000 + "\n"
    metrics = {"phone": {"layer_00": {"accuracy": 0.5, "macro_f1": 0.4, "majority_rate": 0.1}}}
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "probe.json").write_text(json.dumps(metrics))
    (tmp_path / "full").mkdir()
    script = (
        "mount -t tmpfs -o size=8k tmpfs full && mkdir full/metrics && cp README.md full/ && "
        "cp probe.json full/metrics/ && mockingjay results-table --readme full/README.md; rc=$?; "
        "ls -A full; cmp full/README.md README.md && echo unchanged; exit $rc"
    )
    result = run(["unshare", "-rm", "sh", "-c", script], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert one_line_error(result) == "error: full/README.md.tmp: no space left on device"
    assert result.stdout.split() == [
        "README.md",
        "metrics",
        "unchanged",
    ]  # no half-written file left


def test_a_checkpoint_write_past_a_file_size_limit_says_so_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored, so the write fails with EFBIG) in this process: safetensors'
    and torch's own write errors are said as OSErrors naming the file. Limits between the weights'
    size and the trainer state's reach each writer in turn."""
    model = MockingjayForMAM(TINY)
    weights_bytes = save_model_dir(tmp_path / "sizes", model, TINY) / "model.safetensors"
    state = {
        "optimizer": [torch.zeros(weights_bytes.stat().st_size)]
    }  # 4 bytes a value: 4x the weights
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    for limit, file in (
        (1024, "model.safetensors"),
        (2 * weights_bytes.stat().st_size, "trainer_state.pt"),
    ):
        checkpoints = tmp_path / f"ckpt-{limit}"
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            with pytest.raises(OSError) as failed:
                save_checkpoint(checkpoints, 1, model, {"model": TINY.to_dict()}, state)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert failed.value.strerror == "File too large" and failed.value.filename.endswith(file), (
            failed.value
        )
        assert list_checkpoints(checkpoints) == [] and list(checkpoints.iterdir()) == []
    signal.signal(signal.SIGXFSZ, handler)


# -- 7. File names with spaces and other letters -------------------------------------------------


def test_file_names_with_spaces_and_other_letters_get_safe_ids_and_keep_their_paths(tmp_path):
    corpus = tmp_path / "arctic"
    corpus.mkdir()
    names = ["my recording", unicodedata.normalize("NFC", "café"), "Łódź_1", "plain_0001"]
    for name in names:
        shutil.copy(ARCTIC_DIR / "aew_a0001.wav", corpus / f"{name}.wav")
        shutil.copy(ARCTIC_DIR / "aew_a0001.txt", corpus / f"{name}.txt")
    spec = CorpusSpec(name="arc", format="arctic", path=str(corpus))
    sources = read_corpus(spec)
    ids = {Path(s.path).stem: s.utt_id for s in sources}
    assert sorted(ids) == sorted(names) and all(map(is_safe_id, ids.values()))
    assert ids["plain_0001"] == "arc_plain_0001"  # safe names are unchanged: the same ids as before
    assert ids["my recording"].startswith("arc_my_recording-") and ids["café"].startswith(
        "arc_caf-"
    )
    assert (
        len(set(ids.values())) == 4 and read_corpus(spec) == sources
    )  # distinct and deterministic
    rows = [
        validate_utterance(s, align=True, target_sample_rate=16000, min_duration_sec=0.025)
        for s in sources
    ]
    assert all(isinstance(r, ManifestRow) for r in rows), rows
    write_tsv(tmp_path / "manifest.tsv", rows, ManifestRow)
    assert {Path(r.path).name for r in read_manifest(tmp_path / "manifest.tsv")} == {
        f"{n}.wav" for n in names
    }

    # The same name typed as decomposed letters (macOS) is one id: both files are named, not merged.
    shutil.copy(
        ARCTIC_DIR / "aew_a0001.wav", corpus / f"{unicodedata.normalize('NFD', 'café')}.wav"
    )
    problems = find_duplicate_ids(read_corpus(spec))
    assert len(problems) == 2 and {p.reason for p in problems} == {"duplicate_id"}
    assert {unicodedata.normalize("NFC", Path(p.path).stem) for p in problems} == {"café"}

    # FSDD speakers with letters beyond ASCII were skipped without a word; a tsv path with a space.
    fsdd = tmp_path / "fsdd"
    fsdd.mkdir()
    shutil.copy(FSDD_DIR / "3_theo_0.wav", fsdd / "3_józef_0.wav")
    (fsdd / "sub dir").mkdir()
    shutil.copy(FSDD_DIR / "3_theo_0.wav", fsdd / "sub dir" / "ünï 1.wav")
    (fsdd / "list.tsv").write_text("path\tspeaker\nsub dir/ünï 1.wav\tanna\n", encoding="utf-8")
    [digit] = read_corpus(CorpusSpec(name="f", format="fsdd", path=str(fsdd)))
    assert digit.speaker == "f_józef" and is_safe_id(digit.utt_id) and digit.transcript == "three"
    [listed] = read_corpus(CorpusSpec(name="t", format="tsv", path=str(fsdd / "list.tsv")))
    assert is_safe_id(listed.utt_id) and Path(listed.path) == fsdd / "sub dir" / "ünï 1.wav"
