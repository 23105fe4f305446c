"""Training loops: approximate joint training (the default) and the paper's 4-step
alternating training, with SGD + momentum, warm-up and step decay.

On one CPU a run is a pure function of its seed: the same seed draws the same images in
the same order, samples the same anchors and proposals and so gives the same losses (on
another CPU model OpenBLAS may pick other matrix-multiply kernels, which round some sums
differently; ``OPENBLAS_CORETYPE`` pins them). A checkpoint stores the weights, the
momentum buffers, the step, the random generator's state and the loss history, so
``resume_run`` continues exactly where the run stopped, in either schedule. On CUDA the
RoI backward adds with atomics in no fixed order, so the last bits of a gradient, and
from there a run, can differ from one run to the next.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np

from .checks import NonFiniteValues, check_non_negative_int, check_number, check_positive_int
from .device import DEVICES, check_device, is_device_array
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

    def __post_init__(self):
        self.check()

    def check(self):
        """Raise ValueError naming the first field out of range; returns self. Runs on
        construction and again when a run starts (fields may be set in between). Whether
        a "cuda" device is usable is checked when the run starts."""
        where = "TrainConfig"
        for name in ("steps", "batch_size", "train_images", "image_size"):
            check_positive_int(getattr(self, name), name, where)
        for name in ("warmup_steps", "seed", "val_images", "eval_every", "checkpoint_every"):
            check_non_negative_int(getattr(self, name), name, where)
        check_number(self.lr, "lr", low=0, low_open=True, where=where)
        check_number(self.momentum, "momentum", low=0, high=1, high_open=True, where=where)
        check_number(self.weight_decay, "weight_decay", low=0, where=where)
        check_number(self.gamma, "gamma", low=0, low_open=True, where=where)
        if not isinstance(self.decay_at, (tuple, list)):
            raise ValueError(f"{where}: decay_at must be a tuple of fractions of the run, got {self.decay_at!r}")
        for i, f in enumerate(self.decay_at):
            check_number(f, f"decay_at[{i}]", low=0, high=1, where=where)
        if self.schedule not in ("joint", "alternating"):
            raise ValueError(f"{where}: schedule must be 'joint' or 'alternating', got {self.schedule!r}")
        if self.device not in DEVICES:
            raise ValueError(f"{where}: device must be one of {DEVICES}, got {self.device!r}")
        return self

    @property
    def milestones(self):
        return tuple(int(round(f * self.steps)) for f in self.decay_at)


def evaluate_model(model, dataset, batch_size=16, progress=None):
    """COCO-style AP of ``model`` on every image of ``dataset`` (see evaluate.coco_ap)."""
    batch_size = check_positive_int(batch_size, "batch_size", "evaluate_model")
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


def _training_state(path):
    """(model, extra arrays, training state) of a checkpoint written by a trainer."""
    model, extra = FasterRCNN.load(path)
    if "train_state" not in extra:
        raise ValueError(f"{path!r} holds weights only, not a training state to resume")
    damaged = f"{path!r} has a damaged training state"
    try:
        state = json.loads(str(extra["train_state"]))
        joint = state["train_config"].get("schedule") != "alternating"
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError):
        raise ValueError(f"{damaged} (no readable train_config)") from None
    missing = [k for k in ("step", "rng", "history") + (("order", "evals") if joint else ()) if k not in state]
    if missing:
        raise ValueError(f"{damaged} (missing {', '.join(missing)})")
    return model, extra, state


def _train_config_from_json(values):
    """TrainConfig from its saved dict (JSON turned its tuples into lists)."""
    try:
        return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, AttributeError) as e:  # unknown keys, or not a dict
        raise ValueError(f"the checkpoint's train_config is damaged ({e})") from None


class _Run:
    """What both schedules share: the loss history, the checkpoint's place and the
    training loop with its Ctrl-C handling. A subclass gives ``train_step`` (which calls
    ``_record``), ``save`` and, if it wants them, its own progress bars and position."""

    schedule = "joint"  # the TrainConfig.schedule it runs
    validates = True  # evaluate on the validation split every ``eval_every`` steps
    complete_hint = ""

    @classmethod
    def _saved_config(cls, path, state):
        """The TrainConfig of the run saved in ``path``, which must be of this schedule."""
        try:
            cfg = _train_config_from_json(state["train_config"])
        except ValueError as e:
            raise ValueError(f"{path!r}: {e}") from None
        if cfg.schedule != cls.schedule:
            raise ValueError(f"{path!r} holds a run of the {cfg.schedule} schedule; resume it with "
                             "tinyfrcnn.train.resume_run")
        return cfg

    def checkpoint_path(self):
        return os.path.join(self.out_dir, "checkpoint.npz")

    def _record(self, losses):
        """Append a finished step's losses and learning rate to the history; count it."""
        for k in LOSS_TERMS + ("loss",):
            self.history[k].append(losses[k])
        self.history["lr"].append(self.optim.lr)
        self.step += 1

    def _progress_bar(self, bar, progress):
        """The bar for the next step: one for the whole run."""
        from tqdm.auto import tqdm

        return bar or tqdm(total=self.cfg.steps, initial=self.step, disable=not progress, desc="train", unit="step")

    def _position(self):
        """Where the run stands, for the message on stopping (beyond the step)."""
        return ""

    def fit(self, progress=True, log=print):
        """Train up to ``cfg.steps``, validating and saving as the config says, then write
        loss_curve.png and metrics.json into ``out_dir``; returns self.

        Ctrl-C stops after the step in progress and saves a checkpoint from which
        ``resume_run`` continues exactly as if there had been no interruption (then
        KeyboardInterrupt is raised); a second Ctrl-C stops at once and saves nothing.
        """
        os.makedirs(self.out_dir, exist_ok=True)
        cfg = self.cfg
        validate = self.validates and cfg.val_images and cfg.eval_every
        val = shapes_split("val", cfg.val_images, image_size=cfg.image_size) if validate else None
        bar = None
        started = time.perf_counter()
        images_seen = 0
        try:
            with _StopAfterStep() as stop:
                while self.step < cfg.steps and not stop.requested:
                    bar = self._progress_bar(bar, progress)
                    self.train_step()
                    images_seen += cfg.batch_size
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == cfg.steps:
                        recent = {k: np.mean(self.history[k][-20:]) for k in LOSS_TERMS}
                        bar.set_postfix({k: f"{v:.3f}" for k, v in recent.items()}, refresh=False)
                    if val is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                        ap = evaluate_model(self.model, val)[0]
                        self.evals.append({"step": self.step, "AP": ap["AP"], "AP50": ap["AP50"]})
                        bar.write(f"step {self.step}: val AP {ap['AP']:.3f}  AP50 {ap['AP50']:.3f}")
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save()
        except NonFiniteLoss as e:
            bar.close()
            saved = (f"the last good checkpoint is {self.checkpoint_path()}" if os.path.exists(self.checkpoint_path())
                     else "no checkpoint was written")
            detail = "; ".join(filter(None, [e.detail, f"training stopped, {saved}"]))
            raise NonFiniteLoss(e.term, e.value, detail, step=e.step) from None
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            log(f"interrupted after step {self.step}, nothing saved; the last checkpoint (if any) is "
                f"{self.checkpoint_path()}")
            raise
        if bar is not None:
            bar.close()
        if stop.requested and self.step < cfg.steps:
            path = self.save()
            log(f"stopped after step {self.step}{self._position()}: checkpoint saved to {path} "
                f"(continue with --resume {path})")
            raise KeyboardInterrupt
        if not images_seen:
            log(f"the run is complete at step {self.step}; nothing to train{self.complete_hint}")
            return self
        elapsed = time.perf_counter() - started
        self.save()
        write_run_report(self, elapsed, images_seen)
        return self


class Trainer(_Run):
    """One training run: model, optimiser, data, generator and history."""

    complete_hint = " (resume with more steps to go on)"

    def __init__(self, model_config=None, train_config=None, out_dir=None):
        self.cfg = (train_config or TrainConfig()).check()
        if self.cfg.schedule != self.schedule:
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
            with _divergence_is_non_finite_loss(self.step):
                losses = self.model.forward(images, boxes, labels, rng=self.rng)
            for term in LOSS_TERMS:
                if not math.isfinite(losses[term]):
                    raise NonFiniteLoss(term, losses[term])
        except NonFiniteLoss as e:
            raise NonFiniteLoss(e.term, e.value, e.detail, step=self.step) from None
        self.model.backward()
        self.optim.step()
        self._record(losses)
        return losses

    # -- checkpoints
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
        on another ``device``: None keeps the run's).

        With a new ``steps``, the learning-rate decays the run has reached stay where they
        were and those still ahead move to their fractions (``decay_at``) of the new
        length, so a finished run that is extended goes on at its last, decayed rate.
        """
        return cls._from_checkpoint(path, *_training_state(path), out_dir, steps, device)

    @classmethod
    def _from_checkpoint(cls, path, model, extra, state, out_dir, steps, device):
        cfg = cls._saved_config(path, state)
        if steps is not None:
            steps = check_positive_int(steps, "steps", "resume")
            if steps < state["step"]:
                raise ValueError(f"resume: the run in {path!r} is at step {state['step']} already; steps must be "
                                 f"at least that, got {steps}")
            cfg = _with_steps(cfg, steps, state["step"])
        if device is not None:
            cfg = replace(cfg, device=check_device(device))
        self = cls(model.config, cfg, out_dir=out_dir or os.path.dirname(os.path.abspath(path)))
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
        if self._order.size and (self._order.min() < 0 or self._order.max() >= len(self.data)):
            raise ValueError(f"{path!r} has a damaged training state (its data order leaves the "
                             f"{len(self.data)} training images)")
        self.history = state["history"]
        self.evals = state["evals"]
        return self


@contextmanager
def _divergence_is_non_finite_loss(step):
    """Around the forward pass of a training batch, whose images are finite: a layer
    that refuses NaN or inf means the weights or activations have blown up (the last
    update diverged), which is raised as NonFiniteLoss."""
    try:
        yield
    except NonFiniteValues as e:
        raise NonFiniteLoss("loss", "nan or inf", f"{e}: the weights or activations overflowed after the "
                            "last update; a lower lr may help", step=step) from None


def _with_steps(cfg, steps, step):
    """``cfg`` stretched to ``steps`` at ``step``: milestones <= step stay, later ones
    scale (but come no earlier than ``step``)."""
    milestones, last = [], 0
    for old, fraction in zip(cfg.milestones, cfg.decay_at):
        last = max(last, old if old <= step else max(int(round(fraction * steps)), step))
        milestones.append(last)
    return replace(cfg, steps=steps, decay_at=tuple(m / steps for m in milestones))


def train(out_dir, model_config=None, train_config=None, resume=None, progress=True, log=print, steps=None):
    """Train (or resume) a detector, writing into ``out_dir``: checkpoint.npz,
    loss_curve.png and metrics.json. Returns the Trainer (an AlternatingTrainer when it
    resumes a 4-step run). On resume, ``steps`` sets a new total step count (None: the
    run's own) and ``train_config`` only chooses the device (None: the run's own). See
    ``Trainer.fit`` for Ctrl-C."""
    if resume:
        trainer = resume_run(resume, out_dir=out_dir, steps=steps,
                             device=train_config.device if train_config else None)
        if model_config is not None and model_config != trainer.model.config:
            raise ValueError(f"train: model_config differs from the config of the run in {resume!r}; "
                             "a resumed run keeps its own (pass None)")
        free = ("device", "steps", "decay_at")  # decay_at moves with a new length
        if train_config is not None and ({k: v for k, v in asdict(train_config).items() if k not in free}
                                         != {k: v for k, v in asdict(trainer.cfg).items() if k not in free}):
            raise ValueError(f"train: train_config differs from the run in {resume!r} in more than its device; "
                             "a resumed run keeps its own settings (use steps= for a new length)")
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


class Stage(NamedTuple):
    """One stage of the 4-step schedule: which network it trains ("rpn_net": step 1's, or
    "model": the detector), which of its parts (``groups``, each "backbone", "rpn" or
    "head") the optimiser updates, which losses it uses, whether gradients reach the
    backbone, and whether the head's proposals come from step 1's network."""

    name: str
    network: str
    groups: tuple
    train_rpn: bool
    train_head: bool
    train_backbone: bool
    proposals_from_rpn_net: bool = False


STAGES = (
    Stage("backbone+RPN", "rpn_net", ("backbone", "rpn"), True, False, True),
    Stage("backbone+head", "model", ("backbone", "head"), False, True, True, proposals_from_rpn_net=True),
    Stage("RPN on fixed backbone", "model", ("rpn",), True, False, False),
    Stage("head on fixed backbone", "model", ("head",), False, True, False),
)


class AlternatingTrainer(_Run):
    """The paper's 4-step alternating training (section 3.2), each stage a quarter of
    ``train_config.steps`` (at least 4; a remainder adds one step to each of the first):

    1. train backbone + RPN (``rpn_net``);
    2. train a second, freshly initialised backbone + the head (``model``) on step 1's
       proposals;
    3. put step 1's RPN on step 2's backbone (``model``), keep the backbone fixed and
       fine-tune the RPN;
    4. keep the backbone fixed, and fine-tune the head on step 3's proposals.

    The two networks then share step 2's backbone. (The paper starts both backbones from
    ImageNet weights; here both start from random ones.) Each stage has its own SGD, with
    warm-up and step decay over the stage's steps. No validation runs during the stages
    (``eval_every`` is not used). Checkpoints and Ctrl-C work as in ``Trainer``: a
    checkpoint also holds step 1's network until stage 3 begins, and the momentum of the
    stage in progress, so ``resume`` repeats the uninterrupted run exactly.
    """

    schedule = "alternating"
    validates = False

    def __init__(self, model_config=None, train_config=None, out_dir=None):
        cfg = replace(train_config or TrainConfig(), schedule=self.schedule)  # replace runs check()
        mc = model_config or ModelConfig()
        check_device(cfg.device)
        _check_batch_size(cfg, "train_alternating")
        if cfg.steps < 4:
            raise ValueError(f"train_alternating: steps must be at least 4, one per stage, got {cfg.steps}")
        self.cfg, self.out_dir = cfg, out_dir
        self.rng = np.random.default_rng(cfg.seed)
        self.data = shapes_split("train", cfg.train_images, image_size=cfg.image_size)
        self.rpn_net = FasterRCNN(mc, rng=np.random.default_rng(cfg.seed), device=cfg.device)
        self.model = FasterRCNN(mc, rng=np.random.default_rng(cfg.seed + 1), device=cfg.device)
        self.stage_steps = [cfg.steps // 4 + (i < cfg.steps % 4) for i in range(4)]
        self.step = 0
        self.optim = None
        self.history = {k: [] for k in LOSS_TERMS + ("loss", "lr")}
        self.evals = []

    def stage_at(self, step):
        """(stage index 0..3, step within that stage) of overall ``step`` < cfg.steps."""
        within = step
        for index, steps in enumerate(self.stage_steps):
            if within < steps:
                return index, within
            within -= steps
        raise ValueError(f"step {step} is past the run's {self.cfg.steps} steps")

    def _stage_parameters(self, stage):
        net = getattr(self, stage.network)
        return [p for group in stage.groups for p in getattr(net, group).parameters()]

    def _new_optimizer(self, stage):
        return SGD(self._stage_parameters(stage), lr=self.cfg.lr, momentum=self.cfg.momentum,
                   weight_decay=self.cfg.weight_decay)

    def train_step(self):
        """One SGD step of the stage in progress; returns the loss terms."""
        cfg = self.cfg
        index, k = self.stage_at(self.step)
        stage = STAGES[index]
        if k == 0:
            self.optim = self._new_optimizer(stage)
        net = getattr(self, stage.network)
        steps = self.stage_steps[index]
        milestones = tuple(int(round(f * steps)) for f in cfg.decay_at)
        idx = self.rng.choice(len(self.data), size=cfg.batch_size, replace=False)
        images, boxes, labels = self.data.batch(idx)
        self.optim.lr = warmup_step_lr(k, cfg.lr, milestones, gamma=cfg.gamma, warmup_steps=cfg.warmup_steps)
        self.optim.zero_grad()
        with _divergence_is_non_finite_loss(self.step):
            props = [p for p, _ in self.rpn_net.propose(images)] if stage.proposals_from_rpn_net else None
            losses = net.forward(images, boxes, labels, rng=self.rng, train_rpn=stage.train_rpn,
                                 train_head=stage.train_head, proposals=props)
        for term in LOSS_TERMS:
            if not math.isfinite(losses[term]):
                raise NonFiniteLoss(term, losses[term], f"{index + 1}/4 {stage.name}", step=self.step)
        net.backward(train_backbone=stage.train_backbone)
        self.optim.step()
        self._record(losses)
        if self.step == sum(self.stage_steps[:2]):  # stages 1 and 2 done: the detector gets step 1's RPN
            for mine, theirs in zip(self.model.rpn.parameters(), self.rpn_net.rpn.parameters()):
                if is_device_array(mine.data):
                    mine.data.copy_to_device(theirs.data)
                else:
                    mine.data[...] = theirs.data
            self.rpn_net = None
        return losses

    def _progress_bar(self, bar, progress):
        """A bar per stage."""
        from tqdm.auto import tqdm

        index, k = self.stage_at(self.step)
        if bar is not None and k > 0:
            return bar
        if bar is not None:
            bar.close()
        return tqdm(total=self.stage_steps[index], initial=k, disable=not progress,
                    desc=f"{index + 1}/4 {STAGES[index].name}", unit="step")

    def _position(self):
        index, k = self.stage_at(self.step)
        return f" (stage {index + 1}/4 has {k} of its {self.stage_steps[index]} steps done)"

    # -- checkpoints
    def _in_stage(self):
        """Whether the run stands inside a stage (not at a boundary), so its momentum counts."""
        return self.step < self.cfg.steps and self.stage_at(self.step)[1] > 0

    def save(self, path=None):
        """The detector's weights, plus step 1's network while stages 1 and 2 run, the
        stage's momentum buffers, the generator and the history."""
        path = path or self.checkpoint_path()
        extra = {}
        if self.rpn_net is not None:
            extra.update({f"rpn_net/{n}": v for n, v in self.rpn_net.state_dict().items()
                          if not n.startswith("head.")})
        if self._in_stage():
            extra.update({f"momentum/{i}": b for i, b in enumerate(self.optim.state_dict()["buffers"])
                          if b is not None})
        extra["train_state"] = json.dumps({
            "step": self.step, "rng": _rng_state_json(self.rng), "history": self.history,
            "train_config": asdict(self.cfg),
        })
        self.model.save(path, extra=extra)
        return path

    @classmethod
    def resume(cls, path, out_dir=None, steps=None, device=None):
        """Continue a 4-step run from its checkpoint (on another ``device`` if given). The
        stages' lengths are fixed when the run starts, so ``steps`` may only repeat them."""
        return cls._from_checkpoint(path, *_training_state(path), out_dir, steps, device)

    @classmethod
    def _from_checkpoint(cls, path, model, extra, state, out_dir, steps, device):
        cfg = cls._saved_config(path, state)
        if steps is not None and steps != cfg.steps:
            raise ValueError(f"resume: the 4-step run in {path!r} divides {cfg.steps} steps into its stages; "
                             f"it cannot be resumed with steps={steps}")
        if device is not None:
            cfg = replace(cfg, device=check_device(device))
        self = cls(model.config, cfg, out_dir=out_dir or os.path.dirname(os.path.abspath(path)))
        self.step = state["step"]
        self.model = model.to(cfg.device)
        if self.step < sum(self.stage_steps[:2]):
            weights = self.rpn_net.state_dict()  # its head is never used, nor saved
            weights.update({k[len("rpn_net/"):]: v for k, v in extra.items() if k.startswith("rpn_net/")})
            self.rpn_net.load_state_dict(weights)
        else:
            self.rpn_net = None
        if self._in_stage():
            self.optim = self._new_optimizer(STAGES[self.stage_at(self.step)[0]])
            buffers = [extra.get(f"momentum/{i}") for i in range(len(self.optim.params))]
            self.optim.load_state_dict({"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                                        "buffers": buffers})
        self.rng = _rng_from_json(state["rng"])
        self.history = state["history"]
        return self


def train_alternating(out_dir, model_config=None, train_config=None, progress=True, log=print):
    """Run the 4-step schedule (see ``AlternatingTrainer``) into ``out_dir``; returns the
    AlternatingTrainer, whose ``model`` is the detector."""
    return AlternatingTrainer(model_config, train_config, out_dir).fit(progress=progress, log=log)


def resume_run(path, out_dir=None, steps=None, device=None):
    """The Trainer or AlternatingTrainer (by the run's schedule) that continues the run
    saved in ``path``; ``steps`` and ``device`` as in their ``resume``."""
    model, extra, state = _training_state(path)
    kind = AlternatingTrainer if state["train_config"].get("schedule") == "alternating" else Trainer
    return kind._from_checkpoint(path, model, extra, state, out_dir, steps, device)
