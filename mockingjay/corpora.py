"""Corpus readers: turn a directory (or a TSV manifest) into utterance records.

Each reader returns `UtteranceSource`s without decoding audio; validation happens in the
prepare stage. Utterance ids are `<corpus name>_<native id>` so that several corpora can
share one manifest, and are restricted to filename-safe characters because later stages
name files after them.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AUDIO_EXTENSIONS = (".flac", ".wav")
CorpusFormat = Literal["librispeech", "fsdd", "arctic", "tsv"]
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_LIBRISPEECH_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)$")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class CorpusError(ValueError):
    """A corpus cannot be read as configured (missing path, wrong layout, bad manifest)."""


@dataclass(frozen=True)
class CorpusSpec:
    """One entry of `prepare.corpora` in params.yaml."""

    name: str
    format: CorpusFormat
    path: str
    align: bool = False  # transcripts are required and will be forced-aligned to phones
    speaker: str | None = None  # fixed speaker for single-speaker folders (arctic)

    def validate(self) -> None:
        if not _SAFE_ID.match(self.name):
            raise ValueError(f"name: {self.name!r} must be letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class UtteranceSource:
    utt_id: str
    path: str
    speaker: str
    transcript: str | None
    corpus: str


def read_corpus(spec: CorpusSpec, base_dir: Path = Path(".")) -> list[UtteranceSource]:
    root = base_dir / spec.path
    if not root.exists():
        raise CorpusError(f"corpus {spec.name!r}: path {root} does not exist")
    reader = {
        "librispeech": read_librispeech,
        "fsdd": read_fsdd,
        "arctic": read_arctic,
        "tsv": read_tsv_manifest,
    }[spec.format]
    utterances = reader(root, spec)
    if not utterances:
        raise CorpusError(f"corpus {spec.name!r}: no {spec.format} audio files found under {root}")
    return utterances


def _audio_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise CorpusError(f"{root}: expected a directory")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())


def read_librispeech(root: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """`speaker/chapter/speaker-chapter-utt.flac` with `speaker-chapter.trans.txt` beside it.

    A flat folder of such files (no chapter level, no transcripts) reads the same way: the
    speaker comes from the file name, not the folder.
    """
    transcripts: dict[str, str] = {}
    for trans in sorted(root.rglob("*.trans.txt")):
        for line_no, line in enumerate(trans.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise CorpusError(f"{trans}:{line_no}: expected '<utterance id> <TRANSCRIPT>'")
            transcripts[parts[0]] = parts[1].strip()
    utterances = []
    for path in _audio_files(root):
        match = _LIBRISPEECH_NAME.match(path.stem)
        if not match:
            continue
        utterances.append(
            UtteranceSource(
                utt_id=f"{spec.name}_{path.stem}",
                path=str(path),
                speaker=f"{spec.name}_{match.group(1)}",
                transcript=transcripts.get(path.stem),
                corpus=spec.name,
            )
        )
    return utterances


def read_fsdd(root: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """Free Spoken Digit Dataset naming: `{digit}_{speaker}_{take}.wav|flac`; transcript = digit word."""
    utterances = []
    for path in _audio_files(root):
        match = _FSDD_NAME.match(path.stem)
        if not match:
            continue
        digit, speaker, _take = match.groups()
        utterances.append(
            UtteranceSource(
                utt_id=f"{spec.name}_{path.stem}",
                path=str(path),
                speaker=f"{spec.name}_{speaker}",
                transcript=_DIGIT_WORDS[int(digit)],
                corpus=spec.name,
            )
        )
    return utterances


def read_arctic(root: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """ARCTIC-style folder: `name.wav|flac` with its transcript in `name.txt` beside it.

    The speaker is `spec.speaker` when given, else the file-name prefix before the first
    underscore (`aew_a0001` -> `aew`), as in the CMU ARCTIC samples.
    """
    utterances = []
    for path in _audio_files(root):
        text_path = path.with_suffix(".txt")
        transcript = text_path.read_text().strip() if text_path.is_file() else None
        speaker = spec.speaker or path.stem.split("_", 1)[0]
        utterances.append(
            UtteranceSource(
                utt_id=f"{spec.name}_{path.stem}",
                path=str(path),
                speaker=f"{spec.name}_{speaker}",
                transcript=transcript or None,
                corpus=spec.name,
            )
        )
    return utterances


def read_tsv_manifest(manifest: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """A tab-separated manifest with a header: `path`, `speaker`, optional `transcript`, optional `id`.

    Paths are relative to the manifest's folder and may not leave it (`../../etc/passwd`
    is refused): a manifest downloaded with a corpus cannot make the pipeline read elsewhere.
    """
    if not manifest.is_file():
        raise CorpusError(f"{manifest}: a tsv corpus path must be a manifest file")
    root = manifest.parent.resolve()
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in ("path", "speaker") if c not in columns]
        if missing:
            raise CorpusError(f"{manifest}: missing column(s) {', '.join(missing)} (have {', '.join(columns)})")
        utterances = []
        for line_no, row in enumerate(reader, 2):
            rel = (row.get("path") or "").strip()
            speaker = (row.get("speaker") or "").strip()
            if not rel or not speaker:
                raise CorpusError(f"{manifest}:{line_no}: empty path or speaker")
            resolved = (root / rel).resolve()
            if Path(rel).is_absolute() or not resolved.is_relative_to(root):
                raise CorpusError(f"{manifest}:{line_no}: path {rel!r} escapes the corpus folder {root}")
            native_id = (row.get("id") or "").strip() or Path(rel).with_suffix("").as_posix().replace("/", "-")
            transcript = (row.get("transcript") or "").strip() or None
            utterances.append(
                UtteranceSource(
                    utt_id=f"{spec.name}_{native_id}",
                    path=str(manifest.parent / rel),
                    speaker=f"{spec.name}_{speaker}",
                    transcript=transcript,
                    corpus=spec.name,
                )
            )
    return utterances


def is_safe_id(utt_id: str) -> bool:
    return bool(_SAFE_ID.match(utt_id))
