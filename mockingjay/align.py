"""Offline forced alignment of transcripts to phones with pocketsphinx.

pocketsphinx 5 ships a US-English acoustic model and CMUdict in its wheel, so alignment
needs no download. Alignment is two decoding passes over the same audio: a word-level pass
constrained to the transcript (which also picks among alternative pronunciations, "and(2)"),
then a phone/state-level pass over that word sequence.

Times: pocketsphinx frames are 10 ms (frate 100) and a phone starting at frame f is reported
at f / frate seconds. That convention is kept as is: shifting it by half a window makes the
agreement with the hand-labelled ARCTIC reference worse, not better.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mockingjay.phones import SILENCE, Segment, normalize_phone

SAMPLE_RATE = 16_000  # the en-us acoustic model is a 16 kHz model

_WORD_CHARS = re.compile(r"[^a-z0-9'\-\s]")
_SIBILANTS = frozenset({"S", "Z", "SH", "ZH", "CH", "JH"})
_VOICELESS = frozenset({"P", "T", "K", "F", "TH"})


class AlignmentError(RuntimeError):
    """Forced alignment failed; the message says why."""


class OutOfVocabularyError(AlignmentError):
    """Transcript words missing from the pronunciation dictionary (listed in .words)."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        super().__init__(f"words not in the pronunciation dictionary: {', '.join(self.words)}")


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER = re.compile(r"^(\d+)(st|nd|rd|th|s)?$")


def number_words(value: int) -> list[str]:
    """English words of a non-negative integer: 42 -> forty two; years 1100-1999 as pairs
    (1984 -> nineteen eighty four), as they are read aloud."""
    if value < 20:
        return [_ONES[value]]
    if value < 100:
        return [_TENS[value // 10]] + (number_words(value % 10) if value % 10 else [])
    if 1100 <= value < 2000 and value % 100:
        return (
            number_words(value // 100)
            + (["oh"] if value % 100 < 10 else [])
            + number_words(value % 100)
        )
    for size, name in (
        (10**9, "billion"),
        (10**6, "million"),
        (1000, "thousand"),
        (100, "hundred"),
    ):
        if value >= size:
            rest = number_words(value % size) if value % size else []
            return number_words(value // size) + [name] + rest
    return []  # unreachable: every value >= 100 matched a size


def transcript_words(transcript: str) -> list[str]:
    """Lowercase words of a transcript, punctuation dropped, numbers written as digits spelt out.

    Apostrophes and hyphens are kept inside words ("don't", "o'brien", "twenty-five");
    PhoneAligner splits a hyphenated word the dictionary lacks into its parts. "42" becomes
    "forty two"; ordinal and plural suffixes are dropped with the digits ("1st" -> "one").
    """
    text = transcript.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = _WORD_CHARS.sub(" ", text)
    words = []
    for token in text.split():
        word = token.strip("'-")  # quotes and dashes at word edges are punctuation
        number = _NUMBER.match(word)
        if number and len(number.group(1)) <= 12:
            words.extend(number_words(int(number.group(1))))
        elif word:
            words.append(word)
    return words


_lexicons: dict[str, dict[str, str]] = {}


def load_lexicon(path: str) -> dict[str, str]:
    """word (lowercase) -> its first pronunciation, stress digits dropped, from a CMUdict-format
    file (`WORD  PH1 PH2 ...`, tab or spaces; `word(2)` variants ignored). Cached per process."""
    if path not in _lexicons:
        lexicon: dict[str, str] = {}
        for line in open(path, encoding="utf-8", errors="replace"):
            parts = line.split()
            if len(parts) < 2 or line.startswith(";;;"):
                continue
            word = parts[0].lower()
            if "(" in word:
                continue
            lexicon.setdefault(word, " ".join(re.sub(r"\d", "", p).upper() for p in parts[1:]))
        _lexicons[path] = lexicon
    return _lexicons[path]


class PhoneAligner:
    """A pocketsphinx decoder set up for forced alignment; build once, align many utterances.

    Loading the model takes ~0.15 s; one aligner is not thread-safe (use one per process,
    see `align_in_process`).
    """

    def __init__(
        self, acoustic_model: str | None = None, dictionary: str | None = None, pad_sec: float = 0.1
    ):
        if pad_sec < 0:
            raise ValueError(f"pad_sec must be >= 0, got {pad_sec}")
        from pocketsphinx import Config, Decoder, get_model_path

        config = Config(
            hmm=acoustic_model or get_model_path("en-us/en-us"),
            dict=dictionary or get_model_path("en-us/cmudict-en-us.dict"),
            lm=None,  # alignment search only; skips loading the 30 MB language model
            samprate=SAMPLE_RATE,
            bestpath=False,
            # Wider than the decoding defaults (1e-48, 1e-48, 7e-29): with the transcript fixed
            # the search is small, and the default beams prune every path of some short or
            # fast utterances (FSDD "six"). Where the default beams succeed the alignment
            # is the same (41/41 kathleen files), at ~10% more time.
            beam=1e-80,
            pbeam=1e-80,
            wbeam=1e-60,
            loglevel="FATAL",  # else failed alignments print ERROR lines to stderr (INFO: every utterance)
        )
        self.decoder = Decoder(config)
        self.frame_rate = int(self.decoder.config["frate"])
        # Zeros added at both ends before decoding, whole frames of it. Silence-trimmed
        # corpora (kathleen, FSDD) start on the first phone, which leaves the aligner no
        # frames for its initial SIL; with padding it can put the utterance-initial silence
        # where it is. Times are shifted back and clipped to the audio afterwards.
        self.pad_frames = round(pad_sec * self.frame_rate)

    def in_dictionary(self, word: str) -> bool:
        """Whether the dictionary has the word (adding the possessive of a known word on the way)."""
        if self.decoder.lookup_word(word) is not None:
            return True
        return self._add_possessive(word)

    def _add_possessive(self, word: str) -> bool:
        """Add "name's" when "name" is known: CMUdict lacks most possessives of names."""
        if not word.endswith("'s") or len(word) < 3:
            return False
        base = self.decoder.lookup_word(word[:-2])
        if base is None:
            return False
        last = base.split()[-1]
        # the English -s suffix rule: /IH Z/ after sibilants, /S/ after voiceless, else /Z/
        suffix = "IH Z" if last in _SIBILANTS else "S" if last in _VOICELESS else "Z"
        self.add_pronunciation(word, f"{base} {suffix}")
        return True

    def dictionary_words(self, transcript: str) -> list[str]:
        """The transcript as dictionary words: hyphenated words split when only the parts are known."""
        words = []
        for word in transcript_words(transcript):
            if "-" in word and not self.in_dictionary(word):
                words.extend(part for part in word.split("-") if part)
            else:
                words.append(word)
        return words

    def lookup_missing_words(self, transcript: str) -> list[str]:
        """Words of the transcript that the pronunciation dictionary lacks (in order, once)."""
        missing = [w for w in self.dictionary_words(transcript) if not self.in_dictionary(w)]
        return list(dict.fromkeys(missing))

    def add_pronunciation(self, word: str, phones: str) -> None:
        """Add a word, e.g. add_pronunciation("gregson", "G R EH G S AH N")."""
        self.decoder.add_word(word.lower(), phones.upper(), True)

    def align(
        self, audio: np.ndarray, transcript: str, sample_rate: int = SAMPLE_RATE
    ) -> list[Segment]:
        """Phone segments (seconds, CMUdict phones without stress, SIL) of a mono 16 kHz utterance.

        Raises OutOfVocabularyError before decoding when words are missing from the
        dictionary, and AlignmentError when the transcript is empty or the decoder finds no
        path through it (typically transcript and audio do not match, or the audio is
        too short for the phones).
        """
        if sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"the acoustic model needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz: resample first"
            )
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio as a 1-D array, got shape {audio.shape}")
        words = self.dictionary_words(transcript)
        if not words:
            raise AlignmentError(f"empty transcript {transcript!r}")
        missing = self.lookup_missing_words(transcript)
        if missing:
            raise OutOfVocabularyError(missing)
        if len(audio) < SAMPLE_RATE // 10:
            raise AlignmentError(f"audio too short to align ({len(audio)} samples)")
        padding = np.zeros(self.pad_frames * SAMPLE_RATE // self.frame_rate, dtype=np.int16)
        pcm = np.concatenate([padding, _to_int16(audio), padding]).tobytes()
        audio_frames = len(audio) * self.frame_rate / SAMPLE_RATE

        try:
            self.decoder.set_align_text(" ".join(words))
            # Feature state (the live cepstral mean) carries over between utterances, so a file
            # would align differently depending on what was aligned before it and in which
            # worker. Reset it (70 µs) so that every utterance aligns as in a fresh
            # `pocketsphinx align` run; set_cmn() alone does not reset it all.
            self.decoder.reinit_feat()
            self._decode(pcm)  # pass 1: word segmentation (and pronunciation choice)
            if self.decoder.hyp() is None:
                raise AlignmentError(
                    "no alignment found: the decoder found no path through the transcript"
                )
            self.decoder.set_alignment()
            self._decode(pcm)  # pass 2: phone and state durations within those words
            alignment = self.decoder.get_alignment()
        except RuntimeError as err:
            if isinstance(err, AlignmentError):
                raise
            raise AlignmentError(f"pocketsphinx failed: {err}") from err
        if alignment is None:
            raise AlignmentError("no alignment found in the phone-level pass")

        segments: list[Segment] = []
        for entry in alignment.phones():
            start_frame = max(entry.start - self.pad_frames, 0)
            end_frame = min(entry.start + entry.duration - self.pad_frames, audio_frames)
            if end_frame <= start_frame:
                continue  # wholly inside the padding
            start, end = start_frame / self.frame_rate, end_frame / self.frame_rate
            phone = normalize_phone(entry.name)
            if segments and phone == SILENCE and segments[-1].phone == SILENCE:
                segments[-1] = segments[-1]._replace(end=end)  # <sil> next to a filler: one SIL
            else:
                segments.append(Segment(start, end, phone))
        if not segments:
            raise AlignmentError("the alignment has no phones")
        return segments

    def _decode(self, pcm: bytes) -> None:
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()


def _to_int16(audio: np.ndarray) -> np.ndarray:
    if audio.dtype == np.int16:
        return audio
    if audio.dtype.kind != "f":
        raise ValueError(f"expected float audio in [-1, 1] or int16, got {audio.dtype}")
    return np.rint(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


# One aligner per worker process: multiprocessing pools call align_in_process, which loads
# the model on first use in that process and reuses it after.
_process_aligner: PhoneAligner | None = None


def get_process_aligner() -> PhoneAligner:
    global _process_aligner
    if _process_aligner is None:
        _process_aligner = PhoneAligner()
    return _process_aligner


def align_in_process(
    audio: np.ndarray, transcript: str, sample_rate: int = SAMPLE_RATE, lexicon: str | None = None
) -> list[Segment]:
    """PhoneAligner.align with this process's cached aligner (picklable: a module function).

    `lexicon` (a CMUdict-format file) supplies the words CMUdict lacks; words in neither are
    still reported as out of vocabulary.
    """
    aligner = get_process_aligner()
    if lexicon:
        extra = load_lexicon(lexicon)
        for word in aligner.lookup_missing_words(transcript):
            if word in extra:
                aligner.add_pronunciation(word, extra[word])
    return aligner.align(audio, transcript, sample_rate)
