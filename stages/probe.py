"""probe: linear phone and speaker probes of every layer, with the log-mel input as the baseline.

`mockingjay probe` (the DVC stage) probes the extracted representations of all layers in one
pass; `mockingjay probe --layer 3` probes one layer, `--layer input` the log-mel baseline;
`--checkpoint DIR` probes any model directory by running it on the fly over the features
(online mode, also what to use when a corpus is too large to extract).

The stage writes (when asked with --metrics/--report/--plot, as dvc.yaml does) a compact
`metrics/probe.json`, a DVC plots table of accuracy per layer, and a report folder with the
full results (confusion matrices) and a PNG. MLflow gets a parent run carrying the pretraining
params beside the probe accuracies (one comparison view shows both), and a child run per task
and layer.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mockingjay.config import ParamError, from_section, to_flat_dict
from mockingjay.featstore import RaggedArray
from mockingjay.probe_config import ProbeError
from mockingjay.store_layout import SPLITS, labels_store, layer_indices, utterances_table

from . import tracking
from .common import (
    PARAMS_OPTION,
    StageError,
    atomic_output_dir,
    check_output_dir,
    check_output_file,
    cli_errors,
    section,
    write_json,
)
from .probe_params import ProbeStageConfig, ProbeTaskConfig, parse_layer
from .probe_report import (
    compact_metrics,
    extra_probes,
    figure_extras,
    format_extra,
    format_table,
    log_runs,
    result_rows,
    write_plot_table,
)
from .runtime import check_model_features, extract_config, resolve_device, window_frames


def _stored_layers(representations: Path) -> int:
    indices = layer_indices(representations / "train")
    if not indices:
        raise StageError(
            f"{representations}/train holds no layer stores; run the extract stage first"
        )
    return max(indices)


@cli_errors
def main(
    params: Path = PARAMS_OPTION,
    layer: str = typer.Option(
        None, "--layer", help="all | input | a layer index | indices as 1,3 (default: probe.layers)"
    ),
    checkpoint: Path = typer.Option(
        None, "--checkpoint", help="probe this model directory (runs it on the fly)"
    ),
    mode: str = typer.Option(
        None, help="extracted | online (default: probe.mode; --checkpoint implies online)"
    ),
    representations: Path = typer.Option(Path("data/representations"), help="extract stage output"),
    features: Path = typer.Option(
        Path("data/features"), help="featurize stage output (labels, speakers)"
    ),
    model: Path = typer.Option(
        Path("models/pretrain/model"), help="the pipeline's model (for its params)"
    ),
    metrics: Path = typer.Option(None, help="write compact metrics JSON here (DVC metrics)"),
    plot: Path = typer.Option(None, help="write the accuracy-per-layer table here (DVC plots)"),
    report: Path = typer.Option(None, help="write full results and a PNG figure into this folder"),
    baseline_features: Path = typer.Option(
        None,
        help="take the log-mel baseline from these features (a "
        "featurize output, e.g. made with cmvn: global) instead of the extracted input",
    ),
    force: bool = typer.Option(
        False, "--force", help="replace --report even if this stage did not make it"
    ),
) -> None:
    """Linear phone (frame) and speaker (utterance) probes per layer; prints a result table."""
    config = from_section(ProbeStageConfig, section(params, "probe"), "probe")
    model_dir = checkpoint or model
    if report:
        check_output_dir(
            report,
            "probe",
            force,
            inputs=[params, representations, features, model_dir],
            option="--report",
        )
    check_output_file(metrics, "--metrics")
    check_output_file(plot, "--plot")
    mode = mode or ("online" if checkpoint else config.mode)
    if mode not in ("extracted", "online"):
        raise ParamError(f"--mode: expected extracted or online, got {mode!r}")
    window = None
    if mode == "online" or checkpoint:
        check_model_features(model_dir, features)
        from mockingjay.checkpoint import load_config

        model_record = load_config(model_dir)["model"]
        num_layers = model_record["num_layers"]
        if (
            mode == "online"
        ):  # long utterances go through the model in the windows extract would use
            window = window_frames(extract_config(params), model_record.get("downsample_rate", 1))
    else:
        num_layers = _stored_layers(representations)
    layers, include_input = parse_layer(layer or config.layers, num_layers)
    labels = {split: RaggedArray(labels_store(features, split)) for split in SPLITS}

    run_params = {
        **to_flat_dict(config),
        "mode": mode,
        "layer": layer or config.layers,
        "model": str(model_dir),
        "baseline_features": str(baseline_features) if baseline_features else "extracted input",
    }
    run_params.update(_pretrain_params(model_dir))
    with tracking.stage_run("probe", run_params) as mlflow:
        try:
            results = _run_probes(
                config,
                mode,
                model_dir,
                features,
                representations,
                layers,
                include_input,
                labels,
                baseline_features,
                window,
            )
        except ProbeError as err:
            raise StageError(str(err)) from err
        rows = result_rows(results)
        print(format_table(rows, results))
        if any(extra_probes(r) or r.get("extra_tests") for r in results.values()):
            print(format_extra(results))
        log_runs(mlflow, results, rows)
        if metrics:
            write_json(metrics, compact_metrics(results))
        if plot:
            write_plot_table(plot, rows, results)
        if report:
            with atomic_output_dir(report, "probe", force) as tmp:
                write_json(tmp / "results.json", results)
                from mockingjay.figures import plot_layer_weights, plot_probe_accuracy

                plot_probe_accuracy(rows, tmp / "probe_accuracy.png", figure_extras(results))
                weights = {
                    task: p["layer_weights"]
                    for task, r in results.items()
                    for p in extra_probes(r)
                    if p.get("layer_weights") and p["fraction"] == 1.0
                }
                if weights:
                    plot_layer_weights(weights, tmp / "layer_weights.png")
            for figure in ("probe_accuracy.png", "layer_weights.png"):
                if (report / figure).is_file():
                    mlflow.log_artifact(str(report / figure))
            mlflow.log_artifact(str(report / "results.json"))


def _pretrain_params(model_dir: Path) -> dict:
    """The model's own record of how it was pretrained, as `pretrain.*` params (none without a model)."""
    from mockingjay.checkpoint import load_config

    if not (model_dir / "config.json").is_file():
        return {}
    stored = load_config(model_dir)
    wanted = {k: stored[k] for k in ("model", "mask", "training") if k in stored}
    return {f"pretrain.{k}": v for k, v in to_flat_dict(wanted).items()}


def _run_probes(
    config,
    mode,
    model_dir,
    features,
    representations,
    layers,
    include_input,
    labels,
    baseline_features: Path | None = None,
    window: int | None = None,
) -> dict:
    from mockingjay.probe_plan import read_utterances, select_utterances, test_corpora_sets

    device = resolve_device(config.device)
    utterances = read_utterances(utterances_table(features))
    speakers = {utt: info.speaker for utt, info in utterances.items()}
    selections = {}
    for task in config.tasks:
        settings: ProbeTaskConfig = getattr(config, task)
        selections[task] = (
            select_utterances(
                utterances,
                settings.corpora,
                settings.speaker_independent,
                need_keyword=task == "keyword",
                exclude_corpora=config.test_corpora,
            ),
            test_corpora_sets(utterances, config.test_corpora, need_keyword=task == "keyword"),
        )
    classes_of = {"speaker": speakers, "keyword": {u: i.keyword for u, i in utterances.items()}}
    if mode == "online":
        if baseline_features is not None:
            raise ParamError(
                "--baseline-features: extracted mode only (online probes the model's own input)"
            )
        phone = config.phone
        if "phone" in config.tasks and (
            phone.kinds != ["linear"] or phone.label_fractions != [1.0] or config.test_corpora
        ):
            raise ParamError(
                "probe.mode: online probes phones with linear heads on all labels only (no kinds, "
                "label_fractions or test_corpora): extract the representations for those"
            )
        from mockingjay.checkpoint import load_encoder_dir
        from mockingjay.probe_online import probe_online

        network, _ = load_encoder_dir(model_dir, device=device)  # pretrained or fine-tuned
        stores = {split: RaggedArray(features / split, finite=True) for split in SPLITS}
        utterance_tasks = {
            task: (
                classes_of[task],
                getattr(config, task).training(),
                {
                    "include": selections[task][0],
                    "extra_tests": selections[task][1],
                    **getattr(config, task).options(),
                },
            )
            for task in config.tasks
            if task != "phone"
        }
        online = probe_online(
            network,
            stores,
            labels if "phone" in config.tasks else None,
            None,
            layers=layers or [],
            include_input=include_input,
            device=device,
            phone_config=phone.training(),
            phone_include=selections["phone"][0] if "phone" in config.tasks else None,
            utterance_tasks=utterance_tasks,
            window_frames=window,
        )
        return {task: online[task] for task in config.tasks}
    from mockingjay.probe import probe_phones
    from mockingjay.probe_stores import open_representations
    from mockingjay.probe_utterance import pooled_utterances, probe_utterances

    reps = open_representations(
        representations, layers=layers, include_input=include_input, input_root=baseline_features
    )
    results = {}
    pooled = None  # the speaker and keyword tasks share one pooling pass over the stores
    for task in config.tasks:
        settings = getattr(config, task)
        include, extra = selections[task]
        if task == "phone":
            results[task] = probe_phones(
                reps,
                labels,
                settings.training(),
                device=device,
                include=include,
                extra_tests=extra,
                **settings.options(),
            )
        else:
            pooled = pooled or pooled_utterances(reps)
            results[task] = probe_utterances(
                *pooled,
                classes_of[task],
                settings.training(),
                device,
                task=task,
                include=include,
                extra_tests=extra,
                **settings.options(),
            )
        results[task]["selection"] = {
            "corpora": settings.corpora or "all",
            "speaker_independent": settings.speaker_independent,
        }
    return results
