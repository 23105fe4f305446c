"""Training loops: approximate joint training (the default) and the paper's 4-step
alternating training, with SGD + momentum, warm-up and step decay.

A run is a pure function of its seed: the same seed draws the same images in the same
order, samples the same anchors and proposals and so gives the same losses. A
checkpoint stores the weights, the momentum buffers, the step, the random generator's
state and the loss history, so ``resume`` continues exactly where the run stopped.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from .device import check_device, is_device_array
from .evaluate import coco_ap
from .model import FasterRCNN, ModelConfig, NonFiniteLoss
from .optim import SGD, warmup_step_lr
from .shapes import shapes_split

LOSS_TERMS = ("rpn_cls", "rpn_reg", "head_cls", "head_box")


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, data and bookkeeping.

    ``device``: "cpu", or "cuda" to keep the model and SGD's update on the GPU (see
    ``FasterRCNN``); checkpoints hold host copies either way.
    """

    steps: int = 2000
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    decay_at: tuple = (0.7, 0.9)
    gamma: float = 0.1
    seed: int = 0
    train_images: int = 4000
    val_images: int = 100
    image_size: int = 128
    eval_every: int = 500
    checkpoint_every: int = 250
    schedule: str = "joint"
    device: str = "cpu"

    @property
    def milestones(self):
        return tuple(int(round(f * self.steps)) for f in self.decay_at)


def evaluate_model(model, dataset, batch_size=16, progress=None):
    """COCO-style AP of ``model`` on every image of ``dataset`` (see evaluate.coco_ap)."""
    detections, truths = [], []
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        images, boxes, labels = dataset.batch(idx)
        detections += model.detect(images)
        truths += [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]
        if progress is not None:
            progress.update(len(idx))
    return coco_ap(detections, truths), detections, truths


def _check_batch_size(cfg, where):
    if cfg.batch_size > cfg.train_images:
        raise ValueError(f"{where}: batch_size ({cfg.batch_size}) is larger than the training split "
                         f"(train_images = {cfg.train_images})")


class _StopAfterStep:
    """While active, Ctrl-C (SIGINT) only asks the training loop to stop after the step in
    progress, so the checkpoint written then lies on a step boundary and resuming repeats
    the uninterrupted run exactly. A second Ctrl-C interrupts at once, without saving.
    Signal handlers belong to the main thread; elsewhere Ctrl-C keeps its usual meaning."""

    def __enter__(self):
        self.requested = False
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once, without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
        return False


def _rng_state_json(rng):
    return json.dumps(rng.bit_generator.state)


def _rng_from_json(text):
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(text)
    return rng


class Trainer:
    """One training run: model, optimiser, data, generator and history."""

    def __init__(self, model_config=None, train_config=None, out_dir=None):
        self.cfg = train_config or TrainConfig()
        if self.cfg.schedule not in ("joint",):
            raise ValueError(f"Trainer: schedule must be 'joint' (use train_alternating for 4-step), got {self.cfg.schedule!r}")
        check_device(self.cfg.device)
        _check_batch_size(self.cfg, "Trainer")
        self.rng = np.random.default_rng(self.cfg.seed)
        self.model = FasterRCNN(model_config or ModelConfig(), rng=np.random.default_rng(self.cfg.seed),
                                device=self.cfg.device)
        self.optim = SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                         weight_decay=self.cfg.weight_decay)
        self.data = shapes_split("train", self.cfg.train_images, image_size=self.cfg.image_size)
        self.out_dir = out_dir
        self.step = 0
        self.history = {k: [] for k in LOSS_TERMS + ("loss", "lr")}
        self.evals = []
        self._order = np.zeros(0, dtype=np.int64)

    # -- data order: a fresh permutation of the training split per epoch
    def _next_indices(self):
        b = self.cfg.batch_size
        if len(self._order) < b:
            self._order = np.concatenate([self._order, self.rng.permutation(len(self.data))])
        idx, self._order = self._order[:b], self._order[b:]
        return idx

    def lr_at(self, step):
        c = self.cfg
        return warmup_step_lr(step, c.lr, c.milestones, gamma=c.gamma, warmup_steps=c.warmup_steps)

    def train_step(self):
        """One SGD step on one batch; returns the loss terms."""
        idx = self._next_indices()
        images, boxes, labels = self.data.batch(idx)
        self.optim.lr = self.lr_at(self.step)
        self.optim.zero_grad()
        try:
            losses = self.model.forward(images, boxes, labels, rng=self.rng)
            for term in LOSS_TERMS:
                if not math.isfinite(losses[term]):
                    raise NonFiniteLoss(term, losses[term])
        except NonFiniteLoss as e:
            raise NonFiniteLoss(e.term, e.value, e.detail, step=self.step) from None
        self.model.backward()
        self.optim.step()
        for k in LOSS_TERMS + ("loss",):
            self.history[k].append(losses[k])
        self.history["lr"].append(self.optim.lr)
        self.step += 1
        return losses

    # -- checkpoints
    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.npz")

    def save(self, path=None):
        path = path or self.checkpoint_path()
        names = [n for n, _ in self.model.named_parameters()]
        extra = {f"momentum/{n}": b for n, b in zip(names, self.optim.state_dict()["buffers"]) if b is not None}
        extra["train_state"] = json.dumps({
            "step": self.step, "rng": _rng_state_json(self.rng), "order": self._order.tolist(),
            "history": self.history, "evals": self.evals, "train_config": asdict(self.cfg),
        })
        self.model.save(path, extra=extra)
        return path

    @classmethod
    def resume(cls, path, out_dir=None, steps=None, device=None):
        """Continue a run from its checkpoint (optionally with a new total step count, or
        on another ``device``: None keeps the run's)."""
        model, extra = FasterRCNN.load(path)
        if "train_state" not in extra:
            raise ValueError(f"{path!r} holds weights only, not a training state to resume")
        state = json.loads(str(extra["train_state"]))
        tc = dict(state["train_config"])
        for key, value in tc.items():
            if isinstance(value, list):
                tc[key] = tuple(value)
        if steps is not None:
            if steps < state["step"]:
                raise ValueError(f"resume: the run in {path!r} is at step {state['step']} already; steps must be "
                                 f"at least that, got {steps}")
            tc["steps"] = steps
        if device is not None:
            tc["device"] = check_device(device)
        self = cls(model.config, TrainConfig(**tc), out_dir=out_dir or os.path.dirname(os.path.abspath(path)))
        self.model = model.to(self.cfg.device)
        self.optim = SGD(model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                         weight_decay=self.cfg.weight_decay)
        names = [n for n, _ in model.named_parameters()]
        self.optim.load_state_dict({"lr": self.cfg.lr, "momentum": self.cfg.momentum,
                                    "weight_decay": self.cfg.weight_decay,
                                    "buffers": [extra.get(f"momentum/{n}") for n in names]})
        self.step = state["step"]
        self.rng = _rng_from_json(state["rng"])
        self._order = np.asarray(state["order"], dtype=np.int64)
        self.history = state["history"]
        self.evals = state["evals"]
        return self

    def fit(self, progress=True, log=print):
        """Train up to ``cfg.steps``, validating and saving as the config says, then write
        loss_curve.png and metrics.json into ``out_dir``; returns self.

        Ctrl-C stops after the step in progress and saves a checkpoint from which
        ``resume`` continues exactly as if there had been no interruption (then
        KeyboardInterrupt is raised); a second Ctrl-C stops at once and saves nothing.
        """
        from tqdm.auto import tqdm

        os.makedirs(self.out_dir, exist_ok=True)
        cfg = self.cfg
        val = shapes_split("val", cfg.val_images, image_size=cfg.image_size) if cfg.val_images else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="train", unit="step")
        started = time.perf_counter()
        images_seen = 0
        try:
            with _StopAfterStep() as stop:
                while self.step < cfg.steps and not stop.requested:
                    self.train_step()
                    images_seen += cfg.batch_size
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == cfg.steps:
                        recent = {k: np.mean(self.history[k][-20:]) for k in LOSS_TERMS}
                        bar.set_postfix({k: f"{v:.3f}" for k, v in recent.items()}, refresh=False)
                    if val is not None and cfg.eval_every and (self.step % cfg.eval_every == 0
                                                               or self.step == cfg.steps):
                        ap = evaluate_model(self.model, val)[0]
                        self.evals.append({"step": self.step, "AP": ap["AP"], "AP50": ap["AP50"]})
                        bar.write(f"step {self.step}: val AP {ap['AP']:.3f}  AP50 {ap['AP50']:.3f}")
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
        except NonFiniteLoss as e:
            bar.close()
            detail = "; ".join(filter(None, [e.detail, f"training stopped, the last good checkpoint is "
                                                       f"{self.checkpoint_path()}"]))
            raise NonFiniteLoss(e.term, e.value, detail, step=e.step) from None
        except KeyboardInterrupt:
            bar.close()
            log(f"interrupted after step {self.step}, nothing saved; the last checkpoint (if any) is "
                f"{self.checkpoint_path()}")
            raise
        bar.close()
        if stop.requested and self.step < cfg.steps:
            path = self.save()
            log(f"stopped after step {self.step}: checkpoint saved to {path} (continue with --resume {path})")
            raise KeyboardInterrupt
        if not images_seen:
            log(f"the run is complete at step {self.step}; nothing to train (resume with more steps to go on)")
            return self
        elapsed = time.perf_counter() - started
        self.save()
        write_run_report(self, elapsed, images_seen)
        return self


def train(out_dir, model_config=None, train_config=None, resume=None, progress=True, log=print, steps=None):
    """Train (or resume) a detector, writing into ``out_dir``: checkpoint.npz,
    loss_curve.png and metrics.json. Returns the Trainer. On resume, ``steps`` sets a new
    total step count (None: the run's own) and ``train_config`` only chooses the device
    (None: the run's own). See ``Trainer.fit`` for Ctrl-C."""
    if resume:
        trainer = Trainer.resume(resume, out_dir=out_dir, steps=steps,
                                 device=train_config.device if train_config else None)
    else:
        trainer = Trainer(model_config, train_config, out_dir)
    return trainer.fit(progress=progress, log=log)


def write_run_report(trainer, elapsed, images_seen):
    """loss_curve.png and metrics.json beside the checkpoint."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .viz import plot_curves

    fig, ax = plt.subplots(figsize=(7, 4))
    plot_curves(ax, {k: trainer.history[k] for k in LOSS_TERMS + ("loss",)}, smooth=25)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("Faster R-CNN training losses")
    fig.tight_layout()
    fig.savefig(os.path.join(trainer.out_dir, "loss_curve.png"), dpi=100)
    plt.close(fig)
    metrics = {
        "steps": trainer.step,
        "seconds": elapsed,
        "images_per_second": images_seen / elapsed if elapsed > 0 else None,
        "final_losses": {k: float(np.mean(trainer.history[k][-50:])) for k in LOSS_TERMS + ("loss",)},
        "val": trainer.evals,
        "train_config": asdict(trainer.cfg),
        "model_config": json.loads(trainer.model.config.to_json()),
    }
    with open(os.path.join(trainer.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)


def train_alternating(out_dir, model_config=None, train_config=None, progress=True, log=print):
    """The paper's 4-step alternating training (section 3.2), each step a quarter of
    ``train_config.steps`` (at least 4; a remainder adds one step to each of the first):

    1. train backbone + RPN;
    2. train a second, freshly initialised backbone + the head on step 1's proposals;
    3. keep step 2's backbone fixed, and fine-tune the RPN (from step 1) on it;
    4. keep the backbone fixed, and fine-tune the head on step 3's proposals.

    The two networks then share step 2's backbone. (The paper starts both backbones
    from ImageNet weights; here both start from random ones.) No validation runs
    during the stages (``eval_every`` is not used), and there is no resuming.
    """
    from tqdm.auto import tqdm

    cfg = train_config or TrainConfig()
    mc = model_config or ModelConfig()
    check_device(cfg.device)
    _check_batch_size(cfg, "train_alternating")
    if cfg.steps < 4:
        raise ValueError(f"train_alternating: steps must be at least 4, one per stage, got {cfg.steps}")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    data = shapes_split("train", cfg.train_images, image_size=cfg.image_size)
    rpn_net = FasterRCNN(mc, rng=np.random.default_rng(cfg.seed), device=cfg.device)
    det_net = FasterRCNN(mc, rng=np.random.default_rng(cfg.seed + 1), device=cfg.device)
    stage_steps = [cfg.steps // 4 + (i < cfg.steps % 4) for i in range(4)]
    started = time.perf_counter()
    history = {k: [] for k in LOSS_TERMS + ("loss", "lr")}

    def stage(number, name, model, params, train_rpn, train_head, train_backbone, proposer=None):
        steps, label = stage_steps[number - 1], f"{number}/4 {name}"
        optim = SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        milestones = tuple(int(round(f * steps)) for f in cfg.decay_at)
        bar = tqdm(total=steps, disable=not progress, desc=label, unit="step")
        for step in range(steps):
            idx = rng.choice(len(data), size=cfg.batch_size, replace=False)
            images, boxes, labels = data.batch(idx)
            optim.lr = warmup_step_lr(step, cfg.lr, milestones, gamma=cfg.gamma, warmup_steps=cfg.warmup_steps)
            optim.zero_grad()
            props = [p for p, _ in proposer.propose(images)] if proposer is not None else None
            losses = model.forward(images, boxes, labels, rng=rng, train_rpn=train_rpn, train_head=train_head,
                                   proposals=props)
            for term in LOSS_TERMS:
                if not math.isfinite(losses[term]):
                    raise NonFiniteLoss(term, losses[term], label, step=step)
            model.backward(train_backbone=train_backbone)
            optim.step()
            for k in LOSS_TERMS + ("loss",):
                history[k].append(losses[k])
            history["lr"].append(optim.lr)
            bar.update(1)
        bar.close()

    stage(1, "backbone+RPN", rpn_net, rpn_net.backbone.parameters() + rpn_net.rpn.parameters(),
          True, False, True)
    stage(2, "backbone+head", det_net, det_net.backbone.parameters() + det_net.head.parameters(),
          False, True, True, proposer=rpn_net)
    for mine, theirs in zip(det_net.rpn.parameters(), rpn_net.rpn.parameters()):
        if is_device_array(mine.data):
            mine.data.copy_to_device(theirs.data)
        else:
            mine.data[...] = theirs.data
    stage(3, "RPN on fixed backbone", det_net, det_net.rpn.parameters(), True, False, False)
    stage(4, "head on fixed backbone", det_net, det_net.head.parameters(), False, True, False)

    trainer = Trainer(mc, cfg, out_dir)
    trainer.model, trainer.history, trainer.step = det_net, history, cfg.steps
    trainer.optim = SGD(det_net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    trainer.save()
    write_run_report(trainer, time.perf_counter() - started, cfg.steps * cfg.batch_size)
    return trainer
