"""The probe heads that are small torch modules trained by autograd: the MLP head and the
weighted sum of layers (`TorchHeads`), beside the linear heads of `mockingjay.probe_heads`, whose
interface they share and whose training loop (`probe_heads.train_heads`) drives them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mockingjay.probe_config import MLPSettings, ProbeError


class TorchHeads:
    """G heads of one kind trained by autograd, one per (learning rate, weight decay) of the grid,
    with the interface of LayerHeads (step, score, end_epoch, chosen, predict).

    kind "mlp": a one-hidden-layer classifier on one layer (`sources` = [name]).
    kind "weighted_sum": a learnable softmax weighting of the standardised states of every layer
    in `sources` (the paper's LARGE-WS, SUPERB's default) feeding one linear classifier; the
    chosen head's layer weights are reported. Weights start equal, so the first steps see the
    average of the layers.
    Inputs are standardised per layer with the train statistics, as for the linear heads. The
    weight decay is an L2 term on every parameter (Adam's coupled weight_decay), as the linear
    heads' `weight_decay / 2 * ||W||^2`.
    """

    def __init__(
        self,
        kind: str,
        sources: Sequence[str],
        moments: Mapping[str, tuple[np.ndarray, np.ndarray]],
        num_classes: int,
        grid: Sequence[tuple[float, float]],
        device: torch.device,
        mlp: MLPSettings = MLPSettings(),
        seed: int = 0,
    ):
        from torch import nn

        self.kind, self.sources, self.classes, self.heads = (
            kind,
            list(sources),
            num_classes,
            len(grid),
        )
        self.shift = {
            n: torch.as_tensor(-moments[n][0] / moments[n][1], dtype=torch.float32, device=device)
            for n in self.sources
        }
        self.inv_std = {
            n: torch.as_tensor(1.0 / moments[n][1], dtype=torch.float32, device=device)
            for n in self.sources
        }
        dim = len(moments[self.sources[0]][0])
        if any(len(moments[n][0]) != dim for n in self.sources):
            raise ProbeError(
                f"{kind}: layers {self.sources} differ in width; a weighted sum needs one width"
            )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the init is a function of the seed, not of what ran before
        self.modules = []
        for _ in grid:
            if kind == "mlp":
                module = nn.Sequential(
                    nn.Linear(dim, mlp.hidden_size),
                    nn.ReLU(),
                    nn.Dropout(mlp.dropout),
                    nn.Linear(mlp.hidden_size, num_classes),
                )
            else:
                module = nn.ModuleDict(
                    {
                        "weights": nn.ParameterDict(
                            {"logits": nn.Parameter(torch.zeros(len(self.sources)))}
                        ),
                        "linear": nn.Linear(dim, num_classes),
                    }
                )
            self.modules.append(module.to(device))
        torch.random.set_rng_state(generator_state)
        self.optimizers = [
            torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd)
            for m, (lr, wd) in zip(self.modules, grid)
        ]
        self.best_states = [self._state(m) for m in self.modules]
        self.best_dev = np.full(self.heads, -1.0)
        self.best_loss = np.full(self.heads, np.inf)
        self.best_epoch = np.zeros(self.heads, dtype=int)

    @staticmethod
    def _state(module) -> dict:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def take(self, inputs: Mapping[str, Tensor]) -> list[Tensor]:
        return [torch.addcmul(self.shift[n], inputs[n], self.inv_std[n]) for n in self.sources]

    def _forward(self, module, standardised: list[Tensor]) -> Tensor:
        if self.kind == "mlp":
            return module(standardised[0])
        weights = torch.softmax(module["weights"]["logits"], 0)
        mixed = torch.einsum("l,lbh->bh", weights, torch.stack(standardised))
        return module["linear"](mixed)

    def step(self, inputs: Mapping[str, Tensor], labels: Tensor) -> None:
        standardised = self.take(inputs)
        for module, optimizer in zip(self.modules, self.optimizers):
            module.train()
            loss = torch.nn.functional.cross_entropy(self._forward(module, standardised), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def score(self, inputs: Mapping[str, Tensor], labels: Tensor) -> tuple[np.ndarray, np.ndarray]:
        standardised = self.take(inputs)
        correct, loss = np.zeros(self.heads, dtype=np.int64), np.zeros(self.heads)
        for g, module in enumerate(self.modules):
            module.eval()
            logits = self._forward(module, standardised)
            correct[g] = int((logits.argmax(-1) == labels).sum())
            loss[g] = float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return correct, loss

    def end_epoch(self, epoch: int, dev_accuracy: np.ndarray, dev_loss: np.ndarray) -> None:
        improved = (dev_accuracy > self.best_dev) | (
            (dev_accuracy == self.best_dev) & (dev_loss < self.best_loss)
        )
        for g in np.flatnonzero(improved):
            self.best_states[g] = self._state(self.modules[g])
            self.best_dev[g], self.best_loss[g], self.best_epoch[g] = (
                dev_accuracy[g],
                dev_loss[g],
                epoch,
            )

    @property
    def chosen(self) -> int:
        return int(np.lexsort((np.arange(self.heads), self.best_loss, -self.best_dev))[0])

    @torch.no_grad()
    def predict(self, inputs: Mapping[str, Tensor]) -> Tensor:
        module = self.modules[self.chosen]
        current = self._state(module)
        module.load_state_dict(self.best_states[self.chosen])
        module.eval()
        predictions = self._forward(module, self.take(inputs)).argmax(-1)
        module.load_state_dict(current)
        return predictions

    def layer_weights(self) -> dict[str, float] | None:
        """The chosen weighted-sum head's softmax layer weights at its best epoch (None for mlp)."""
        if self.kind != "weighted_sum":
            return None
        weights = torch.softmax(self.best_states[self.chosen]["weights.logits"], 0).cpu().numpy()
        return {name: round(float(w), 6) for name, w in zip(self.sources, weights)}
