"""Phone inventory, label readers and the frame-label rounding rule, on real and hand-written files."""

from pathlib import Path

import numpy as np
import pytest

from mockingjay.phones import (
    PHONE_TO_ID,
    PHONES,
    LabelError,
    Segment,
    frame_agreement,
    normalize_phone,
    read_cpc_alignments,
    read_lab,
    read_textgrid,
    resample_frame_labels,
    segments_to_frame_labels,
    write_lab,
)

FIXTURES = Path(__file__).parent / "fixtures" / "cmu_arctic"
REFERENCE_LAB = FIXTURES / "lab_reference" / "slt_a0009.lab"
REFERENCE_HTS = FIXTURES / "lab_reference" / "slt_a0009.hts_phone.lab"
POCKETSPHINX_LAB = FIXTURES / "lab_pocketsphinx" / "slt_a0009.lab"


def ids(*phones: str) -> list[int]:
    return [PHONE_TO_ID[p] if p != "-" else -1 for p in phones]


def test_inventory_is_39_cmudict_phones_plus_silence():
    assert len(PHONES) == 40 and len(set(PHONES)) == 40
    assert PHONES[-1] == "SIL" and {"AH", "ZH", "NG", "HH"} <= set(PHONES)
    assert all(PHONE_TO_ID[p] == i for i, p in enumerate(PHONES))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("ah0", "AH"), ("EY1", "EY"), ("er2", "ER"), ("ax", "AH"), ("axr", "ER"), ("ix", "IH"),
        ("dx", "T"), ("ax-h", "AH"), ("sil", "SIL"), ("sp", "SIL"), ("spn", "SIL"), ("", "SIL"),
        ("<sil>", "SIL"), ("+NSN+", "SIL"), ("+SPN+", "SIL"), ("h#", "SIL"), ("pau", "SIL"),
        ("tcl", "SIL"), (" zh ", "ZH"),
    ],
)  # fmt: skip
def test_normalize_phone(raw, expected):
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize("raw", ["q", "xx", "A", "AHH"])
def test_unknown_phone_is_an_error_naming_it(raw):
    with pytest.raises(LabelError, match=repr(raw).replace("+", r"\+")):
        normalize_phone(raw)
    assert issubclass(LabelError, ValueError)


def test_read_reference_lab():
    segments = read_lab(REFERENCE_LAB)
    assert len(segments) == 40
    assert segments[0] == Segment(0.0, 0.13, "SIL") and segments[-1] == Segment(2.925, 3.075, "SIL")
    assert segments[25] == Segment(1.91, 1.96, "AH")  # "1.910 1.960 ax" in the hand labels
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))


def test_hts_full_context_lab_equals_seconds_lab():
    assert read_lab(REFERENCE_HTS) == read_lab(REFERENCE_LAB)  # unit auto-detected
    assert read_lab(REFERENCE_HTS, time_unit="htk") == read_lab(REFERENCE_LAB)
    assert read_lab(REFERENCE_HTS, time_unit="seconds")[1].start == 1_300_000.0


def test_lab_errors_name_file_and_line(tmp_path):
    bad_phone = tmp_path / "bad_phone.lab"
    bad_phone.write_text("0.00 0.10 sil\n0.10 0.20 qq\n")
    with pytest.raises(LabelError, match=r"bad_phone\.lab:2: unknown phone 'qq'"):
        read_lab(bad_phone)

    overlapping = tmp_path / "overlap.lab"
    overlapping.write_text("0.00 0.10 sil\n\n0.05 0.20 ah\n")
    with pytest.raises(LabelError, match=r"overlap\.lab:3: starts at 0.05"):
        read_lab(overlapping)

    short_line = tmp_path / "short.lab"
    short_line.write_text("0.00 0.10\n")
    with pytest.raises(LabelError, match=r"short\.lab:1"):
        read_lab(short_line)


def test_write_lab_round_trip(tmp_path):
    segments = [Segment(0.0, 0.13, "sil"), Segment(0.13, 0.2, "hh"), Segment(0.2, 0.3125, "iy1")]
    write_lab(tmp_path / "out.lab", segments)
    assert (tmp_path / "out.lab").read_text().splitlines()[2] == "0.200 0.312 IY"
    assert read_lab(tmp_path / "out.lab")[:2] == [
        Segment(0.0, 0.13, "SIL"),
        Segment(0.13, 0.2, "HH"),
    ]


MFA_LONG_TEXTGRID = """File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0 
xmax = 1.05 
tiers? <exists> 
size = 2 
item []: 
    item [1]:
        class = "IntervalTier" 
        name = "speaker1 - words" 
        xmin = 0 
        xmax = 1.05 
        intervals: size = 3 
        intervals [1]:
            xmin = 0 
            xmax = 0.31 
            text = "" 
        intervals [2]:
            xmin = 0.31 
            xmax = 0.82 
            text = "zero" 
        intervals [3]:
            xmin = 0.82 
            xmax = 1.05 
            text = "" 
    item [2]:
        class = "IntervalTier" 
        name = "speaker1 - phones" 
        xmin = 0 
        xmax = 1.05 
        intervals: size = 7 
        intervals [1]:
            xmin = 0 
            xmax = 0.31 
            text = "" 
        intervals [2]:
            xmin = 0.31 
            xmax = 0.45 
            text = "Z" 
        intervals [3]:
            xmin = 0.45 
            xmax = 0.58 
            text = "IH1" 
        intervals [4]:
            xmin = 0.58 
            xmax = 0.66 
            text = "R" 
        intervals [5]:
            xmin = 0.66 
            xmax = 0.82 
            text = "OW0" 
        intervals [6]:
            xmin = 0.82 
            xmax = 0.9 
            text = "sp" 
        intervals [7]:
            xmin = 0.9 
            xmax = 1.05 
            text = "spn" 
"""

MFA_PHONES = [
    Segment(0.0, 0.31, "SIL"), Segment(0.31, 0.45, "Z"), Segment(0.45, 0.58, "IH"), Segment(0.58, 0.66, "R"),
    Segment(0.66, 0.82, "OW"), Segment(0.82, 0.9, "SIL"), Segment(0.9, 1.05, "SIL"),
]  # fmt: skip


def short_textgrid() -> str:
    """The same TextGrid in Praat's short text format."""
    words = [(0, 0.31, ""), (0.31, 0.82, "zero"), (0.82, 1.05, "")]
    phones = [(0, 0.31, ""), (0.31, 0.45, "Z"), (0.45, 0.58, "IH1"), (0.58, 0.66, "R"), (0.66, 0.82, "OW0"),
              (0.82, 0.9, "sp"), (0.9, 1.05, "spn")]  # fmt: skip
    lines = [
        'File type = "ooTextFile"',
        'Object class = "TextGrid"',
        "",
        "0",
        "1.05",
        "<exists>",
        "2",
    ]
    for name, intervals in (("words", words), ("phones", phones)):
        lines += ['"IntervalTier"', f'"{name}"', "0", "1.05", str(len(intervals))]
        for xmin, xmax, text in intervals:
            lines += [str(xmin), str(xmax), f'"{text}"']
    return "\n".join(lines) + "\n"


def test_read_mfa_textgrid_long_and_short_format(tmp_path):
    long_path, short_path = tmp_path / "long.TextGrid", tmp_path / "short.TextGrid"
    long_path.write_text(MFA_LONG_TEXTGRID)
    short_path.write_text(short_textgrid())
    assert read_textgrid(long_path) == MFA_PHONES
    assert read_textgrid(short_path, tier="PHONES") == MFA_PHONES
    # Praat also saves UTF-16 with a byte-order mark
    (tmp_path / "utf16.TextGrid").write_text(MFA_LONG_TEXTGRID, encoding="utf-16")
    assert read_textgrid(tmp_path / "utf16.TextGrid") == MFA_PHONES


def test_textgrid_errors_name_file_tier_and_line(tmp_path):
    path = tmp_path / "mfa.TextGrid"
    path.write_text(MFA_LONG_TEXTGRID)
    with pytest.raises(
        LabelError, match=r"mfa\.TextGrid: no interval tier named 'phonemes'.*speaker1 - phones"
    ):
        read_textgrid(path, tier="phonemes")
    with pytest.raises(LabelError, match=r"mfa\.TextGrid:\d+: unknown phone 'zero'"):
        read_textgrid(path, tier="words")  # a word tier holds words, not phones
    path.write_text(MFA_LONG_TEXTGRID.replace('text = "R"', 'text = "RR"'))
    line_of_bad_phone = MFA_LONG_TEXTGRID.splitlines().index('            text = "R" ') + 1
    with pytest.raises(LabelError, match=rf"mfa\.TextGrid:{line_of_bad_phone}: unknown phone 'RR'"):
        read_textgrid(path)
    (tmp_path / "truncated.TextGrid").write_text(MFA_LONG_TEXTGRID[:900])
    with pytest.raises(LabelError, match=r"truncated\.TextGrid"):
        read_textgrid(tmp_path / "truncated.TextGrid")


def test_read_cpc_alignments(tmp_path):
    path = tmp_path / "converted_aligned_phones.txt"
    path.write_text("103-1240-0000 0 0 0 5 5 12\n\n1272-128104-0000 3 3 40\n")
    labels = read_cpc_alignments(path)
    assert list(labels) == ["103-1240-0000", "1272-128104-0000"]
    assert labels["103-1240-0000"].dtype == np.int16
    assert labels["103-1240-0000"].tolist() == [0, 0, 0, 5, 5, 12] and labels[
        "1272-128104-0000"
    ].tolist() == [3, 3, 40]

    path.write_text("utt1 0 0 1\nutt2 1 1\nutt1 2 2\n")
    with pytest.raises(
        LabelError, match=r"converted_aligned_phones\.txt:3: duplicate utterance id 'utt1'"
    ):
        read_cpc_alignments(path)
    path.write_text("utt1 0 0 1\nutt2 1 x\n")
    with pytest.raises(LabelError, match=r"converted_aligned_phones\.txt:2: .*'utt2'"):
        read_cpc_alignments(path)


# frame t is centred at t * hop and takes the segment with start <= centre < end
SEGMENTS = [Segment(0.0, 0.03, "sil"), Segment(0.03, 0.08, "ah"), Segment(0.08, 0.10, "t")]


def test_frame_labels_at_10ms_hop():
    labels = segments_to_frame_labels(SEGMENTS, num_frames=12, hop_sec=0.01)
    assert labels.dtype == np.int16
    assert labels.tolist() == ids(
        "SIL", "SIL", "SIL", "AH", "AH", "AH", "AH", "AH", "T", "T", "-", "-"
    )


def test_frame_labels_at_12_5ms_hop():
    # centres 0, 12.5, 25, 37.5, 50, 62.5, 75, 87.5, 100 ms
    labels = segments_to_frame_labels(SEGMENTS, num_frames=9, hop_sec=0.0125)
    assert labels.tolist() == ids("SIL", "SIL", "SIL", "AH", "AH", "AH", "AH", "T", "-")


def test_frame_labels_offset_and_gaps():
    gappy = [Segment(0.02, 0.04, "s"), Segment(0.06, 0.07, "z")]
    labels = segments_to_frame_labels(
        gappy, num_frames=5, hop_sec=0.01, offset_sec=0.02
    )  # centres 20..60 ms
    assert labels.tolist() == ids("S", "S", "-", "-", "Z")


def test_frame_labels_boundaries_are_not_decided_by_float_error():
    # with a 20 ms offset, frame 12's centre is 0.02 + 12 * 0.01 == 0.13999999999999999 < 0.14
    segments = [Segment(0.0, 0.14, "aa"), Segment(0.14, 0.17, "b"), Segment(0.17, 0.3, "d")]
    labels = segments_to_frame_labels(segments, num_frames=20, hop_sec=0.01, offset_sec=0.02)
    assert np.flatnonzero(np.diff(labels)).tolist() == [11, 14]  # changes at frames 12 and 15
    assert labels[12] == PHONE_TO_ID["B"]


def test_frame_labels_reject_overlaps():
    with pytest.raises(LabelError, match="overlap"):
        segments_to_frame_labels([Segment(0, 0.1, "a"), Segment(0.05, 0.2, "b")], 20, 0.01)


def test_resample_10ms_labels_to_12_5ms():
    labels_10ms = np.array(
        ids("SIL", "SIL", "SIL", "AH", "AH", "AH", "AH", "AH", "T", "T"), dtype=np.int16
    )
    resampled = resample_frame_labels(labels_10ms, 0.01, 0.0125, num_frames=10)
    # same as labelling the segments directly at 12.5 ms, -1 past the end of the source
    assert resampled.tolist() == ids("SIL", "SIL", "SIL", "AH", "AH", "AH", "AH", "T", "-", "-")
    assert resampled.dtype == np.int16


def test_resampling_equals_direct_labelling_on_a_real_alignment():
    segments = read_lab(POCKETSPHINX_LAB)  # 10 ms boundaries
    labels_10ms = segments_to_frame_labels(segments, num_frames=310, hop_sec=0.01)
    direct = segments_to_frame_labels(segments, num_frames=248, hop_sec=0.0125)
    resampled = resample_frame_labels(labels_10ms, 0.01, 0.0125, num_frames=248)
    np.testing.assert_array_equal(resampled, direct)
    # the s3prl#44 bug: using 10 ms label t for 12.5 ms frame t drifts out of step
    assert frame_agreement(labels_10ms[:248], direct) < 0.5


def test_frame_agreement():
    a = np.array([0, 1, 2, -1, 3, 3])
    b = np.array([0, 1, 5, 7, -1, 3, 9, 9])  # longer: compared over the first 6 frames
    assert frame_agreement(a, b) == pytest.approx(3 / 4)  # frames 0, 1, 2, 5 labelled in both
    with pytest.raises(ValueError):
        frame_agreement(np.array([-1, -1]), np.array([1, 2]))


def test_reference_and_pocketsphinx_labels_agree_on_most_frames():
    reference = segments_to_frame_labels(read_lab(REFERENCE_LAB), 310, 0.01)
    pocketsphinx = segments_to_frame_labels(read_lab(POCKETSPHINX_LAB), 310, 0.01)
    assert (reference >= 0).sum() == 308  # the hand labels stop at 3.075 s
    assert 0.8 < frame_agreement(reference, pocketsphinx) < 0.95
