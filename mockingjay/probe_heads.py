"""Many independent linear softmax probes trained in one pass over the data.

The probes of the paper are linear softmax classifiers on frozen features. s3prl trains one per
layer per run, so probing 13 layers reads (or recomputes) the data 13 times. Here every batch of
frames is read once and fed to every layer's heads: for each layer, G heads (one per
hyper-parameter pair of the grid) live side by side in one weight matrix `[H, G * C]`, so one
layer's G heads cost one matmul. Layers keep separate tensors (not one `[L, H, G*C]` bmm) so that
the numbers of a layer's heads never depend on which other layers are probed with it: probing
layers {a, b} together gives bit-for-bit the results of probing a alone and b alone.

Each head is trained with Adam on the mean cross-entropy plus an L2 penalty
`weight_decay / 2 * ||W||^2` (classical regularised logistic regression: at convergence the
optimum does not depend on the optimiser), from zero weights (the problem is convex; zero is a
deterministic, per-head init). Inputs are standardised per layer with the train-set mean and
standard deviation: layers differ in scale by orders of magnitude (log-mel vs post-LayerNorm
states), and un-standardised inputs are why s3prl's speaker probe converges slowly (s3prl#186);
standardised, every layer trains well at one learning rate. After each epoch every head is scored
on the dev split and the weights of its best epoch are kept; the head with the best dev accuracy
is the layer's probe (ties, common on small dev sets, go to the lower dev cross-entropy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mockingjay import scores
from mockingjay.moments import Moments
from mockingjay.probe_config import (  # noqa: F401  (re-exported)
    KINDS,
    PHONE_PROBE,
    SPEAKER_PROBE,
    MLPSettings,
    ProbeConfig,
    ProbeError,
)
from mockingjay.probe_torch_heads import TorchHeads

Batch = tuple[
    Tensor, Mapping[str, Tensor]
]  # (labels [B] long, layer name -> inputs [B, H] float16 or float32)


class RunningMoments(Moments):
    """Per-dimension mean and standard deviation of a layer's training inputs, accumulated over
    chunks in float64 (moments.py); a constant dimension is left unscaled."""

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count == 0:
            raise ProbeError("no training examples to compute standardisation statistics from")
        mean, std = super().mean_std()
        std[std < 1e-6] = 1.0  # constant dimensions: leave them unscaled rather than divide by ~0
        return mean.astype(np.float32), std.astype(np.float32)


class LayerHeads:
    """G linear softmax heads on one layer, trained together: weight [H, G*C] and bias [G*C] are
    the rows of one parameter matrix [H + 1, G*C], so the Adam update is one pass over one tensor."""

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(
        self,
        mean: np.ndarray,
        std: np.ndarray,
        num_classes: int,
        grid: Sequence[tuple[float, float]],
        device: torch.device,
        source: str | None = None,
        fraction: float = 1.0,
    ):
        dim, self.heads, self.classes = len(mean), len(grid), num_classes
        self.source = source  # the layer these heads read (None: the key they are filed under)
        self.fraction = fraction  # of the labelled train utterances these heads learn from
        # standardised = inputs * inv_std + shift = (inputs - mean) / std, as one fused op (addcmul)
        self.inv_std = 1.0 / torch.as_tensor(std, dtype=torch.float32, device=device)
        self.shift = -torch.as_tensor(mean, dtype=torch.float32, device=device) * self.inv_std
        width = self.heads * num_classes
        self.params = torch.zeros(dim + 1, width, device=device)
        # each head's hyper-parameters, repeated over its C columns
        self.lr = torch.tensor([lr for lr, _ in grid], device=device).repeat_interleave(num_classes)
        self.weight_decay = torch.tensor([wd for _, wd in grid], device=device).repeat_interleave(
            num_classes
        )
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.params), torch.zeros_like(self.params)
        self.steps = 0
        self.best_params = self.params.clone()
        self.best_dev = np.full(self.heads, -1.0)
        self.best_loss = np.full(self.heads, np.inf)
        self.best_epoch = np.zeros(self.heads, dtype=int)

    @property
    def weight(self) -> Tensor:
        return self.params[:-1]

    @property
    def bias(self) -> Tensor:
        return self.params[-1]

    def standardise(self, inputs: Tensor) -> Tensor:
        """float32 (inputs - mean) / std; inputs may be float16 (the stores' dtype)."""
        return torch.addcmul(self.shift, inputs, self.inv_std)

    def _logits(self, inputs: Tensor, params: Tensor) -> Tensor:
        logits = torch.addmm(params[-1], self.standardise(inputs), params[:-1])
        return logits.view(len(inputs), self.heads, self.classes)

    def step(self, inputs: Tensor, labels: Tensor) -> None:
        """One Adam step of every head on the mean cross-entropy of this batch (+ L2)."""
        batch = len(inputs)
        standardised = self.standardise(inputs)
        logits = torch.addmm(self.bias, standardised, self.weight).view(
            batch, self.heads, self.classes
        )
        # d(mean CE)/d(logits) = (softmax - onehot) / B, for every head at once: no autograd graph.
        grad_logits = torch.softmax(logits, dim=-1)
        target = labels[:, None, None].expand(-1, self.heads, 1)
        grad_logits.scatter_add_(-1, target, torch.full(target.shape, -1.0, device=labels.device))
        grad_logits = grad_logits.view(batch, -1)
        grad = torch.empty_like(self.params)
        # the 1/B of the mean folds into the matmul; the L2 term wd * W is its additive input
        torch.addmm(
            self.weight * self.weight_decay,
            standardised.T,
            grad_logits,
            alpha=1.0 / batch,
            out=grad[:-1],
        )
        torch.sum(grad_logits, 0, out=grad[-1]).mul_(1.0 / batch)
        self.steps += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1**self.steps, 1 - beta2**self.steps
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denominator = (self.exp_avg_sq / correction2).sqrt_().add_(self.eps)
        self.params.addcdiv_(self.exp_avg * (self.lr / correction1), denominator, value=-1.0)

    def score(self, inputs: Tensor, labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(correct predictions, summed cross-entropy) of each of the G heads on a batch."""
        logits = self._logits(inputs, self.params)
        correct = (logits.argmax(-1) == labels[:, None]).sum(0)
        target = labels[:, None, None].expand(-1, self.heads, 1)
        loss = (torch.logsumexp(logits, -1) - logits.gather(-1, target)[..., 0]).sum(0)
        return correct.cpu().numpy(), loss.double().cpu().numpy()

    def end_epoch(self, epoch: int, dev_accuracy: np.ndarray, dev_loss: np.ndarray) -> None:
        """Keep, per head, the weights of its best epoch so far: highest dev accuracy, and on a tie
        (common on small dev sets, e.g. several epochs at 100%) the lower dev cross-entropy."""
        improved = (dev_accuracy > self.best_dev) | (
            (dev_accuracy == self.best_dev) & (dev_loss < self.best_loss)
        )
        if improved.any():
            columns = torch.from_numpy(np.repeat(improved, self.classes)).to(self.params.device)
            self.best_params = torch.where(columns, self.params, self.best_params)
            self.best_dev[improved] = dev_accuracy[improved]
            self.best_loss[improved] = dev_loss[improved]
            self.best_epoch[improved] = epoch

    @property
    def chosen(self) -> int:
        # best dev accuracy; ties go to the lower dev loss, then to the earlier grid entry
        return int(np.lexsort((np.arange(self.heads), self.best_loss, -self.best_dev))[0])

    def predict(self, inputs: Tensor) -> Tensor:
        """Class predictions of the chosen head, at its best epoch."""
        return self._logits(inputs, self.best_params)[:, self.chosen].argmax(-1)


def _inputs(layer, name: str, inputs: Mapping[str, Tensor], mask: Tensor | None = None):
    """What one set of heads reads from a batch: its layer (linear), or every layer it mixes."""
    if isinstance(layer, TorchHeads):
        return {n: inputs[n] if mask is None else inputs[n][mask] for n in layer.sources}
    x = inputs[layer.source or name]
    return x if mask is None else x[mask]


def train_heads(
    heads: Mapping[str, LayerHeads | TorchHeads],
    epochs: int,
    train_batches: Callable[[int], Iterable[Batch]],
    dev_batches: Callable[[], Iterable[Batch]],
    progress: bool = True,
    description: str = "probe",
) -> None:
    """Train every layer's heads on each train batch (read once), then score dev each epoch.

    A train batch is (labels, inputs) or (labels, inputs, masks): masks[f] marks the examples of
    the label fraction f, and heads of fraction f < 1 step on those rows of the batch only (none:
    no step), so every fraction shares the one pass over the data. `epochs` may be a mapping
    name -> epochs (heads stop training after theirs; the pass runs for the largest).
    """
    from tqdm import tqdm

    limit = {name: epochs.get(name, 0) if isinstance(epochs, Mapping) else epochs for name in heads}
    for epoch in tqdm(
        range(max(limit.values())), desc=description, unit="epoch", disable=not progress
    ):
        active = {name: layer for name, layer in heads.items() if epoch < limit[name]}
        for batch in train_batches(epoch):
            labels, inputs = batch[0], batch[1]
            masks = batch[2] if len(batch) > 2 else None
            for name, layer in active.items():
                fraction = getattr(layer, "fraction", 1.0)
                if fraction < 1.0:
                    mask = masks[fraction]
                    if not bool(mask.any()):
                        continue
                    layer.step(_inputs(layer, name, inputs, mask), labels[mask])
                else:
                    layer.step(_inputs(layer, name, inputs), labels)
        correct = {name: np.zeros(layer.heads, dtype=np.int64) for name, layer in active.items()}
        loss = {name: np.zeros(layer.heads) for name, layer in active.items()}
        total = 0
        for labels, inputs, *_ in dev_batches():
            total += len(labels)
            for name, layer in active.items():
                batch_correct, batch_loss = layer.score(_inputs(layer, name, inputs), labels)
                correct[name] += batch_correct
                loss[name] += batch_loss
        if total == 0:
            raise ProbeError("the dev split has no examples to select hyper-parameters on")
        for name, layer in active.items():
            layer.end_epoch(epoch, correct[name] / total, loss[name] / total)


def predict(
    heads: Mapping[str, LayerHeads], batches: Iterable[Batch]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(true labels, layer name -> predictions of its chosen head) over `batches`."""
    truth: list[np.ndarray] = []
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in heads}
    for labels, inputs, *_ in batches:
        truth.append(labels.cpu().numpy())
        for name, layer in heads.items():
            predictions[name].append(layer.predict(_inputs(layer, name, inputs)).cpu().numpy())
    concat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return concat(truth), {name: concat(parts) for name, parts in predictions.items()}


def layer_report(
    layer: LayerHeads,
    grid: Sequence[tuple[float, float]],
    truth: np.ndarray,
    predicted: np.ndarray,
    majority_class: int,
    class_names: Sequence[str],
) -> dict:
    """JSON-ready metrics of one layer's chosen head on the test split.

    macro_f1 averages over the classes present in the test labels or the predictions;
    majority_rate is the accuracy of always answering the train split's most frequent class;
    the confusion matrix has rows = true class, columns = predicted, over all classes.
    """
    chosen = layer.chosen
    learning_rate, weight_decay = grid[chosen]
    matrix = scores.confusion_matrix(truth, predicted, len(class_names))
    extra = {}
    if isinstance(layer, TorchHeads) and layer.kind == "weighted_sum":
        extra["layer_weights"] = layer.layer_weights()
    return {
        **extra,
        "accuracy": scores.accuracy(truth, predicted),
        "macro_f1": scores.macro_f1(truth, predicted),
        "majority_rate": float(np.mean(truth == majority_class)) if len(truth) else float("nan"),
        "dev_accuracy": float(layer.best_dev[chosen]),
        "dev_loss": float(layer.best_loss[chosen]),
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "best_epoch": int(layer.best_epoch[chosen]),
        "grid_dev_accuracy": [float(a) for a in layer.best_dev],
        "confusion": {"labels": list(class_names), "matrix": matrix.tolist()},
    }
