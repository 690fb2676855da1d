"""Shared fixtures: the real audio fixtures, planted bad files, and a CLI runner."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FSDD_DIR = FIXTURES / "fsdd" / "recordings"
ARCTIC_DIR = FIXTURES / "cmu_arctic" / "wav"
BIN = Path(sys.executable).parent


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_EXP_NAME", None)
    env.update(extra or {})
    return env


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command to its end (in a process group of its own); fails only if it stalls (see
    `communicate`), never because a loaded machine makes it slow."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,
    )
    out, err = communicate(proc, f"{' '.join(map(str, args))} in {cwd}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def communicate(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    """`proc.communicate()` for as long as it takes while the process group of `proc` (started
    with process_group=0 or start_new_session=True) keeps using CPU time. If none of its
    processes used any for STALLED_AFTER seconds the group is SIGKILLed and the test fails."""
    result = {}
    reader = threading.Thread(target=lambda: result.update(outputs=proc.communicate()), daemon=True)
    reader.start()
    try:
        wait_while_progressing(
            lambda: not reader.is_alive(),
            lambda: cpu_ticks(process_group(proc.pid)),
            lambda: f"{what} stalled",
            poll=0.01,
        )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(10)
        raise
    reader.join()
    return result["outputs"]


def make_librispeech(
    root: Path, speakers: dict[str, list[Path]], chapter: str = "100", transcripts: bool = True
) -> None:
    """Lay real recordings out as LibriSpeech: speaker/chapter/speaker-chapter-utt.flac + trans.txt."""
    for speaker, files in speakers.items():
        folder = root / speaker / chapter
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, src in enumerate(files):
            data, rate = sf.read(src, dtype="float32")
            utt = f"{speaker}-{chapter}-{i:04d}"
            sf.write(folder / f"{utt}.flac", data, rate)
            text = src.with_suffix(".txt")
            lines.append(f"{utt} {text.read_text().strip().upper() if text.exists() else 'ZERO'}")
        if transcripts:
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")


def plant_bad_files(folder: Path) -> dict[str, str]:
    """Write one file per failure mode into an ARCTIC-style folder; returns file name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good = ARCTIC_DIR / "aew_a0001.wav"
    data, rate = sf.read(good, dtype="float32")

    def with_text(name: str, text: str = "author of the danger trail") -> Path:
        (folder / name).with_suffix(".txt").write_text(text + "\n")
        return folder / name

    with_text("empty.wav").write_bytes(b"")
    flac_bytes = (FIXTURES / "cmu_arctic" / "wav" / "aew_a0002.wav").read_bytes()
    sf.write(
        folder / "truncated.flac", sf.read(ARCTIC_DIR / "aew_a0002.wav", dtype="float32")[0], rate
    )
    whole = (folder / "truncated.flac").read_bytes()
    (folder / "truncated.flac").write_bytes(whole[: len(whole) // 2])
    with_text("truncated.flac")
    with_text("noise.wav").write_bytes(np.random.default_rng(0).bytes(len(flac_bytes) // 10))
    nan = data.copy()
    nan[1000] = np.nan
    sf.write(with_text("nan.wav"), nan, rate, subtype="FLOAT")
    sf.write(with_text("tiny.wav"), data[: int(0.005 * rate)], rate)
    sf.write(folder / "notext.wav", data, rate)
    # A valid 44.1 kHz stereo file: must be accepted (down-mixed and resampled), not rejected.
    import torch
    import torchaudio.functional as AF

    up = AF.resample(torch.from_numpy(data), rate, 44_100).numpy()
    sf.write(with_text("stereo44k.wav"), np.stack([up, 0.5 * up], axis=1), 44_100)
    return {
        "empty.wav": "empty",
        "truncated.flac": "truncated",
        "noise.wav": "unreadable",
        "nan.wav": "non_finite",
        "tiny.wav": "too_short",
        "notext.wav": "missing_transcript",
    }


PARAMS = {
    "prepare": {
        "seed": 3,
        "on_error": "fail",
        "corpora": [
            {"name": "libri", "format": "librispeech", "path": "data/sample/libri"},
            {"name": "arctic", "format": "arctic", "path": "data/sample/arctic", "align": True},
            {"name": "fsdd", "format": "fsdd", "path": "data/sample/fsdd", "align": True},
        ],
    },
    "align": {"workers": 2, "imports": []},
    "featurize": {
        "preset": "tera",
        "sample_rate": 16000,
        "hop_ms": None,
        "cmvn": "utterance",
        "workers": 2,
    },
}


def make_repo(path: Path, params: dict = PARAMS) -> Path:
    """A fresh git + DVC repository holding the project's dvc.yaml and code, and fixture corpora."""
    path.mkdir(parents=True, exist_ok=True)
    for folder in ("mockingjay", "stages"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    sample = path / "data" / "sample"
    shutil.copytree(FSDD_DIR, sample / "fsdd")
    shutil.copytree(ARCTIC_DIR, sample / "arctic")
    make_librispeech(
        sample / "libri",
        {
            "61": sorted(FSDD_DIR.glob("[0-4]_theo_0.wav")),
            "121": sorted(FSDD_DIR.glob("[5-9]_lucas_0.wav")),
        },
        transcripts=False,
    )
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(ROOT / ".gitignore", path / ".gitignore")
    # A local identity: DVC experiments commit through pygit2, which ignores GIT_AUTHOR_* variables.
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.name", "mockingjay tests"],
        ["git", "config", "user.email", "tests@mockingjay.invalid"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "fixture repo"],
    ):
        result = run(cmd, path)
        assert result.returncode == 0, result.stderr
    return path


def copy_repo(src: Path, dest: Path) -> Path:
    """A copy of a repository whose MLflow store is its own: MLflow records absolute artifact
    paths, so without repointing them the copy's new runs would write into the source's
    `mlartifacts/` (a shared, read-only fixture under pytest-xdist)."""
    shutil.copytree(src, dest, symlinks=True)
    if (dest / "mlflow.db").exists():
        old, new = (src / "mlartifacts").as_uri(), (dest / "mlartifacts").as_uri()
        with contextlib.closing(sqlite3.connect(dest / "mlflow.db")) as store, store:
            store.execute(
                "UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                (old, new),
            )
            store.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return dest


# How long a waiting test lets a command show no sign of life (no output, no CPU time used by any of
# its processes, nothing else its caller watches) before it gives up. Not a deadline: a command that
# is slow but working, on a machine as loaded as it gets, is waited for however long it takes.
STALLED_AFTER = 600.0


def cpu_ticks(pids) -> int:
    """CPU time (clock ticks, user + system, the reaped children's included) of processes `pids`."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total


def process_group(pgid: int) -> list[int]:
    """The processes of process group `pgid` (a command started with start_new_session=True)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def wait_while_progressing(
    done: Callable[[], bool],
    progress: Callable[[], object],
    what: Callable[[], str],
    poll: float = 0.002,
    check_every: float = 1.0,
    stalled_after: float | None = None,
) -> None:
    """Poll `done()` until it is true. Fails only when `progress()` (any value that changes while
    the awaited work goes on: output length, CPU time, files) stayed the same for `stalled_after`
    seconds; `what()` then says what was seen."""
    stalled_after = STALLED_AFTER if stalled_after is None else stalled_after
    last, last_change = progress(), time.monotonic()
    next_check = last_change + check_every
    while not done():
        now = time.monotonic()
        if now >= next_check:
            current = progress()
            if current != last:
                last, last_change = current, now
            elif now - last_change > stalled_after:
                pytest.fail(f"no progress for {stalled_after:.0f} s:\n{what()}")
            next_check = now + check_every
        time.sleep(poll)


def file_stats(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime in ns) of every file below `root`: what changed between two calls."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def mlflow_runs(repo: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mockingjay")
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` run once per test session, also when pytest-xdist splits the session across
    worker processes: the first worker builds under a file lock, the others wait and reuse it.
    Only for read-only fixtures, since every worker gets the same folder."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return build(tmp_path_factory.mktemp(name))
    folder = tmp_path_factory.getbasetemp().parent / name  # shared by this session's workers
    with FileLock(f"{folder}.lock"):
        built = folder / ".built"
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            built.write_text(str(build(folder)))  # only a finished build is marked
        return Path(built.read_text())


def _featurize(folder: Path) -> Path:
    repo = make_repo(folder / "repo")
    result = run(["dvc", "repro", "featurize"], repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return repo


@pytest.fixture(scope="session")
def featurized_repo(tmp_path_factory) -> Path:
    """A repository where `dvc repro featurize` has run; copy it before changing anything."""
    return built_once(tmp_path_factory, "e2e", _featurize)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: extra threads only add synchronisation (and stall on a busy 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY_PIPELINE = {
    "pretrain": {
        "preset": "tera-base",
        "model": {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "num_layers": 2},
        "mask": {},
        "train": {
            "total_steps": 30,
            "learning_rate": 2.0e-3,
            "max_frames_per_batch": 3000,
            "max_length": 300,
            "log_every": 5,
            "checkpoint_every": 10,
            "keep_checkpoints": 2,
            "seed": 0,
            "device": "cpu",
        },
    },
    "extract": {"layers": None, "batch_frames": 8000, "device": "cpu"},
    "probe": {
        "tasks": ["phone", "speaker"],
        "layers": "all",
        "mode": "extracted",
        "device": "cpu",
        "phone": {
            "epochs": 5,
            "batch_size": 512,
            "learning_rates": [0.002],
            "weight_decays": [0.0, 0.001],
            "seed": 0,
        },
        "speaker": {
            "epochs": 100,
            "batch_size": 0,
            "learning_rates": [0.01],
            "weight_decays": [0.0, 0.001],
            "seed": 0,
        },
    },
    "finetune": {
        "tasks": ["phone", "speaker"],
        "variants": ["finetuned", "frozen", "scratch", "logmel"],
        "label_fractions": [1.0],
        "train": {
            "total_steps": 8,
            "learning_rate": 4.0e-3,
            "max_frames_per_batch": 3000,
            "max_length": 300,
            "log_every": 2,
            "checkpoint_every": 1000,
            "keep_checkpoints": 1,
            "seed": 0,
            "device": "cpu",
        },
    },
}


@pytest.fixture(scope="session")
def pristine_pipeline_repo(featurized_repo, tmp_path_factory) -> Path:
    """A repository where the whole `dvc repro` (prepare .. probe) has run with a tiny model, and
    that no test changes: the reference outputs of an uninterrupted run. Copy it before running
    anything in it. It starts from a copy of `featurized_repo`, so prepare/align/featurize ran
    in the repository it was copied from."""

    def repro(folder: Path) -> Path:
        repo = copy_repo(featurized_repo, folder / "repo")
        (repo / "params.yaml").write_text(
            yaml.safe_dump({**PARAMS, **TINY_PIPELINE}, sort_keys=False)
        )
        result = run(["dvc", "repro"], repo)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return repo

    return built_once(tmp_path_factory, "pipeline-pristine", repro)


@pytest.fixture(scope="session")
def pipeline_repo(pristine_pipeline_repo, tmp_path_factory) -> Path:
    """A copy of `pristine_pipeline_repo` that the tests of one session (one xdist worker) share:
    they may run more commands in it (test_full_pipeline runs a `dvc exp run` in it)."""
    return copy_repo(pristine_pipeline_repo, tmp_path_factory.mktemp("pipeline") / "repo")


def pytest_configure(config):
    """Give each test process and every command it starts (they inherit its environment) its share
    of the cores. Two xdist workers on two cores, each running torch with a thread per core,
    oversubscribe the machine, and OpenMP's spinning threads then cost more than they give
    (measured: two tiny pipelines side by side took 98 s with the default threads, 83 s with one
    each). Set here, in the controller before it starts the workers and in each worker, so torch
    reads it when first imported; a value the user set is kept."""
    workers = getattr(config, "workerinput", {}).get("workercount") or config.getoption(
        "numprocesses", None
    )
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(max(1, len(os.sched_getaffinity(0)) // workers)))


# -- scheduling (make test: pytest-xdist --dist loadgroup) -------------------------------------------
# Tests are handed to the workers one by one in collection order (a test with an xdist_group
# mark goes with the rest of its group, to one worker, so that the group's fixture is built once).
# This order interleaves modules, and pytest tears a module-scoped fixture down whenever the next
# test is from another module, so a fixture that builds something costly (a pipeline run, a
# server) is session-scoped, built at most once per worker: a module-scoped `scratch` pipeline was
# built twice in one run (93 s each).
# The longest go first, so that none starts near the end while the other workers idle, and the
# order keeps the workers apart at the start: the first needs `pristine_pipeline_repo` (it builds
# `featurized_repo`, then the pipeline) while the next ones run the tests that build repositories
# of their own, instead of waiting for that build. The unit tests fill in at the end. The order
# within a module is otherwise kept.
LONGEST_FIRST = (
    "test_reliability.py::test_queued_experiments",  # needs pristine_pipeline_repo
    "test_reliability_input.py::test_bad_files",  # its own repository
    "test_keyword_pipeline.py::",  # its own corpus
    "test_reliability_stop.py::test_trying_other_configurations",
    "test_reliability.py::test_two_runs_from_scratch",  # group "scratch": the pipeline again from scratch
    "test_reliability.py::test_pipeline_writes_only",
    "test_reliability.py::test_pretrain_killed",
    "test_reliability.py::test_stage_killed",
    "test_reliability_stop.py::",
    "test_benchmarks.py::",
    "test_ddp.py::",
    "test_mlflow_ui.py::",
    "test_reliability_dataloss.py::",
    "test_full_pipeline.py::",
    "test_interop.py::test_import_probe",
    "test_data_pipeline.py::",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> tuple[int, int]:
        for i, prefix in enumerate(LONGEST_FIRST):
            if prefix in item.nodeid:
                return i, 0
        return len(LONGEST_FIRST), 0 if item.get_closest_marker("slow") else 1

    order = {id(item): n for n, item in enumerate(items)}
    items.sort(key=lambda item: (*rank(item), order[id(item)]))
