"""DDP on CPU: two gloo processes under torchrun train in lockstep on disjoint data."""

import hashlib
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mockingjay.checkpoint import load_model_dir
from mockingjay.featstore import RaggedWriter

from .conftest import run

pytestmark = pytest.mark.slow  # trains end to end in two torchrun processes

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs on every rank: records which training utterances this rank loaded, trains, and dumps
# a digest of its final weights.
SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from mockingjay import batching
    from mockingjay.masking import MaskConfig
    from mockingjay.model import ModelConfig
    from mockingjay.trainer import TrainConfig, TrainData, Trainer

    features, out = sys.argv[1], sys.argv[2]
    loaded = []
    original_getitem = batching.FeatureDataset.__getitem__

    def recording_getitem(self, item):
        loaded.append((id(self), item[0]))
        return original_getitem(self, item)

    batching.FeatureDataset.__getitem__ = recording_getitem

    def digest(model):
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    model_config = ModelConfig(input_dim=5, target_dim=5, hidden_size=16, num_layers=1, num_heads=2,
                               intermediate_size=32)
    config = TrainConfig(total_steps=int(sys.argv[3]), learning_rate=5e-3, max_frames_per_batch=120,
                         max_length=40, log_every=2, checkpoint_every=2, progress=False)
    events = []
    trainer = Trainer(model_config, MaskConfig(span_length=2), config, TrainData(features + "/train", features + "/dev"),
                      out + "/run/checkpoints", out + "/run/model", callback=events.append)
    rank = int(os.environ["RANK"])
    result = trainer.fit()
    train_indices = sorted(index for owner, index in loaded if owner == id(trainer.train_data))
    json.dump({"rank": rank, "world_size": result["world_size"], "indices": train_indices,
               "digest": digest(trainer.model), "result": result, "events": events,
               "batches_per_epoch": trainer.sampler.batches_per_epoch(0)},
              open(f"{out}/rank{rank}.json", "w"))
""")


def digest(model) -> str:  # same as in SCRIPT
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def write_corpus(path: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with RaggedWriter(path, dim=5) as writer:
        for i in range(count):
            length = int(rng.integers(10, 40))
            writer.append(f"utt{i:03d}", rng.standard_normal((length, 5)) + np.linspace(-1, 1, 5))


def test_two_gloo_ranks_share_data_and_stay_identical(tmp_path):
    features = tmp_path / "features"
    write_corpus(features / "train", 30, seed=0)
    write_corpus(features / "dev", 8, seed=1)
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    # One epoch exactly: the batch count per rank is the same in every epoch for this data.
    from mockingjay.batching import FeatureDataset, LengthBucketBatchSampler

    steps = LengthBucketBatchSampler(
        FeatureDataset(features / "train").lengths, 120, max_length=40, rank=0, world_size=2
    ).batches_per_epoch(0)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(features),
        str(tmp_path),
        str(steps),
    ]
    completed = run(command, Path.cwd(), env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks' weights diverged"
    seen = [set(r["indices"]) for r in ranks]
    assert len(ranks[0]["indices"]) == len(seen[0]) and len(ranks[1]["indices"]) == len(seen[1])
    assert not seen[0] & seen[1], "both ranks trained on the same utterances"
    assert seen[0] | seen[1] == set(range(30))
    # Only rank 0 logs and writes; the final model equals what both ranks hold.
    assert ranks[0]["events"] and not ranks[1]["events"]
    saved, _ = load_model_dir(tmp_path / "run" / "model")
    assert digest(saved) == ranks[0]["digest"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{steps:06d}").is_dir()
    result = ranks[0]["result"]
    assert result["heldout_loss_final"] < result["heldout_loss_initial"]
    assert ranks[1]["result"]["heldout_loss_final"] == result["heldout_loss_final"]


FINETUNE_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import numpy as np
    import torch
    from mockingjay.checkpoint import save_model_dir
    from mockingjay.finetune import FineTuner
    from mockingjay.finetune_config import FinetuneConfig
    from mockingjay.finetune_data import LabelledDataset
    from mockingjay.model import MockingjayForMAM, ModelConfig
    from mockingjay.train_config import TrainConfig

    features, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    model_config = ModelConfig(input_dim=5, target_dim=5, hidden_size=16, num_layers=1, num_heads=2,
                               intermediate_size=32)
    if rank == 0:  # the pretrained model both ranks start from
        torch.manual_seed(1)
        save_model_dir(out + "/pretrained", MockingjayForMAM(model_config), model_config)
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()
    def dataset(split):
        from mockingjay.featstore import RaggedArray
        store = RaggedArray(f"{features}/{split}")
        labels = [(np.asarray(store[i])[:, 0] > 0).astype(np.int64) for i in range(len(store))]
        return LabelledDataset(f"{features}/{split}", np.arange(len(store)), frame_labels=labels)
    config = TrainConfig(total_steps=4, learning_rate=5e-3, max_frames_per_batch=120, max_length=40,
                         log_every=2, checkpoint_every=2, progress=False)
    tuner = FineTuner(model_config, FinetuneConfig(task="phone", num_classes=2, freeze_encoder_steps=2),
                      config, dataset("train"), dataset("dev"), out + "/ft/checkpoints", out + "/ft/model",
                      pretrained_dir=out + "/pretrained")
    result = tuner.fit()
    h = hashlib.sha256()
    for name, tensor in sorted(tuner.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    json.dump({"world_size": result["world_size"], "digest": h.hexdigest()},
              open(f"{out}/ft-rank{rank}.json", "w"))
""")


def test_fine_tuning_under_two_gloo_ranks_stays_identical_with_the_encoder_frozen_first(tmp_path):
    features = tmp_path / "features"
    write_corpus(features / "train", 30, seed=0)
    write_corpus(features / "dev", 8, seed=1)
    script = tmp_path / "ddp_finetune.py"
    script.write_text(FINETUNE_SCRIPT)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(script), str(features), str(tmp_path)]
    completed = run(command, Path.cwd(), env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"ft-rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"], "the ranks' weights diverged"
    assert (tmp_path / "ft" / "model" / "model.safetensors").is_file()
