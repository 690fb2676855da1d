"""Phone labels: the 40-class inventory, label-file readers and frame-level labels.

The class inventory is the 39 CMUdict ARPAbet phones (stress removed) plus SIL, so that
labels from pocketsphinx, the Montreal Forced Aligner (ARPAbet with stress digits), HTS
full-context labels and TIMIT-style hand labels all land in one set of class ids.

Frame-label rule (used everywhere in this module; the s3prl#43/#44 bug is getting it wrong):
frame t of a feature sequence is centred at `offset_sec + t * hop_sec` (torchaudio
spectrograms with center=True put the centre of window t at sample t * hop), and it gets the
phone of the segment with `start <= centre < end`. Times are compared on a 1 µs integer grid
so that a 10 ms boundary meeting a 10 ms frame centre is decided by the rule, not by float
rounding (0.01 * 29 != 0.29 in binary floating point).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

PHONES: tuple[str, ...] = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH",
    "EH", "ER", "EY", "F", "G", "HH", "IH", "IY", "JH", "K",
    "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH",
    "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH", "SIL",
)  # fmt: skip
PHONE_TO_ID: dict[str, int] = {phone: i for i, phone in enumerate(PHONES)}
SILENCE = "SIL"
UNLABELLED = -1  # frame label for frames outside every segment

# Silence, pause and noise tokens of the label formats we read: MFA ("", sp, sil, spn),
# pocketsphinx (<sil>, <s>, </s>, +NSN+, +SPN+ and other +FILLER+), festival/ARCTIC (pau,
# ssil), TIMIT (h#, pau, epi). Spoken noise is not a phone of the inventory, so it is
# silence here rather than an error.
_SILENCE_TOKENS = frozenset(
    {"", "SIL", "SP", "SPN", "PAU", "SSIL", "H#", "EPI", "<SIL>", "<S>", "</S>"}
)

# TIMIT (and ARCTIC hand-label) phones outside CMUdict, folded the usual way (Lee & Hon
# 1989, as in the Kaldi TIMIT 60->39 map), except that flaps, nasal flaps and syllabic
# consonants go to the CMUdict phone a dictionary would use for the same word.
# TIMIT's glottal stop "q" has no counterpart and stays an error.
_PHONE_FOLDS = {
    "AX": "AH", "AX-H": "AH", "AXR": "ER", "IX": "IH", "UX": "UW",
    "EL": "L", "EM": "M", "EN": "N", "NX": "N", "ENG": "NG", "HV": "HH", "DX": "T",
    # stop closures are silence in the Lee & Hon folding
    "BCL": "SIL", "DCL": "SIL", "GCL": "SIL", "PCL": "SIL", "TCL": "SIL", "KCL": "SIL",
}  # fmt: skip

_STRESS_DIGITS = re.compile(r"[0-9]+$")
# HTS full-context label "ll^l-c+r=rr@...": the centre phone sits between '-' and '+'.
_HTS_CENTRE_PHONE = re.compile(r"^(?:[^\^]*\^)?[^-+]*-([^+]+)\+")


class LabelError(ValueError):
    """A label (file) is invalid; the message names the phone, or the file and line."""


class Segment(NamedTuple):
    start: float  # seconds
    end: float  # seconds
    phone: str


def normalize_phone(phone: str) -> str:
    """Map one phone token of any supported label format to a member of PHONES."""
    token = phone.strip().upper()
    if token.startswith("+") and token.endswith("+"):  # pocketsphinx filler: +NSN+, +SPN+ ...
        return SILENCE
    if token in _SILENCE_TOKENS:
        return SILENCE
    token = _STRESS_DIGITS.sub("", token)  # MFA / CMUdict stress: AH0, EY1
    token = _PHONE_FOLDS.get(token, token)
    if token not in PHONE_TO_ID:
        raise LabelError(
            f"unknown phone {phone!r}: not one of the {len(PHONES)} CMUdict phones + SIL"
        )
    return token


# ----------------------------------------------------------------------------------------
# label files


def _check_order(segments: Sequence[Segment], where: Sequence[str]) -> None:
    """Segments must be intervals (end >= start >= 0) in time order, not overlapping (1 µs slack)."""
    for i, seg in enumerate(segments):
        if not seg.end >= seg.start >= 0:
            raise LabelError(f"{where[i]}: bad interval {seg.start}..{seg.end}")
        if i and seg.start < segments[i - 1].end - 1e-6:
            raise LabelError(
                f"{where[i]}: starts at {seg.start}, before the previous end {segments[i - 1].end}"
            )


def read_lab(
    path: str | Path, time_unit: Literal["auto", "seconds", "htk"] = "auto"
) -> list[Segment]:
    """Read a `start end PHONE` label file (our .lab, HTK/HTS labels).

    time_unit "htk" reads times as integers in 100 ns units (HTK, HTS full-context labels);
    "auto" picks that when every time is an integer and the largest is over 1000 (1000 s is
    not an utterance length). HTS full-context labels give their centre phone. Extra fields
    after the phone (HTK scores) are ignored.
    """
    path = Path(path)
    rows: list[tuple[str, str, str, str]] = []  # (start, end, phone, "file:line")
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise LabelError(f"{path}:{line_no}: expected 'start end PHONE', got {line.strip()!r}")
        rows.append((fields[0], fields[1], fields[2], f"{path}:{line_no}"))
    if not rows:
        raise LabelError(f"{path}: no labels")

    if time_unit == "auto":
        integral = all(re.fullmatch(r"\d+", t) for start, end, _, _ in rows for t in (start, end))
        time_unit = "htk" if integral and max(int(r[1]) for r in rows) > 1000 else "seconds"
    divisor = 1e7 if time_unit == "htk" else 1.0  # dividing keeps 2700000 -> 0.27 exact

    segments, where = [], []
    for start, end, label, loc in rows:
        try:
            start_sec, end_sec = float(start) / divisor, float(end) / divisor
        except ValueError:
            raise LabelError(f"{loc}: times {start!r} {end!r} are not numbers") from None
        centre = _HTS_CENTRE_PHONE.match(label)
        try:
            phone = normalize_phone(centre.group(1) if centre else label)
        except LabelError as err:
            raise LabelError(f"{loc}: {err}") from None
        segments.append(Segment(start_sec, end_sec, phone))
        where.append(loc)
    _check_order(segments, where)
    return segments


def write_lab(path: str | Path, segments: Iterable[Segment], decimals: int = 3) -> None:
    """Write `start end PHONE` lines (normalised phones, times in seconds)."""
    lines = [
        f"{s.start:.{decimals}f} {s.end:.{decimals}f} {normalize_phone(s.phone)}\n"
        for s in segments
    ]
    Path(path).write_text("".join(lines))


# A Praat TextGrid, long or short text format, reduces to the same stream of values: quoted
# strings and numbers, once keys ("xmin =") and indices ("item [1]:", "<exists>") are dropped.
_TEXTGRID_TOKEN = re.compile(
    r'"((?:[^"]|"")*)"'  # quoted string, "" escapes a quote
    r"|(?<![\w.\[])(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)(?![\w.\]])"  # bare number
    r"|\[\s*\d*\s*\]|<\w+>|!.*"  # indices, flags and comments: skipped
)


def _textgrid_tokens(text: str) -> list[tuple[str | float, int]]:
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    tokens: list[tuple[str | float, int]] = []
    for match in _TEXTGRID_TOKEN.finditer(text):
        line_no = bisect.bisect_right(line_starts, match.start())
        if match.group(1) is not None:
            tokens.append((match.group(1).replace('""', '"'), line_no))
        elif match.group(2) is not None:
            tokens.append((float(match.group(2)), line_no))
    return tokens


def read_textgrid(path: str | Path, tier: str = "phones") -> list[Segment]:
    """Read the phone intervals of a Praat TextGrid (long or short text format).

    The tier is matched case-insensitively by name or by a "<speaker> - <name>" suffix, as
    MFA names tiers "phones" or "speaker1 - phones". Empty intervals are silence.
    """
    path = Path(path)
    raw = path.read_bytes()
    text = (
        raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    )
    tokens = _textgrid_tokens(text)
    pos = 0

    def take(kind: type) -> str | float:
        nonlocal pos
        if pos >= len(tokens):
            raise LabelError(f"{path}: TextGrid ends early")
        value, line_no = tokens[pos]
        if not isinstance(value, kind):
            raise LabelError(
                f"{path}:{line_no}: expected a {kind.__name__} in the TextGrid, got {value!r}"
            )
        pos += 1
        return value

    if take(str) != "ooTextFile" or take(str) != "TextGrid":
        raise LabelError(f"{path}: not a Praat text TextGrid (ooTextFile / TextGrid header)")
    take(float), take(float)  # file xmin, xmax
    num_tiers = int(take(float))
    wanted = tier.lower()
    tier_names = []
    for _ in range(num_tiers):
        tier_class, name = take(str), str(take(str))
        take(float), take(float)  # tier xmin, xmax
        count = int(take(float))
        tier_names.append(name)
        is_match = name.lower() == wanted or name.lower().endswith(f" - {wanted}")
        if tier_class == "TextTier":  # point tier: (time, mark) pairs
            pos += 2 * count
            continue
        if tier_class != "IntervalTier":
            raise LabelError(f"{path}: unknown tier class {tier_class!r}")
        if not is_match:
            pos += 3 * count
            continue
        segments, where = [], []
        for _ in range(count):
            xmin, xmax = take(float), take(float)
            line_no = tokens[pos][1] if pos < len(tokens) else 0  # the line of the label text
            mark = take(str)
            try:
                segments.append(Segment(float(xmin), float(xmax), normalize_phone(str(mark))))
            except LabelError as err:
                raise LabelError(f"{path}:{line_no}: {err}") from None
            where.append(f"{path}:{line_no}")
        _check_order(segments, where)
        return segments
    raise LabelError(f"{path}: no interval tier named {tier!r} (tiers: {tier_names})")


def read_cpc_alignments(path: str | Path) -> dict[str, np.ndarray]:
    """Read CPC/s3prl `converted_aligned_phones.txt`: `utt_id idx idx ...` per line.

    One phone index per 10 ms frame. Indices are returned as they are (int16): they index
    that file's own phone list, not PHONES.
    """
    path = Path(path)
    labels: dict[str, np.ndarray] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        utt_id, values = fields[0], fields[1:]
        if utt_id in labels:
            raise LabelError(f"{path}:{line_no}: duplicate utterance id {utt_id!r}")
        if not values:
            raise LabelError(f"{path}:{line_no}: utterance {utt_id!r} has no frame labels")
        try:
            frame_ids = np.array([int(v) for v in values], dtype=np.int64)
        except ValueError:
            raise LabelError(
                f"{path}:{line_no}: frame labels of {utt_id!r} are not all integers"
            ) from None
        if frame_ids.min() < 0 or frame_ids.max() > np.iinfo(np.int16).max:
            raise LabelError(f"{path}:{line_no}: frame label out of range in {utt_id!r}")
        labels[utt_id] = frame_ids.astype(np.int16)
    return labels


# ----------------------------------------------------------------------------------------
# frame labels


def _microseconds(seconds: np.ndarray | float) -> np.ndarray:
    return np.rint(np.asarray(seconds, dtype=np.float64) * 1e6).astype(np.int64)


def segments_to_frame_labels(
    segments: Sequence[Segment], num_frames: int, hop_sec: float, offset_sec: float = 0.0
) -> np.ndarray:
    """Class id (PHONE_TO_ID) of each frame, -1 where no segment covers the frame centre.

    Frame t is centred at offset_sec + t * hop_sec and takes the segment with
    start <= centre < end (see the module docstring).
    """
    labels = np.full(num_frames, UNLABELLED, dtype=np.int16)
    if not segments or num_frames <= 0:
        return labels
    segments = sorted(segments, key=lambda s: s.start)
    starts = _microseconds([s.start for s in segments])
    ends = _microseconds([s.end for s in segments])
    if np.any(starts[1:] < ends[:-1]):
        raise LabelError("segments overlap")
    ids = np.array([PHONE_TO_ID[normalize_phone(s.phone)] for s in segments], dtype=np.int16)

    centres = _microseconds(offset_sec + np.arange(num_frames) * hop_sec)
    seg_index = (
        np.searchsorted(starts, centres, side="right") - 1
    )  # last segment starting <= centre
    inside = seg_index >= 0
    inside[inside] = centres[inside] < ends[seg_index[inside]]
    labels[inside] = ids[seg_index[inside]]
    return labels


def resample_frame_labels(
    labels: np.ndarray, src_hop_sec: float, dst_hop_sec: float, num_frames: int
) -> np.ndarray:
    """Frame labels at src_hop_sec (e.g. 10 ms CPC labels) re-timed to dst_hop_sec frames.

    Source frame s carries the phone at its centre s * src_hop, which for labels whose
    boundaries lie on the source grid (every 10 ms aligner) holds until the next source
    centre; so destination frame t (centre t * dst_hop) takes source frame
    floor(t * dst_hop / src_hop). This makes resampling the 10 ms labels of a segment list
    give exactly segments_to_frame_labels(segments, ..., dst_hop) for 10 ms-aligned segments.
    Frames past the end of the source get -1. Computed on an integer µs grid.
    """
    labels = np.asarray(labels)
    src_us, dst_us = int(_microseconds(src_hop_sec)), int(_microseconds(dst_hop_sec))
    if src_us <= 0 or dst_us <= 0:
        raise ValueError(f"hop sizes must be positive, got {src_hop_sec} and {dst_hop_sec}")
    src_index = (np.arange(num_frames, dtype=np.int64) * dst_us) // src_us
    resampled = np.full(
        num_frames, UNLABELLED, dtype=labels.dtype if labels.dtype.kind == "i" else np.int16
    )
    in_range = src_index < len(labels)
    resampled[in_range] = labels[src_index[in_range]]
    return resampled


def frame_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of frames labelled (>= 0) in both a and b that carry the same label.

    Sequences of different length are compared over the shorter one (alignments of the
    same audio often differ by a frame or two at the end).
    """
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n]), np.asarray(b[:n])
    both = (a >= 0) & (b >= 0)
    if not both.any():
        raise ValueError("no frame is labelled in both sequences")
    return float(np.mean(a[both] == b[both]))
