"""The trainer's CUDA policy (read the loss on the host every ``sync_every`` steps; Pyro's checks
on the first step of an epoch only), exercised on CPU through ``Trainer(sync_every=...)``: it must
give the same parameters as the every-step policy, and still catch and roll back a non-finite
loss."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_STEPS, NaNAt, Record, adam_steps, finite, tiny_config

import pyrovae
from pyrovae.train import CUDA_SYNC_EVERY, Trainer


def make_trainer(sync_every: int | None, callbacks=(), **train) -> Trainer:
    """A Trainer on the tiny digits data (with its validation split), built as `fit` builds it:
    the global torch seed set just before, so build and train one trainer at a time (the z
    draws come from the global stream)."""
    cfg = pyrovae.load_config(tiny_config(train=train))
    data = pyrovae.load_data(cfg.data, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # what fit's pyro.set_rng_seed does for the torch stream
    model = pyrovae.build_model(cfg, data.shape)
    return Trainer(
        model, cfg.train, data.x_train, data.x_val, callbacks=callbacks, progress=False,
        sync_every=sync_every,
    )  # fmt: skip


def test_cpu_reads_every_step_and_cuda_policy_is_deferred():
    assert make_trainer(None).sync_every == 1  # on the CPU a read is free
    assert make_trainer(7).sync_every == 7
    assert CUDA_SYNC_EVERY > 1


@pytest.mark.parametrize("objective", ["trace_elbo", "mean_field", "iwae"])
def test_deferred_reads_give_the_same_parameters(objective):
    """Same seed, same data: reading the loss every 3 steps changes when losses are read, not
    the updates, so the parameters and Adam's moments are bit-identical; the logged ELBO (the
    same per-step losses summed in another order) agrees to float32 rounding."""
    k = 2 if objective == "iwae" else 1
    eager = make_trainer(1, objective=objective, num_particles=k, epochs=3)
    assert eager.train()
    lazy = make_trainer(3, objective=objective, num_particles=k, epochs=3)
    assert lazy.train()
    for a, b in zip(eager.model.parameters(), lazy.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for sa, sb in zip(eager.opt.state.values(), lazy.opt.state.values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["step"], sb["step"])
    for ra, rb in zip(eager.history, lazy.history, strict=True):
        assert rb["train_elbo"] == pytest.approx(ra["train_elbo"], rel=1e-5)
        assert rb["val_elbo"] == ra["val_elbo"]  # validation does not depend on the policy
    assert len(lazy.history) == 3


def test_deferred_reads_still_roll_back_a_nonfinite_loss():
    """A NaN loss at step 2 is applied (no read before the update: the parameters go NaN) and
    seen at the read after step 3: the epoch is rolled back to its start, the learning rate
    lowered, and the retried epoch is exactly the clean run's first epoch at the lower rate."""

    class Watch(Record):  # after the NaN update, before the read: are the parameters NaN?
        def on_step_end(self, trainer, loss):
            super().on_step_end(trainer, loss)
            if len(self.steps) == 2:
                self.went_nan = not all(finite(p) for p in trainer.model.parameters())

    record = Watch()
    lazy = make_trainer(3, callbacks=[NaNAt(2), record])
    assert lazy.train()
    assert record.went_nan  # the update really was applied without a read
    assert lazy.retries == 1 and lazy.lr == pytest.approx(5e-4)
    assert [h["lr"] for h in lazy.history] == pytest.approx([5e-4, 5e-4])
    # steps 1-3 of the first try, then the epoch again from step 1
    assert [(e, s) for e, s, _ in record.steps[:5]] == [(0, 1), (0, 2), (0, 3), (0, 1), (0, 2)]
    assert all(finite(p) for p in lazy.model.parameters())
    assert adam_steps(lazy.opt) == [2.0 * TINY_STEPS] * len(lazy.opt.state)  # bad steps undone
    # the same result as a run that starts at the lower rate from the same state
    clean = make_trainer(1, lr=5e-4)
    assert clean.train()
    for a, b in zip(clean.model.parameters(), lazy.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_deferred_reads_give_up_on_a_loss_that_stays_nonfinite():
    trainer = make_trainer(3, callbacks=[NaNAt(None, float("inf"))], max_retries=2)
    with pytest.raises(pyrovae.TrainingError, match=r"non-finite.*after 2 retries"):
        trainer.train()
    assert trainer.retries == 3 and trainer.history == []
