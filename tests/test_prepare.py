"""Corpus readers, audio validation, splits and params validation (no subprocesses)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mockingjay.audio import AudioError, read_audio
from mockingjay.config import ParamError, from_section
from mockingjay.corpora import read_corpus
from mockingjay.corpus_spec import CorpusError, CorpusSpec
from mockingjay.manifest import (
    ManifestRow,
    PrepareConfig,
    assign_splits,
    find_duplicate_ids,
    read_manifest,
    validate_utterance,
    write_tsv,
)

from .conftest import ARCTIC_DIR, FSDD_DIR, make_librispeech, plant_bad_files


def test_librispeech_reader_nested_layout_with_transcripts(tmp_path):
    make_librispeech(
        tmp_path / "ls",
        {
            "1089": sorted(ARCTIC_DIR.glob("aew_*.wav")),
            "2300": sorted(ARCTIC_DIR.glob("axb_*.wav")),
        },
    )
    utts = read_corpus(CorpusSpec(name="ls", format="librispeech", path=str(tmp_path / "ls")))
    assert [u.utt_id for u in utts][:2] == ["ls_1089-100-0000", "ls_1089-100-0001"]
    assert {u.speaker for u in utts} == {"ls_1089", "ls_2300"}
    first = utts[0]
    assert first.transcript == (ARCTIC_DIR / "aew_a0001.txt").read_text().strip().upper()
    assert Path(first.path).name == "1089-100-0000.flac"


def test_librispeech_reader_flat_folder_without_transcripts(tmp_path):
    # The bundled clips: speaker/speaker-chapter-utt.flac, no chapter folder, no trans.txt.
    folder = tmp_path / "clips" / "367"
    folder.mkdir(parents=True)
    data, rate = sf.read(ARCTIC_DIR / "aew_a0001.wav")
    for i in range(3):
        sf.write(folder / f"367-130732-000{i}.flac", data, rate)
    (folder / "README.txt").write_text("not audio")
    utts = read_corpus(CorpusSpec(name="libri", format="librispeech", path=str(tmp_path / "clips")))
    assert len(utts) == 3
    assert all(u.speaker == "libri_367" and u.transcript is None for u in utts)


def test_fsdd_reader_names_speaker_and_digit_word():
    utts = read_corpus(CorpusSpec(name="fsdd", format="fsdd", path=str(FSDD_DIR)))
    assert len(utts) == 60
    by_id = {u.utt_id: u for u in utts}
    assert by_id["fsdd_7_jackson_0"].transcript == "seven"
    assert by_id["fsdd_7_jackson_0"].speaker == "fsdd_jackson"
    assert len({u.speaker for u in utts}) == 6


def test_arctic_reader_pairs_transcripts_and_prefix_speakers():
    utts = read_corpus(CorpusSpec(name="arctic", format="arctic", path=str(ARCTIC_DIR)))
    assert len(utts) == 8
    speakers = Counter(u.speaker for u in utts)
    assert speakers["arctic_aew"] == 3 and speakers["arctic_axb"] == 3
    slt = next(u for u in utts if u.utt_id == "arctic_slt_a0009")
    assert slt.transcript.startswith("He turned sharply")
    fixed = read_corpus(
        CorpusSpec(name="k", format="arctic", path=str(ARCTIC_DIR), speaker="kathleen")
    )
    assert {u.speaker for u in fixed} == {"k_kathleen"}


def test_tsv_manifest_reader_and_path_escape_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "a").mkdir(parents=True)
    shutil.copy(ARCTIC_DIR / "aew_a0001.wav", corpus / "a" / "one.wav")
    (corpus / "list.tsv").write_text("path\tspeaker\ttranscript\na/one.wav\tspk1\thello world\n")
    utts = read_corpus(CorpusSpec(name="m", format="tsv", path=str(corpus / "list.tsv")))
    assert (
        utts[0].utt_id == "m_a-one"
        and utts[0].speaker == "m_spk1"
        and utts[0].transcript == "hello world"
    )
    (corpus / "evil.tsv").write_text("path\tspeaker\n../../etc/passwd\tspk\n")
    with pytest.raises(CorpusError, match=r"evil.tsv:2: path '../../etc/passwd' escapes"):
        read_corpus(CorpusSpec(name="m", format="tsv", path=str(corpus / "evil.tsv")))
    (corpus / "nocol.tsv").write_text("file\tspeaker\nx.wav\ts\n")
    with pytest.raises(CorpusError, match="missing column"):
        read_corpus(CorpusSpec(name="m", format="tsv", path=str(corpus / "nocol.tsv")))


def test_missing_corpus_path_is_named(tmp_path):
    with pytest.raises(CorpusError, match=str(tmp_path / "nowhere")):
        read_corpus(CorpusSpec(name="x", format="fsdd", path=str(tmp_path / "nowhere")))


def test_read_audio_resamples_8k_and_downmixes_stereo(tmp_path):
    fsdd = read_audio(FSDD_DIR / "3_theo_0.wav")
    info = sf.info(FSDD_DIR / "3_theo_0.wav")
    assert fsdd.source_sample_rate == 8000 and fsdd.sample_rate == 16000 and fsdd.was_resampled
    assert abs(len(fsdd.samples) - 2 * info.frames) <= 1
    data, rate = sf.read(ARCTIC_DIR / "aew_a0001.wav", dtype="float32")
    sf.write(tmp_path / "st.wav", np.stack([data, np.zeros_like(data)], axis=1), rate)
    stereo = read_audio(tmp_path / "st.wav")
    assert stereo.was_downmixed and stereo.source_channels == 2
    np.testing.assert_allclose(stereo.samples, data / 2, atol=1e-4)


def test_every_planted_bad_file_gets_its_own_reason(tmp_path):
    expected = plant_bad_files(tmp_path / "bad")
    utts = read_corpus(CorpusSpec(name="bad", format="arctic", path=str(tmp_path / "bad")))
    results = {Path(u.path).name: validate_utterance(u, True, 16000, 0.025) for u in utts}
    for name, reason in expected.items():
        problem = results[name]
        assert not isinstance(problem, ManifestRow), name
        assert problem.reason == reason, (name, problem)
        assert name in problem.path
    stereo = results["stereo44k.wav"]
    assert isinstance(stereo, ManifestRow) and stereo.sample_rate == 44100 and stereo.channels == 2
    assert abs(stereo.duration - sf.info(ARCTIC_DIR / "aew_a0001.wav").duration) < 0.01


def test_read_audio_error_names_file(tmp_path):
    bad = tmp_path / "x.flac"
    bad.write_bytes(b"RIFF not really")
    with pytest.raises(AudioError, match=str(bad)):
        read_audio(bad)


def test_duplicate_ids_are_all_reported(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    shutil.copy(ARCTIC_DIR / "aew_a0001.wav", folder / "same.wav")
    data, rate = sf.read(ARCTIC_DIR / "aew_a0001.wav")
    sf.write(folder / "same.flac", data, rate)
    utts = read_corpus(CorpusSpec(name="d", format="arctic", path=str(folder)))
    problems = find_duplicate_ids(utts)
    assert sorted(Path(p.path).name for p in problems) == ["same.flac", "same.wav"]
    assert all(p.reason == "duplicate_id" for p in problems)


def _rows(counts: dict[str, int]) -> list[ManifestRow]:
    return [
        ManifestRow(f"{spk}_{i:03d}", f"{spk}/{i}.wav", "c", spk, 1.0, 16000, 16000, 1, "", False)
        for spk, n in counts.items()
        for i in range(n)
    ]


def test_splits_are_deterministic_and_keep_every_speaker_in_train_and_test():
    rows = _rows({"a": 50, "b": 10, "c": 3, "d": 2, "e": 1})
    first = assign_splits(rows, 0.1, 0.2, seed=7)
    again = assign_splits(list(reversed(rows)), 0.1, 0.2, seed=7)
    assert [r.split for r in first] == [r.split for r in again]
    other = assign_splits(rows, 0.1, 0.2, seed=8)
    assert [r.split for r in first] != [r.split for r in other]
    for spk in "abcd":
        splits = Counter(r.split for r in first if r.speaker == spk)
        assert splits["train"] >= 1 and splits["test"] >= 1, spk
    big = Counter(r.split for r in first if r.speaker == "a")
    assert big == {"train": 35, "dev": 5, "test": 10}
    assert [r.split for r in first if r.speaker == "e"] == ["train"]
    # Adding a speaker does not reshuffle the others.
    more = assign_splits(rows + _rows({"z": 20}), 0.1, 0.2, seed=7)
    assert [r.split for r in more if r.speaker == "a"] == [
        r.split for r in first if r.speaker == "a"
    ]


def test_manifest_round_trip(tmp_path):
    rows = assign_splits(_rows({"a": 5}), 0.1, 0.2, seed=1)
    write_tsv(tmp_path / "m.tsv", rows, ManifestRow)
    assert read_manifest(tmp_path / "m.tsv") == rows


@pytest.mark.parametrize(
    "section, message",
    [
        ({"corpora": [], "seed": 1}, "prepare.corpora"),
        (
            {"corpora": [{"name": "a", "format": "fsdd", "path": "x"}], "on_error": "ignore"},
            "prepare.on_error",
        ),
        (
            {"corpora": [{"name": "a", "format": "mp3dir", "path": "x"}]},
            r"prepare.corpora\[0\].format",
        ),
        (
            {"corpora": [{"name": "a", "format": "fsdd", "path": "x"}], "dev_fraction": 1.5},
            "prepare.dev_fraction",
        ),
        (
            {"corpora": [{"name": "a", "format": "fsdd", "path": "x"}], "sead": 3},
            "unknown parameter.*sead",
        ),
        (
            {"corpora": [{"name": "a", "format": "fsdd", "path": "x"}], "seed": "x"},
            "prepare.seed: expected an integer",
        ),
    ],
)
def test_prepare_params_errors_name_the_parameter(section, message):
    with pytest.raises(ParamError, match=message):
        from_section(PrepareConfig, section, "prepare")
