"""Corpora listed in tables rather than laid out in folders: a TSV manifest and a Kaldi data
directory (wav.scp, utt2spk, text, segments). Both may name files anywhere, so every path is
checked to stay inside the corpus root.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mockingjay.corpus_spec import CorpusError, CorpusSpec, UtteranceSource, safe_id


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
