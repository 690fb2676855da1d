"""Forced alignment with pocketsphinx on real recordings, checked against hand and shipped labels."""

import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from mockingjay.align import (
    AlignmentError,
    OutOfVocabularyError,
    PhoneAligner,
    align_in_process,
    transcript_words,
)
from mockingjay.phones import PHONES, Segment, frame_agreement, read_lab, segments_to_frame_labels

FIXTURES = Path(__file__).parent / "fixtures"
ARCTIC = FIXTURES / "cmu_arctic"
FSDD = FIXTURES / "fsdd"


@pytest.fixture(scope="session")  # not "module": see conftest.py, scheduling
def aligner() -> PhoneAligner:
    return PhoneAligner()


def load_arctic(utt_id: str) -> tuple[np.ndarray, str]:
    audio, sample_rate = sf.read(ARCTIC / "wav" / f"{utt_id}.wav", dtype="float32")
    assert sample_rate == 16_000
    return audio, (ARCTIC / "wav" / f"{utt_id}.txt").read_text()


def labels_10ms(segments: list[Segment], audio: np.ndarray) -> np.ndarray:
    return segments_to_frame_labels(segments, num_frames=len(audio) // 160 + 1, hop_sec=0.01)


def test_alignment_matches_hand_reference(aligner):
    audio, transcript = load_arctic("slt_a0009")
    segments = aligner.align(audio, transcript)
    reference = read_lab(ARCTIC / "lab_reference" / "slt_a0009.lab")  # hand labels, "ax" -> AH

    assert [s.phone for s in segments] == [s.phone for s in reference]  # 40/40 phones
    assert frame_agreement(labels_10ms(reference, audio), labels_10ms(segments, audio)) >= 0.75
    boundary_errors = [abs(a.start - b.start) for a, b in zip(segments, reference)]
    assert np.median(boundary_errors) <= 0.02


def test_segments_are_contiguous_and_cover_the_audio(aligner):
    audio, transcript = load_arctic("aew_a0002")
    segments = aligner.align(audio, transcript)
    assert segments[0].start == 0.0 and segments[-1].end == pytest.approx(
        len(audio) / 16_000, abs=0.01
    )
    assert all(a.end == pytest.approx(b.start) for a, b in zip(segments, segments[1:]))
    assert all(s.phone in PHONES for s in segments)
    assert all(round(s.start * 100, 6).is_integer() for s in segments)  # 10 ms frames
    assert not any(a.phone == b.phone == "SIL" for a, b in zip(segments, segments[1:]))


@pytest.mark.parametrize("utt_id", ["aew_a0002", "axb_a0004", "slt_a0009"])
def test_alignment_reproduces_shipped_pocketsphinx_labels(aligner, utt_id):
    audio, transcript = load_arctic(utt_id)
    segments = aligner.align(audio, transcript)
    shipped = read_lab(ARCTIC / "lab_pocketsphinx" / f"{utt_id}.lab")
    assert [(round(s.start, 2), round(s.end, 2), s.phone) for s in segments] == [
        tuple(s) for s in shipped
    ]


def test_fsdd_8khz_digit_after_resampling(aligner):
    audio, sample_rate = sf.read(FSDD / "recordings" / "0_jackson_0.wav", dtype="float32")
    assert sample_rate == 8_000
    with pytest.raises(ValueError, match="16000 Hz"):
        aligner.align(audio, "zero", sample_rate=sample_rate)

    audio_16k = resample_poly(audio, 2, 1).astype(np.float32)
    segments = aligner.align(audio_16k, "zero")
    assert [s.phone for s in segments if s.phone != "SIL"] == ["Z", "IY", "R", "OW"]
    shipped = read_lab(FSDD / "phone_align" / "0_jackson_0.lab")
    assert frame_agreement(labels_10ms(shipped, audio_16k), labels_10ms(segments, audio_16k)) >= 0.8


def test_short_fast_digit_that_default_beams_cannot_align(aligner):
    # the shipped FSDD labels lack 6_nicolas_0: pocketsphinx's default beams prune every path
    assert not (FSDD / "phone_align" / "6_nicolas_0.lab").exists()
    audio, sample_rate = sf.read(FSDD / "recordings" / "6_nicolas_0.wav", dtype="float32")
    segments = aligner.align(
        resample_poly(audio, 16_000 // sample_rate, 1).astype(np.float32), "six"
    )
    assert [s.phone for s in segments if s.phone != "SIL"] == ["S", "IH", "K", "S"]
    assert all(
        s.end - s.start >= 0.03 for s in segments if s.phone != "SIL"
    )  # >= 3 frames per phone


def test_transcript_normalisation():
    assert transcript_words("He turned sharply, and faced Gregson across the table.") == [
        "he", "turned", "sharply", "and", "faced", "gregson", "across", "the", "table",
    ]  # fmt: skip
    assert transcript_words("\u201cDon\u2019t!\u201d -- 'O'Brien's' twenty-five") == [
        "don't", "o'brien's", "twenty-five",
    ]  # fmt: skip


def test_dictionary_words_split_unknown_hyphenated_words(aligner):
    # CMUdict has "twenty-five" (and even the ARCTIC "big-face") but not "seven-eight"
    assert aligner.dictionary_words("twenty-five seven-eight") == ["twenty-five", "seven", "eight"]


def test_possessive_of_known_name_is_not_out_of_vocabulary(aligner):
    assert (
        aligner.lookup_missing_words("Kerfoot's hat and Pearce's") == []
    )  # CMUdict has kerfoot, pearce
    assert aligner.decoder.lookup_word("pearce's") == "P IH R S IH Z"


def test_out_of_vocabulary_words_are_reported_before_decoding(aligner):
    assert aligner.lookup_missing_words("the Xyzzyq table, xyzzyq and Plughwort") == [
        "xyzzyq",
        "plughwort",
    ]
    too_short_to_decode = np.zeros(10, dtype=np.float32)
    with pytest.raises(OutOfVocabularyError, match="xyzzyq, plughwort") as caught:
        aligner.align(too_short_to_decode, "the xyzzyq table plughwort")
    assert caught.value.words == ["xyzzyq", "plughwort"]
    assert isinstance(caught.value, AlignmentError)


def test_alignment_failures_say_why(aligner):
    audio, transcript = load_arctic("slt_a0009")
    with pytest.raises(AlignmentError, match="empty transcript"):
        aligner.align(audio, " ,.. -- ")
    with pytest.raises(AlignmentError, match="no path through the transcript"):
        aligner.align(audio[:3200], transcript)  # 0.2 s cannot hold 38 phones of >= 3 frames
    with pytest.raises(ValueError, match="mono"):
        aligner.align(np.stack([audio, audio], axis=1), transcript)


def test_aligner_is_reusable_and_deterministic(aligner):
    audio, transcript = load_arctic("axb_a0005")
    first = aligner.align(audio, transcript)
    aligner.align(*load_arctic("aew_a0001"))
    assert aligner.align(audio, transcript) == first  # not changed by what was aligned before
    assert PhoneAligner().align(audio, transcript) == first
    assert (
        aligner.align((audio * 32767).round().astype(np.int16), transcript) == first
    )  # int16 input


QUIET_SCRIPT = """
import soundfile as sf
from mockingjay.align import AlignmentError, PhoneAligner
audio, _ = sf.read("tests/fixtures/cmu_arctic/wav/slt_a0009.wav", dtype="float32")
aligner = PhoneAligner()
segments = aligner.align(audio, "he turned sharply and faced gregson across the table")
try:
    aligner.align(audio[:3200], "he turned sharply and faced gregson across the table")
except AlignmentError:
    print(len(segments))
"""


def test_pocketsphinx_is_quiet():
    # In a fresh interpreter: pocketsphinx's log level is process-wide, and its default
    # (WARN) prints an ERROR line to stderr for the failed alignment.
    done = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "40\n" and done.stderr == ""


def _align_file(utt_id: str) -> list[Segment]:
    return align_in_process(*load_arctic(utt_id))


def test_align_in_worker_processes(aligner):
    utt_ids = ["aew_a0001", "axb_a0006"]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        in_workers = pool.map(_align_file, utt_ids)
    assert in_workers == [aligner.align(*load_arctic(u)) for u in utt_ids]
