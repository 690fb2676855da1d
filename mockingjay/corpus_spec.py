"""What a corpus entry of `prepare.corpora` is (`CorpusSpec`), what reading one yields
(`UtteranceSource`), and the filename-safe utterance ids every reader gives.

Utterance ids are `<corpus name>_<native id>` so that several corpora can share one manifest, and
are restricted to filename-safe characters because later stages name files after them and write
them into tab-separated tables. A native name with other characters (a space, a non-ASCII letter)
gets a derived id (`safe_id`: the safe characters plus a hash of the name, deterministic and
distinct); the file's own path stays in the manifest. The readers are `mockingjay.corpora`
(folder layouts) and `mockingjay.corpus_tables` (corpora listed in tables: TSV, Kaldi).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Everything libsndfile >= 1.1 decodes (soundfile 0.12+ wheels bundle it): Ogg/Opus and MP3 are
# what Common Voice, Speech Commands re-encodes and most web corpora ship.
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3")
CorpusFormat = Literal[
    "librispeech", "fsdd", "arctic", "tsv", "kaldi", "ljspeech", "speech_commands"
]
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class CorpusError(ValueError):
    """A corpus cannot be read as configured (missing path, wrong layout, bad manifest)."""


@dataclass(frozen=True)
class CorpusSpec:
    """One entry of `prepare.corpora` in params.yaml."""

    name: str
    format: CorpusFormat
    path: str
    align: bool = False  # transcripts are required and will be forced-aligned to phones
    speaker: str | None = None  # fixed speaker for single-speaker folders (arctic, ljspeech)
    split_by: Literal["utterance", "speaker"] = (
        "utterance"  # speaker: hold out whole speakers (see manifest)
    )
    root: str | None = (
        None  # kaldi: folder that wav.scp paths are relative to (default: the data dir's parent)
    )
    lexicon: str | None = None  # CMUdict-format lexicon for words CMUdict lacks (align)
    test_only: bool = (
        False  # every utterance in test: never pretrained on nor probe-trained (probe.test_corpora)
    )

    def validate(self) -> None:
        if not _SAFE_ID.match(self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '_', '.', '-'")
        if self.lexicon is not None and not Path(self.lexicon).is_file():
            raise ValueError(f"lexicon: {self.lexicon} is not a file (corpus {self.name!r})")


@dataclass(frozen=True)
class UtteranceSource:
    utt_id: str
    path: str
    speaker: str
    transcript: str | None
    corpus: str
    segment: tuple[float, float] | None = (
        None  # (start, end) seconds into the file (Kaldi segments)
    )
    keyword: str = ""  # utterance label of keyword corpora (Speech Commands)
    gender: str = ""
    age: str = ""
    fixed_split: str = ""  # a split the corpus itself assigns (Speech Commands lists)


def audio_files(root: Path) -> list[Path]:
    """The audio files under folder `root` (any depth, by extension), sorted: what the folder readers list."""
    if not root.is_dir():
        raise CorpusError(f"{root}: expected a directory")
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
    )


def safe_id(native: str) -> str:
    """A filename-safe id for a native name: kept when already safe, else its unsafe characters
    replaced by '_' plus a short hash of the original, so two names never collide."""
    if _SAFE_ID.match(native):
        return native
    import hashlib
    import unicodedata

    # NFC first: one name typed on macOS (decomposed letters) and on Linux gets one id
    native = unicodedata.normalize("NFC", native)
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", native).strip("_.-") or "utt"
    return f"{cleaned}-{hashlib.sha1(native.encode()).hexdigest()[:8]}"


SAFE_ID_RULE = "ASCII letters, digits, '_', '.' and '-', starting with a letter or digit"


def is_safe_id(utt_id: str) -> bool:
    return bool(_SAFE_ID.match(utt_id))
