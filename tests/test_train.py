"""Training: the loss goes down, runs repeat under a seed, resume continues exactly."""

import json
import os
import signal

import numpy as np
import pytest

from test_model import TINY
from tinyfrcnn.model import FasterRCNN
from tinyfrcnn.train import (AlternatingTrainer, NonFiniteLoss, Trainer, TrainConfig, resume_run, train,
                             train_alternating)


def tiny_train_config(**kw):
    base = dict(steps=6, batch_size=2, lr=0.01, warmup_steps=2, train_images=16, val_images=0,
                image_size=64, eval_every=0, checkpoint_every=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_same_seed_same_losses():
    a = Trainer(TINY, tiny_train_config())
    b = Trainer(TINY, tiny_train_config())
    for _ in range(3):
        la, lb = a.train_step(), b.train_step()
        assert la == lb
    c = Trainer(TINY, tiny_train_config(seed=4))
    assert c.train_step() != Trainer(TINY, tiny_train_config()).train_step()


def test_loss_goes_down_on_a_fixed_batch():
    t = Trainer(TINY, tiny_train_config(lr=0.05, train_images=2, batch_size=2, warmup_steps=0))
    first = t.train_step()["loss"]
    last = np.mean([t.train_step()["loss"] for _ in range(60)][-10:])
    assert last < 0.8 * first, (first, last)


def test_resume_gives_the_same_next_loss(tmp_path):
    full = Trainer(TINY, tiny_train_config(), out_dir=str(tmp_path / "a"))
    for _ in range(3):
        full.train_step()
    os.makedirs(tmp_path / "a", exist_ok=True)
    path = full.save()
    expected = [full.train_step() for _ in range(2)]
    resumed = Trainer.resume(path, out_dir=str(tmp_path / "b"))
    assert resumed.step == 3
    assert [resumed.train_step() for _ in range(2)] == expected


def test_train_writes_checkpoint_curve_and_metrics(tmp_path):
    out = str(tmp_path / "run")
    trainer = train(out, TINY, tiny_train_config(steps=4, val_images=4, eval_every=4), progress=False)
    for name in ("checkpoint.npz", "loss_curve.png", "metrics.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["steps"] == 4 and len(metrics["val"]) == 1
    assert 0.0 <= metrics["val"][0]["AP"] <= 1.0
    assert trainer.step == 4


def test_non_finite_loss_stops_with_a_message_naming_step_and_term(tmp_path):
    out = str(tmp_path / "run")
    t = train(out, TINY, tiny_train_config(steps=2, checkpoint_every=1), progress=False)
    good = open(t.checkpoint_path(), "rb").read()
    t.cfg.steps = 4
    head_forward = t.model.head.forward

    def diverged(features, rois):
        cls_logits, box_deltas = head_forward(features, rois)
        return cls_logits * np.float32(np.inf), box_deltas

    t.model.head.forward = diverged
    with pytest.raises(NonFiniteLoss, match=r"step 2: loss term head_cls is (nan|inf)"):
        t.train_step()
    assert open(t.checkpoint_path(), "rb").read() == good


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_weights_that_blow_up_stop_the_run_as_a_non_finite_loss(tmp_path):
    t = Trainer(TINY, tiny_train_config(steps=3), out_dir=str(tmp_path))
    t.train_step()
    t.model.head.fc6.weight.data[...] = 1e38  # what a far too large learning rate does: finite, but it overflows
    with pytest.raises(NonFiniteLoss, match=r"step 1: the loss is nan or inf \(ReLU: x holds NaN or inf .*a lower lr"):
        t.train_step()
    with pytest.raises(NonFiniteLoss, match="training stopped, no checkpoint was written"):
        t.fit(progress=False)


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", 0, "batch_size must be a positive integer"), ("batch_size", 2.0, "batch_size must be a positive"),
    ("steps", -1, "steps must be a positive integer"), ("seed", -1, "seed must be a non-negative integer"),
    ("seed", 1.5, "seed must be a non-negative"), ("eval_every", -1, "eval_every must be a non-negative"),
    ("checkpoint_every", -1, "checkpoint_every must be"), ("lr", 0.0, "lr must be > 0"),
    ("momentum", 1.0, "momentum must be < 1"), ("decay_at", (0.5, 1.5), r"decay_at\[1\] must be <= 1"),
    ("schedule", "sideways", "schedule must be 'joint' or 'alternating'"), ("device", "gpu", "device must be one of"),
])
def test_train_config_checks_its_fields(field, value, match):
    with pytest.raises(ValueError, match=f"TrainConfig: {match}"):
        TrainConfig(**{field: value})
    cfg = TrainConfig()
    setattr(cfg, field, value)  # set after construction: caught when the run starts
    with pytest.raises(ValueError, match=f"TrainConfig: {match}"):
        Trainer(TINY, cfg)


def test_evaluate_model_checks_batch_size():
    from tinyfrcnn.shapes import shapes_split
    from tinyfrcnn.train import evaluate_model

    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="evaluate_model: batch_size must be a positive integer"):
            evaluate_model(FasterRCNN(TINY), shapes_split("test", 2, image_size=64), batch_size=bad)


def test_resume_refuses_other_configs_and_damaged_states(tmp_path):
    from dataclasses import replace

    cfg = tiny_train_config(steps=2)
    path = train(str(tmp_path / "run"), TINY, cfg, progress=False).checkpoint_path()
    with pytest.raises(ValueError, match="train: model_config differs from the config of the run"):
        train(str(tmp_path / "run"), replace(TINY, num_classes=7), resume=path, progress=False)
    with pytest.raises(ValueError, match="train: train_config differs from the run"):
        train(str(tmp_path / "run"), train_config=replace(cfg, lr=0.5), resume=path, progress=False)
    again = train(str(tmp_path / "run"), TINY, replace(cfg, steps=3), resume=path, steps=3, progress=False)
    assert again.step == 3  # the run's own configs (and a new length) are fine
    model, extra = FasterRCNN.load(path)
    state = json.loads(str(extra["train_state"]))
    for damage, match in [(lambda s: s.pop("rng"), "damaged training state \\(missing rng\\)"),
                          (lambda s: s.update(order=[0, 99]), "data order leaves the 16 training images"),
                          (lambda s: s["train_config"].update(colour="red"), "train_config is damaged"),
                          (lambda s: s["train_config"].update(lr=-1), "TrainConfig: lr must be > 0")]:
        broken = json.loads(json.dumps(state))
        damage(broken)
        bad = str(tmp_path / "bad.npz")
        model.save(bad, extra={**extra, "train_state": json.dumps(broken)})
        with pytest.raises(ValueError, match=match):
            resume_run(bad)


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="schedule"):
        Trainer(TINY, tiny_train_config(schedule="sideways"))


def _parameters(model):
    return [p.data.copy() for p in model.parameters()]


def test_ctrl_c_stops_after_the_step_and_resuming_repeats_the_run(tmp_path, monkeypatch):
    config = tiny_train_config(steps=6, val_images=4, eval_every=3)
    full = train(str(tmp_path / "full"), TINY, config, progress=False)

    forward, calls = FasterRCNN.forward, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C in the middle of step 3's forward pass
            signal.raise_signal(signal.SIGINT)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FasterRCNN, "forward", interrupted)
    out = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        train(out, TINY, config, progress=False, log=lambda *a: None)
    monkeypatch.setattr(FasterRCNN, "forward", forward)
    saved = Trainer.resume(os.path.join(out, "checkpoint.npz"))
    assert saved.step == 3 and len(saved.history["loss"]) == 3 and len(saved.evals) == 1

    resumed = train(out, resume=os.path.join(out, "checkpoint.npz"), progress=False)
    assert resumed.history == full.history
    assert resumed.evals == full.evals
    for a, b in zip(_parameters(resumed.model), _parameters(full.model)):
        np.testing.assert_array_equal(a, b)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_checkpoint_holds_the_validation_of_its_own_step(tmp_path, monkeypatch):
    save, seen = Trainer.save, []

    def recording(self, path=None):
        seen.append((self.step, [e["step"] for e in self.evals]))
        return save(self, path)

    monkeypatch.setattr(Trainer, "save", recording)
    train(str(tmp_path / "run"), TINY, tiny_train_config(steps=4, val_images=4, eval_every=2, checkpoint_every=2),
          progress=False)
    assert seen[0] == (2, [2]) and seen[1] == (4, [2, 4])


def test_resume_with_a_new_step_count(tmp_path):
    out = str(tmp_path / "run")
    train(out, TINY, tiny_train_config(steps=2), progress=False)
    path = os.path.join(out, "checkpoint.npz")
    with pytest.raises(ValueError, match="at step 2 already"):
        Trainer.resume(path, steps=1)
    with pytest.raises(ValueError, match="resume: steps must be a positive integer, got 0"):
        Trainer.resume(path, steps=0)
    longer = train(out, resume=path, steps=4, progress=False)
    assert longer.step == 4 and len(longer.history["loss"]) == 4 and longer.cfg.steps == 4
    again = train(out, resume=path, progress=False, log=lambda *a: None)
    assert again.step == 4 and len(again.history["loss"]) == 4


def test_a_resumed_run_keeps_the_decays_it_has_reached(tmp_path):
    trainer = Trainer(TINY, tiny_train_config(steps=10, decay_at=(0.5, 0.8), warmup_steps=0), out_dir=str(tmp_path))
    trainer.step = 6
    path = trainer.save()
    lr = trainer.cfg.lr
    longer = Trainer.resume(path, steps=20)
    assert longer.cfg.milestones == (5, 16)
    assert [longer.lr_at(k) for k in (4, 5, 15, 16)] == pytest.approx([lr, lr * 0.1, lr * 0.1, lr * 0.01])
    assert Trainer.resume(path, steps=6).cfg.milestones == (5, 6)
    assert Trainer.resume(path).cfg.milestones == (5, 8)
    trainer.step = 3
    assert Trainer.resume(trainer.save(), steps=20).cfg.milestones == (10, 16)


def test_batch_larger_than_the_training_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size \(4\) is larger than the training split"):
        Trainer(TINY, tiny_train_config(batch_size=4, train_images=3))
    with pytest.raises(ValueError, match="larger than the training split"):
        train_alternating(str(tmp_path), TINY, tiny_train_config(batch_size=4, train_images=3), progress=False)


def test_alternating_training_runs_exactly_the_steps_asked_for(tmp_path):
    with pytest.raises(ValueError, match="at least 4"):
        train_alternating(str(tmp_path / "a"), TINY, tiny_train_config(steps=3), progress=False)
    trainer = train_alternating(str(tmp_path / "b"), TINY, tiny_train_config(steps=5), progress=False)
    assert trainer.step == 5 and len(trainer.history["loss"]) == 5
    assert json.load(open(tmp_path / "b" / "metrics.json"))["steps"] == 5


@pytest.fixture(scope="module")
def alternating_run(tmp_path_factory):
    """An uninterrupted 4-step run of 10 steps: stages of 3, 3, 2 and 2."""
    return train_alternating(str(tmp_path_factory.mktemp("full")), TINY, tiny_train_config(steps=10), progress=False)


# Stopped inside stage 1, at the start of stage 2 (fresh momentum), inside stage 2 (step 1's
# network still in the checkpoint), at the start of stage 3 (its RPN handed over), inside 4.
@pytest.mark.parametrize("stop_after", [2, 3, 5, 6, 9])
def test_ctrl_c_in_the_4_step_schedule_saves_and_resuming_repeats_the_run(tmp_path, monkeypatch, alternating_run,
                                                                         stop_after):
    forward, calls = FasterRCNN.forward, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop_after:  # one forward per step, in every stage
            signal.raise_signal(signal.SIGINT)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FasterRCNN, "forward", interrupted)
    out, logged = str(tmp_path / "stopped"), []
    with pytest.raises(KeyboardInterrupt):
        train_alternating(out, TINY, tiny_train_config(steps=10), progress=False, log=logged.append)
    monkeypatch.setattr(FasterRCNN, "forward", forward)
    assert f"stopped after step {stop_after} (stage" in logged[-1]
    path = os.path.join(out, "checkpoint.npz")
    saved = resume_run(path)
    assert isinstance(saved, AlternatingTrainer) and saved.step == stop_after
    assert (saved.rpn_net is None) == (stop_after >= 6)

    resumed = train(out, resume=path, progress=False)
    assert resumed.history == alternating_run.history
    for a, b in zip(_parameters(resumed.model), _parameters(alternating_run.model)):
        np.testing.assert_array_equal(a, b)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_4_step_checkpoint_resumes_only_as_such(tmp_path, alternating_run):
    path = alternating_run.checkpoint_path()
    with pytest.raises(ValueError, match="divides 10 steps into its stages"):
        resume_run(path, steps=12)
    with pytest.raises(ValueError, match="run of the alternating schedule; resume it with tinyfrcnn.train.resume_run"):
        Trainer.resume(path)
    joint = Trainer(TINY, tiny_train_config(steps=10), out_dir=str(tmp_path)).save()
    with pytest.raises(ValueError, match="run of the joint schedule; resume it with tinyfrcnn.train.resume_run"):
        AlternatingTrainer.resume(joint)
    logged = []
    done = resume_run(path, out_dir=str(tmp_path)).fit(progress=False, log=logged.append)
    assert done.step == 10 and "complete" in logged[-1]
    assert isinstance(resume_run(Trainer(TINY, tiny_train_config(), out_dir=str(tmp_path)).save()), Trainer)
