"""Corpus readers: turn a directory (or a TSV manifest) into utterance records.

`read_corpus` reads one `prepare.corpora` entry with the reader of its format: the folder layouts
here (LibriSpeech, FSDD, ARCTIC, LJSpeech, Speech Commands), the tables in
`mockingjay.corpus_tables` (TSV, Kaldi). Each reader returns `UtteranceSource`s without decoding
audio; validation happens in the prepare stage. The records and the filename-safe utterance ids
are `mockingjay.corpus_spec`'s.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mockingjay.corpus_spec import (
    AUDIO_EXTENSIONS,
    CorpusError,
    CorpusSpec,
    UtteranceSource,
    audio_files,
    safe_id,
)
from mockingjay.corpus_tables import read_kaldi, read_tsv_manifest

_LIBRISPEECH_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_FSDD_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)$")  # any speaker name: `3_józef_0` is not skipped
# `<hash>_nohash_<n>`; a folder like _unknown_ may prefix the word: `backward_<hash>_nohash_<n>`
_SPEECH_COMMANDS_NAME = re.compile(r"^(?:[A-Za-z]+_)?([0-9a-fA-F]{8})_nohash_(\d+)$")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def read_corpus(spec: CorpusSpec, base_dir: Path = Path(".")) -> list[UtteranceSource]:
    root = base_dir / spec.path
    if not root.exists():
        raise CorpusError(f"corpus {spec.name!r}: path {root} does not exist")
    reader = {
        "librispeech": read_librispeech,
        "fsdd": read_fsdd,
        "arctic": read_arctic,
        "tsv": read_tsv_manifest,
        "kaldi": read_kaldi,
        "ljspeech": read_ljspeech,
        "speech_commands": read_speech_commands,
    }[spec.format]
    utterances = reader(root, spec)
    if spec.test_only:
        utterances = [dataclasses.replace(u, fixed_split="test") for u in utterances]
    if not utterances:
        found = (
            sorted({p.suffix.lower() or "(none)" for p in root.rglob("*") if p.is_file()})
            if root.is_dir()
            else []
        )
        raise CorpusError(
            f"corpus {spec.name!r}: no {spec.format} audio files found under {root} "
            f"(readable: {', '.join(AUDIO_EXTENSIONS)}; file types there: {', '.join(found) or 'none'})"
        )
    return utterances


def read_librispeech(root: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """`speaker/chapter/speaker-chapter-utt.flac` with `speaker-chapter.trans.txt` beside it.

    A flat folder of such files (no chapter level, no transcripts) reads the same way: the
    speaker comes from the file name, not the folder.
    """
    transcripts: dict[str, str] = {}
    for trans in sorted(root.rglob("*.trans.txt")):
        for line_no, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise CorpusError(f"{trans}:{line_no}: expected '<utterance id> <TRANSCRIPT>'")
            transcripts[parts[0]] = parts[1].strip()
    utterances = []
    for path in audio_files(root):
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
    for path in audio_files(root):
        match = _FSDD_NAME.match(path.stem)
        if not match:
            continue
        digit, speaker, _take = match.groups()
        utterances.append(
            UtteranceSource(
                utt_id=f"{spec.name}_{safe_id(path.stem)}",
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
    for path in audio_files(root):
        text_path = path.with_suffix(".txt")
        transcript = text_path.read_text(encoding="utf-8").strip() if text_path.is_file() else None
        speaker = spec.speaker or path.stem.split("_", 1)[0]
        utterances.append(
            UtteranceSource(
                utt_id=f"{spec.name}_{safe_id(path.stem)}",
                path=str(path),
                speaker=f"{spec.name}_{speaker}",
                transcript=transcript or None,
                corpus=spec.name,
            )
        )
    return utterances


def read_ljspeech(root: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """LJSpeech: `metadata.csv` (`id|text|normalized text`) and `wavs/<id>.<ext>`; one speaker
    (`spec.speaker`, default "lj"). The normalized text (numbers spelt out) is the transcript."""
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise CorpusError(f"{root}: an ljspeech corpus needs metadata.csv")
    wavs = {p.stem: p for p in audio_files(root / "wavs")} if (root / "wavs").is_dir() else {}
    utterances = []
    for line_no, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 2:
            raise CorpusError(f"{metadata}:{line_no}: expected 'id|text|normalized text'")
        native = parts[0].strip()
        if native not in wavs:
            raise CorpusError(f"{metadata}:{line_no}: no audio file wavs/{native}.* for {native!r}")
        transcript = (parts[2] if len(parts) > 2 and parts[2].strip() else parts[1]).strip()
        utterances.append(
            UtteranceSource(
                utt_id=f"{spec.name}_{safe_id(native)}",
                path=str(wavs[native]),
                speaker=f"{spec.name}_{spec.speaker or 'lj'}",
                transcript=transcript or None,
                corpus=spec.name,
            )
        )
    return utterances


def read_speech_commands(root: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """Speech Commands: `<label>/<speaker hash>_nohash_<n>.<ext>`, one folder per label
    (`_silence_`, `_unknown_` included; `_background_noise_` is not a label and is skipped).

    The label becomes the utterance's `keyword`. `validation_list.txt` / `testing_list.txt`,
    when present, fix those files' splits (dev / test) as the corpus intends. Files outside the
    `<hash>_nohash_<n>` naming (the `_silence_` clips cut from noise) get their own speaker,
    `noise`, so they never pose as a person.
    """
    fixed: dict[str, str] = {}
    for list_name, split in (("validation_list.txt", "dev"), ("testing_list.txt", "test")):
        listing = root / list_name
        if listing.is_file():
            for line in listing.read_text().splitlines():
                if line.strip():
                    fixed[Path(line.strip()).with_suffix("").as_posix()] = split
    utterances = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name == "_background_noise_":
            continue
        for path in audio_files(folder):
            match = _SPEECH_COMMANDS_NAME.match(path.stem)
            # each noise clip its own pseudo-speaker: one "noise" speaker would put the whole
            # _silence_ class on one side of a speaker-level split
            speaker = match.group(1) if match else f"noise-{safe_id(path.stem)}"
            rel = f"{folder.name}/{path.stem}"
            utterances.append(
                UtteranceSource(
                    utt_id=f"{spec.name}_{safe_id(folder.name.strip('_'))}_{safe_id(path.stem)}",
                    path=str(path),
                    speaker=f"{spec.name}_{speaker}",
                    transcript=None,
                    corpus=spec.name,
                    keyword=folder.name,
                    fixed_split=fixed.get(rel, "train") if fixed else "",
                )
            )
    return utterances
