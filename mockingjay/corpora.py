"""Corpus readers: turn a directory (or a TSV manifest) into utterance records.

Each reader returns `UtteranceSource`s without decoding audio; validation happens in the
prepare stage. Utterance ids are `<corpus name>_<native id>` so that several corpora can
share one manifest, and are restricted to filename-safe characters because later stages
name files after them and write them into tab-separated tables. A native name with other
characters (a space, a non-ASCII letter) gets a derived id (`safe_id`: the safe characters plus
a hash of the name, deterministic and distinct); the file's own path stays in the manifest.
"""

from __future__ import annotations

import csv
import dataclasses
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
_LIBRISPEECH_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)$")
_FSDD_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)$")  # any speaker name: `3_józef_0` is not skipped
# `<hash>_nohash_<n>`; a folder like _unknown_ may prefix the word: `backward_<hash>_nohash_<n>`
_SPEECH_COMMANDS_NAME = re.compile(r"^(?:[A-Za-z]+_)?([0-9a-fA-F]{8})_nohash_(\d+)$")
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


def _audio_files(root: Path) -> list[Path]:
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
    for path in _audio_files(root):
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


def read_tsv_manifest(manifest: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """A tab-separated manifest with a header: `path`, `speaker`, optional `transcript`, optional `id`.

    Paths are relative to the manifest's folder and may not leave it (`../../etc/passwd`
    is refused): a manifest downloaded with a corpus cannot make the pipeline read elsewhere.
    """
    if not manifest.is_file():
        raise CorpusError(f"{manifest}: a tsv corpus path must be a manifest file")
    root = manifest.parent.resolve()
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in ("path", "speaker") if c not in columns]
        if missing:
            raise CorpusError(
                f"{manifest}: missing column(s) {', '.join(missing)} (have {', '.join(columns)})"
            )
        utterances = []
        for line_no, row in enumerate(reader, 2):
            rel = (row.get("path") or "").strip()
            speaker = (row.get("speaker") or "").strip()
            if not rel or not speaker:
                raise CorpusError(f"{manifest}:{line_no}: empty path or speaker")
            resolved = (root / rel).resolve()
            if Path(rel).is_absolute() or not resolved.is_relative_to(root):
                raise CorpusError(
                    f"{manifest}:{line_no}: path {rel!r} escapes the corpus folder {root}"
                )
            native_id = (row.get("id") or "").strip() or Path(rel).with_suffix(
                ""
            ).as_posix().replace("/", "-")
            transcript = (row.get("transcript") or "").strip() or None
            utterances.append(
                UtteranceSource(
                    utt_id=f"{spec.name}_{safe_id(native_id)}",
                    path=str(manifest.parent / rel),
                    speaker=f"{spec.name}_{speaker}",
                    transcript=transcript,
                    corpus=spec.name,
                )
            )
    return utterances


def _kaldi_table(path: Path, required: bool = True) -> dict[str, str]:
    """A Kaldi table (`key value...`, whitespace-separated); missing optional tables are empty."""
    if not path.is_file():
        if required:
            raise CorpusError(f"{path}: missing (a Kaldi data directory needs wav.scp and utt2spk)")
        return {}
    table = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise CorpusError(f"{path}:{line_no}: expected '<key> <value>', got {line!r}")
        if parts[0] in table:
            raise CorpusError(f"{path}:{line_no}: key {parts[0]!r} occurs twice")
        table[parts[0]] = parts[1].strip()
    return table


def _inside(root: Path, rel: str, where: str) -> Path:
    """`root / rel`, refused when it leaves `root` (a downloaded corpus cannot point elsewhere)."""
    resolved = (root / rel).resolve()
    if Path(rel).is_absolute() or not resolved.is_relative_to(root.resolve()):
        raise CorpusError(f"{where}: path {rel!r} escapes the corpus root {root.resolve()}")
    return root / rel


def read_kaldi(data_dir: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """A Kaldi/ESPnet data directory: wav.scp, utt2spk, optional text, segments, spk2gender, spk2age.

    wav.scp paths resolve against `spec.root` (default: the data directory's parent, as in
    speechocean762 where `train/wav.scp` says `WAVE/SPEAKER0001/x.opus`). A piped entry
    (`... |`, a shell command in Kaldi) is refused, never run. With `segments`, each segment is
    one utterance cut from its recording.
    """
    if not data_dir.is_dir():
        raise CorpusError(f"{data_dir}: a kaldi corpus path must be a data directory")
    root = Path(spec.root) if spec.root else data_dir.parent
    wav_scp = _kaldi_table(data_dir / "wav.scp")
    utt2spk = _kaldi_table(data_dir / "utt2spk")
    text = _kaldi_table(data_dir / "text", required=False)
    genders = _kaldi_table(data_dir / "spk2gender", required=False)
    ages = _kaldi_table(data_dir / "spk2age", required=False)
    recordings: dict[str, Path] = {}
    for line_no, (key, value) in enumerate(wav_scp.items(), 1):
        where = f"{data_dir / 'wav.scp'} (entry {key!r})"
        if value.endswith("|") or value.startswith("|"):
            raise CorpusError(
                f"{where}: piped command {value!r} refused; it is never executed. "
                f"Convert the audio to files and list their paths instead"
            )
        if len(value.split()) != 1:
            raise CorpusError(
                f"{where}: expected one path, got {value!r} (commands and "
                f"extended filenames are not supported)"
            )
        recordings[key] = _inside(root, value, where)
    segments_path = data_dir / "segments"
    pieces: list[tuple[str, str, tuple[float, float] | None]] = []
    if segments_path.is_file():
        for line_no, line in enumerate(segments_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            where = f"{segments_path}:{line_no}"
            if len(parts) != 4:
                raise CorpusError(
                    f"{where}: expected '<utt> <recording> <start> <end>', got {line!r}"
                )
            utt, recording = parts[0], parts[1]
            try:
                start, end = float(parts[2]), float(parts[3])
            except ValueError:
                raise CorpusError(
                    f"{where}: start and end must be seconds, got {parts[2]!r} {parts[3]!r}"
                ) from None
            if recording not in recordings:
                raise CorpusError(f"{where}: recording {recording!r} is not in wav.scp")
            if not 0 <= start < end:
                raise CorpusError(f"{where}: needs 0 <= start < end, got {start} {end}")
            pieces.append((utt, recording, (start, end)))
    else:
        pieces = [(key, key, None) for key in recordings]
    utterances = []
    for utt, recording, segment in pieces:
        if utt not in utt2spk:
            raise CorpusError(f"{data_dir / 'utt2spk'}: utterance {utt!r} has no speaker")
        speaker = utt2spk[utt]
        utterances.append(
            UtteranceSource(
                utt_id=f"{spec.name}_{safe_id(utt)}",
                path=str(recordings[recording]),
                speaker=f"{spec.name}_{speaker}",
                transcript=text.get(utt) or None,
                corpus=spec.name,
                segment=segment,
                gender=genders.get(speaker, ""),
                age=ages.get(speaker, ""),
            )
        )
    return sorted(utterances, key=lambda u: u.utt_id)


def read_ljspeech(root: Path, spec: CorpusSpec) -> list[UtteranceSource]:
    """LJSpeech: `metadata.csv` (`id|text|normalized text`) and `wavs/<id>.<ext>`; one speaker
    (`spec.speaker`, default "lj"). The normalized text (numbers spelt out) is the transcript."""
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise CorpusError(f"{root}: an ljspeech corpus needs metadata.csv")
    wavs = {p.stem: p for p in _audio_files(root / "wavs")} if (root / "wavs").is_dir() else {}
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
        for path in _audio_files(folder):
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


SAFE_ID_RULE = "ASCII letters, digits, '_', '.' and '-', starting with a letter or digit"


def is_safe_id(utt_id: str) -> bool:
    return bool(_SAFE_ID.match(utt_id))
