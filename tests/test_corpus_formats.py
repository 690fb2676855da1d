"""Corpus layouts people have: Kaldi data dirs (with segments), LJSpeech, Speech Commands, lossy audio.

The fixtures under tests/fixtures/corpora are real files copied from speechocean762 (Apache 2.0),
LJSpeech 1.1 (public domain) and Speech Commands v0.02 (CC BY 4.0), all Ogg/Opus.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mockingjay.align import number_words, transcript_words
from mockingjay.audio import AudioError, read_audio
from mockingjay.corpora import read_corpus
from mockingjay.corpus_spec import CorpusError, CorpusSpec
from mockingjay.manifest import ManifestRow, assign_splits, heldout_speakers, validate_utterance

CORPORA = Path(__file__).parent / "fixtures" / "corpora"


def test_libsndfile_reads_opus_and_mp3(tmp_path):
    """The soundfile wheel's libsndfile (>= 1.1) decodes Ogg/Opus and writes/reads MP3."""
    assert tuple(int(p) for p in sf.__libsndfile_version__.split(".")[:2]) >= (1, 1)
    opus = next((CORPORA / "ljspeech" / "wavs").glob("*.opus"))
    audio = read_audio(opus)
    assert audio.source_sample_rate == 16000 and audio.duration > 1.0
    mp3 = tmp_path / "clip.mp3"
    sf.write(mp3, audio.samples, 16000, format="MP3")
    again = read_audio(mp3)
    assert abs(again.duration - audio.duration) < 0.1  # MP3 frames pad a little


def test_kaldi_data_dir_reads_speakers_text_and_metadata():
    utts = read_corpus(CorpusSpec("so", "kaldi", str(CORPORA / "kaldi" / "train")))
    assert len(utts) == 6 and {u.speaker for u in utts} == {"so_0001", "so_0005"}
    first = next(u for u in utts if u.utt_id == "so_000010011")
    assert first.transcript == "WE CALL IT BEAR" and first.gender == "m" and first.age == "6"
    assert Path(
        first.path
    ).is_file()  # resolved against the data dir's parent (speechocean762 layout)
    assert first.path.endswith("WAVE/SPEAKER0001/000010011.opus")


def test_kaldi_segments_cut_utterances_from_recordings():
    utts = read_corpus(CorpusSpec("so", "kaldi", str(CORPORA / "kaldi" / "segmented")))
    assert [u.utt_id for u in utts] == ["so_rec1-a", "so_rec1-b", "so_rec2-a"]
    a, b = utts[0], utts[1]
    assert a.path == b.path and a.segment == (0.0, 1.2) and b.segment == (1.2, 2.4)
    whole = read_audio(a.path)
    row = validate_utterance(b, False, 16000, 0.025)
    assert isinstance(row, ManifestRow) and row.start == 1.2 and row.end == 2.4
    assert row.duration == pytest.approx(1.2, abs=1e-3)
    cut = read_audio(b.path, segment=row.segment)
    # Opus decodes from a seek point with its own warm-up: close to the whole decode, not bit-exact
    # (a lossless file is: see the next test)
    np.testing.assert_allclose(cut.samples, whole.samples[19200:38400], atol=5e-3)
    assert np.abs(cut.samples - whole.samples[19200:38400]).mean() < 1e-4


def test_segment_of_a_lossless_file_is_exact(tmp_path):
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 32000).astype(np.float32)
    path = tmp_path / "rec.flac"
    sf.write(path, wave, 16000, subtype="PCM_24")
    whole, cut = read_audio(path), read_audio(path, segment=(0.5, 1.25))
    np.testing.assert_array_equal(cut.samples, whole.samples[8000:20000])


def test_kaldi_segment_past_the_end_is_named(tmp_path):
    data = tmp_path / "kaldi"
    shutil.copytree(CORPORA / "kaldi", data)
    (data / "segmented" / "segments").write_text("rec1-a rec1 0.0 99.0\n")
    (data / "segmented" / "utt2spk").write_text("rec1-a 0001\n")
    utt = read_corpus(CorpusSpec("so", "kaldi", str(data / "segmented")))[0]
    with pytest.raises(AudioError, match="outside the file"):
        read_audio(utt.path, segment=utt.segment)


def test_kaldi_piped_wav_scp_is_refused_and_never_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    marker = tmp_path / "was_run"
    (data / "wav.scp").write_text(f"utt1 touch {marker} |\n")
    (data / "utt2spk").write_text("utt1 spk\n")
    with pytest.raises(CorpusError, match=r"piped command .* refused; it is never executed") as err:
        read_corpus(CorpusSpec("x", "kaldi", str(data)))
    assert "wav.scp" in str(err.value) and "utt1" in str(err.value)
    assert not marker.exists()


def test_kaldi_paths_may_not_escape_the_root(tmp_path):
    data = tmp_path / "corpus" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text("utt1 ../../outside.wav\n")
    (data / "utt2spk").write_text("utt1 spk\n")
    with pytest.raises(CorpusError, match="escapes the corpus root"):
        read_corpus(CorpusSpec("x", "kaldi", str(data)))


def test_ljspeech_uses_normalized_text_and_one_speaker():
    utts = read_corpus(CorpusSpec("lj", "ljspeech", str(CORPORA / "ljspeech"), speaker="linda"))
    assert [u.utt_id for u in utts] == ["lj_LJ001-0001", "lj_LJ001-0002", "lj_LJ001-0003"]
    assert {u.speaker for u in utts} == {"lj_linda"}
    assert utts[1].transcript == "in being comparatively modern."


def test_speech_commands_labels_and_speakers(tmp_path):
    utts = read_corpus(CorpusSpec("sc", "speech_commands", str(CORPORA / "speech_commands")))
    assert {u.keyword for u in utts} == {"yes", "no", "_silence_", "_unknown_"}
    no = [u for u in utts if u.keyword == "no"]
    assert {u.speaker for u in no} == {"sc_03401e93"}  # the hash before _nohash_
    unknown = [u for u in utts if u.keyword == "_unknown_"]
    assert {u.speaker for u in unknown} == {
        "sc_0c540988",
        "sc_0cb74144",
        "sc_5170b77f",
    }  # word prefix dropped
    silence = [u for u in utts if u.keyword == "_silence_"]
    assert len({u.speaker for u in silence}) == len(silence)  # noise clips are not one speaker
    assert len({u.utt_id for u in utts}) == len(utts)


def test_speech_commands_split_lists_are_honoured(tmp_path):
    root = tmp_path / "sc"
    shutil.copytree(CORPORA / "speech_commands", root)
    (root / "testing_list.txt").write_text("no/03401e93_nohash_0.opus\n")
    (root / "validation_list.txt").write_text(
        "yes/" + sorted(p.name for p in (root / "yes").iterdir())[0] + "\n"
    )
    utts = read_corpus(CorpusSpec("sc", "speech_commands", str(root)))
    splits = {u.utt_id: u.fixed_split for u in utts}
    assert splits["sc_no_03401e93_nohash_0"] == "test"
    assert sum(s == "dev" for s in splits.values()) == 1
    assert sum(s == "train" for s in splits.values()) == len(utts) - 2


def test_corpus_of_unknown_audio_types_lists_what_it_found(tmp_path):
    (tmp_path / "a.aiff").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("hello")
    with pytest.raises(
        CorpusError, match=r"readable: .*\.opus.*\.mp3.*file types there: \.aiff, \.txt"
    ):
        read_corpus(CorpusSpec("x", "arctic", str(tmp_path)))


def test_numbers_in_transcripts_are_spelt_out():
    assert transcript_words("Room 42, 1984 and 7th!") == [
        "room",
        "forty",
        "two",
        "nineteen",
        "eighty",
        "four",
        "and",
        "seven",
    ]
    assert number_words(0) == ["zero"] and number_words(2005) == ["two", "thousand", "five"]
    assert number_words(115) == ["one", "hundred", "fifteen"]


def _rows(speakers: dict[str, int], corpus: str = "c") -> list[ManifestRow]:
    return [
        ManifestRow(f"{spk}_{i}", "x", corpus, spk, 1.0, 16000, 16000, 1, "", False)
        for spk, n in speakers.items()
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_speaker_split_never_shares_a_test_speaker(seed):
    rows = _rows({f"s{i:02d}": 5 + i % 4 for i in range(30)})
    heldout = heldout_speakers(rows, ["c"], 0.1, 0.2, seed)
    assert (
        sum(v == "test" for v in heldout.values()) == 6
        and sum(v == "dev" for v in heldout.values()) == 3
    )
    split = assign_splits(rows, 0.1, 0.2, seed, heldout)
    train_speakers = {r.speaker for r in split if r.split == "train"}
    for row in split:
        if heldout.get(row.speaker) == "test":
            assert row.split == "test" and row.speaker not in train_speakers
    assert heldout == heldout_speakers(rows, ["c"], 0.1, 0.2, seed)  # deterministic
    assert heldout != heldout_speakers(rows, ["c"], 0.1, 0.2, seed + 100)


def test_utterance_split_corpora_are_untouched_by_speaker_holdout():
    rows = _rows({"a": 10, "b": 10}, "u") + _rows({f"s{i}": 4 for i in range(10)}, "s")
    heldout = heldout_speakers(rows, ["s"], 0.1, 0.2, 0)
    assert all(spk.startswith("s") for spk in heldout)
    split = assign_splits(rows, 0.1, 0.2, 0, heldout)
    for speaker in (
        "a",
        "b",
    ):  # closed set: every speaker of an utterance-split corpus in train and test
        assert {r.split for r in split if r.speaker == speaker} >= {"train", "test"}
