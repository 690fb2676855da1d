"""The utterance manifest: validation of every file, deterministic splits, TSV I/O.

Splits are assigned per speaker, so every speaker with two or more utterances is in both
train and test (the speaker probe needs that); within a speaker they are by utterance (what
the phone probe needs). Pretraining uses train + dev, never test.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Literal

from .audio import STREAM_ABOVE_SEC, AudioError, checked_length, header_seconds, read_audio
from .corpus_spec import SAFE_ID_RULE, CorpusSpec, UtteranceSource, is_safe_id
from .store_layout import SPLITS


@dataclass(frozen=True)
class PrepareConfig:
    """The `prepare` section of params.yaml."""

    corpora: list[CorpusSpec]
    seed: int = 1234
    on_error: Literal["fail", "skip"] = "fail"
    sample_rate: int = 16_000
    min_duration_ms: float = 25.0  # shorter clips cannot hold one feature window
    # Longer files are bad files (reason too_long): an unsegmented recording of hours is a mistake far
    # more often than an utterance (LibriSpeech's longest is 35 s); None = no limit.
    max_duration_s: float | None = 600.0
    dev_fraction: float = 0.1
    test_fraction: float = 0.2
    workers: int = 0  # 0 = one per CPU core

    def validate(self) -> None:
        if not self.corpora:
            raise ValueError("corpora: at least one corpus is needed")
        names = [c.name for c in self.corpora]
        if len(set(names)) != len(names):
            raise ValueError(f"corpora: corpus names must be unique, got {names}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate: must be positive, got {self.sample_rate}")
        if self.min_duration_ms < 0:
            raise ValueError(f"min_duration_ms: must be >= 0, got {self.min_duration_ms}")
        if (
            self.max_duration_s is not None
            and not self.max_duration_s * 1000 > self.min_duration_ms
        ):
            raise ValueError(
                f"max_duration_s: must be above min_duration_ms (or null = no limit), got {self.max_duration_s}"
            )
        for name in ("dev_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError(
                "test_fraction: dev_fraction + test_fraction must leave utterances for training"
            )
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class ManifestRow:
    utt_id: str
    path: str
    corpus: str
    speaker: str
    duration: float  # seconds
    num_samples: int  # at the target sample rate
    sample_rate: int  # of the source file
    channels: int  # of the source file
    transcript: str
    align: bool
    split: str = ""
    start: float = 0.0  # seconds into the file where the utterance starts (Kaldi segments)
    end: float = 0.0  # where it ends; 0 = the end of the file
    keyword: str = ""  # utterance label for the keyword probe (Speech Commands)
    gender: str = ""
    age: str = ""

    @property
    def segment(self) -> tuple[float, float] | None:
        return (self.start, self.end) if self.end > 0 else None


@dataclass(frozen=True)
class Problem:
    """A file that cannot be used, and why."""

    utt_id: str
    path: str
    reason: str
    detail: str


def validate_utterance(
    source: UtteranceSource,
    align: bool,
    target_sample_rate: int,
    min_duration_sec: float,
    max_duration_sec: float | None = None,
) -> ManifestRow | Problem:
    """Decode one file completely and check everything a later stage relies on."""
    if not is_safe_id(source.utt_id):
        return Problem(
            source.utt_id,
            source.path,
            "bad_id",
            f"utterance id {source.utt_id!r} has unsafe characters; ids may hold only {SAFE_ID_RULE}",
        )
    if align and not source.transcript:
        return Problem(
            source.utt_id,
            source.path,
            "missing_transcript",
            "no transcript, but the corpus is set to align",
        )
    try:
        seconds = header_seconds(source.path, source.segment)
        if (
            seconds is not None and seconds > STREAM_ABOVE_SEC
        ):  # too long to decode whole: in blocks
            num_samples, source_rate, channels = checked_length(
                source.path, target_sample_rate, source.segment, max_duration_sec
            )
        else:
            audio = read_audio(
                source.path, target_sample_rate, min_duration_sec, source.segment, max_duration_sec
            )
            num_samples, source_rate, channels = (
                len(audio.samples),
                audio.source_sample_rate,
                audio.source_channels,
            )
    except AudioError as err:
        return Problem(source.utt_id, source.path, err.reason, err.detail)
    return ManifestRow(
        utt_id=source.utt_id,
        path=source.path,
        corpus=source.corpus,
        speaker=source.speaker,
        duration=round(num_samples / target_sample_rate, 4),
        num_samples=num_samples,
        sample_rate=source_rate,
        channels=channels,
        transcript=source.transcript or "",
        align=align,
        split=source.fixed_split,
        start=source.segment[0] if source.segment else 0.0,
        end=source.segment[1] if source.segment else 0.0,
        keyword=source.keyword,
        gender=source.gender,
        age=source.age,
    )


def find_duplicate_ids(sources: Iterable[UtteranceSource]) -> list[Problem]:
    sources = list(sources)
    counts = Counter(s.utt_id for s in sources)
    return [
        Problem(
            s.utt_id,
            s.path,
            "duplicate_id",
            f"utterance id {s.utt_id!r} occurs {counts[s.utt_id]} times",
        )
        for s in sources
        if counts[s.utt_id] > 1
    ]


def heldout_speakers(
    rows: list[ManifestRow],
    by_speaker_corpora: Iterable[str],
    dev_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, str]:
    """speaker -> "test" | "dev" for the speakers held out whole, per corpus split by speaker.

    In each such corpus, speakers are ranked by a hash of (seed, speaker) and the first
    round(n * test_fraction) are test speakers, the next round(n * dev_fraction) dev speakers:
    every utterance of a test speaker is in test, so pretraining (train + dev) and probe
    training never hear them. Deterministic under the seed; adding a speaker moves few others.
    """
    chosen: dict[str, str] = {}
    by_corpus: dict[str, set[str]] = defaultdict(set)
    wanted = set(by_speaker_corpora)
    for row in rows:
        if row.corpus in wanted and not row.split:  # rows with a corpus-given split keep it
            by_corpus[row.corpus].add(row.speaker)
    for corpus in sorted(by_corpus):
        speakers = sorted(
            by_corpus[corpus], key=lambda s: hashlib.sha256(f"{seed}:heldout:{s}".encode()).digest()
        )
        n = len(speakers)
        n_test = round(n * test_fraction) if n >= 3 else 0
        n_dev = round(n * dev_fraction) if n >= 3 else 0
        for i, speaker in enumerate(speakers[: n_test + n_dev]):
            chosen[speaker] = "test" if i < n_test else "dev"
    return chosen


def assign_splits(
    rows: list[ManifestRow],
    dev_fraction: float,
    test_fraction: float,
    seed: int,
    heldout: dict[str, str] | None = None,
) -> list[ManifestRow]:
    """Deterministic per-speaker split; the order of each speaker's utterances depends only on
    the seed and the speaker, so adding a corpus does not reshuffle the others.

    Speakers in `heldout` (see `heldout_speakers`) go whole to their split; rows that already
    carry a split (a corpus's own lists) keep it; the rest split by utterance within speaker.
    """
    heldout = heldout or {}
    by_speaker: dict[str, list[ManifestRow]] = defaultdict(list)
    assigned: list[ManifestRow] = []
    for row in rows:
        if row.split:
            assigned.append(row)
        elif row.speaker in heldout:
            assigned.append(_replace(row, split=heldout[row.speaker]))
        else:
            by_speaker[row.speaker].append(row)
    for speaker in sorted(by_speaker):
        group = sorted(by_speaker[speaker], key=lambda r: r.utt_id)
        digest = hashlib.sha256(f"{seed}:{speaker}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "little")).shuffle(group)
        n = len(group)
        n_test = max(1, round(n * test_fraction)) if n >= 2 else 0
        n_dev = round(n * dev_fraction) if n - n_test >= 3 else 0
        for i, row in enumerate(group):
            split = "test" if i < n_test else "dev" if i < n_test + n_dev else "train"
            assigned.append(_replace(row, split=split))
    return sorted(assigned, key=lambda r: r.utt_id)


def _replace(row: ManifestRow, **changes) -> ManifestRow:
    values = asdict(row)
    values.update(changes)
    return ManifestRow(**values)


def summarize(
    rows: list[ManifestRow], problems: list[Problem], target_sample_rate: int = 16_000
) -> dict:
    splits = Counter(r.split for r in rows)
    return {
        "utterances": len(rows),
        "hours": round(sum(r.duration for r in rows) / 3600, 4),
        "speakers": len({r.speaker for r in rows}),
        "skipped": len(problems),
        "skipped_by_reason": dict(sorted(Counter(p.reason for p in problems).items())),
        "resampled": sum(1 for r in rows if r.sample_rate != target_sample_rate),
        "downmixed": sum(1 for r in rows if r.channels > 1),
        "to_align": sum(1 for r in rows if r.align),
        "splits": {split: splits.get(split, 0) for split in SPLITS},
        "corpora": dict(sorted(Counter(r.corpus for r in rows).items())),
    }


def write_tsv(path: Path, records: list, record_type: type) -> None:
    names = [f.name for f in fields(record_type)]
    with open(path, "w", newline="", encoding="utf-8") as f:  # paths may hold any letter
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(names)
        for record in records:
            writer.writerow([_format(getattr(record, name)) for name in names])


def _format(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).replace("\t", " ").replace("\n", " ")


def read_manifest(path: str | Path) -> list[ManifestRow]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run the prepare stage first")
    types: dict[str, Callable] = {
        "duration": float,
        "num_samples": int,
        "sample_rate": int,
        "channels": int,
        "start": float,
        "end": float,
    }
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for record in csv.DictReader(f, delimiter="\t"):
            values = {k: types.get(k, str)(v) for k, v in record.items()}
            values["align"] = record["align"] == "1"
            rows.append(ManifestRow(**values))
    return rows
