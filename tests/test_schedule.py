import io

import pytest
import torch

from mockingjay.schedule import lr_at, lr_multiplier, warmup_linear_decay, warmup_steps_for


def test_warmup_peaks_at_seven_percent_and_decays_to_zero():
    total, peak = 1000, 4e-4
    rates = [lr_at(step, peak, total) for step in range(total + 1)]
    assert warmup_steps_for(total) == 70
    assert rates[0] == 0.0
    assert max(rates) == pytest.approx(peak)
    assert rates.index(max(rates)) == 70
    assert all(a < b for a, b in zip(rates[:70], rates[1:71]))  # strictly rising warm-up
    assert all(a > b for a, b in zip(rates[70:total], rates[71:]))  # strictly falling decay
    assert rates[total] == 0.0
    assert rates[35] == pytest.approx(peak / 2)  # linear
    assert rates[535] == pytest.approx(peak / 2)  # halfway through the decay


def test_no_warmup_starts_at_peak():
    assert lr_multiplier(0, 10, warmup_proportion=0.0) == 1.0
    assert lr_multiplier(5, 10, warmup_proportion=0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("total, proportion", [(0, 0.07), (-5, 0.07), (100, 1.0), (100, -0.1)])
def test_invalid_schedule_raises(total, proportion):
    with pytest.raises(ValueError):
        lr_multiplier(0, total, proportion)


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_lambda_lr_follows_lr_at_and_resumes_from_state_dict():
    total, peak = 50, 1e-3
    optimizer = _optimizer(peak)
    scheduler = warmup_linear_decay(optimizer, total)
    seen = []
    for step in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        if step == 19:
            buffer = io.BytesIO()
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer
            )
    assert seen == pytest.approx([lr_at(s, peak, total) for s in range(total)])

    # A fresh optimizer/scheduler restored from the step-20 state continues identically.
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed_optimizer = _optimizer(peak)
    resumed = warmup_linear_decay(resumed_optimizer, total)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    continued = []
    for _ in range(20, total):
        continued.append(resumed_optimizer.param_groups[0]["lr"])
        resumed_optimizer.step()
        resumed.step()
    assert continued == pytest.approx(seen[20:])
