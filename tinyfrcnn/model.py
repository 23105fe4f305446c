"""Faster R-CNN: one backbone whose features feed both the RPN and the Fast R-CNN head.

Training (approximate joint training, the paper's section 3.2): the backbone runs once,
the RPN predicts objectness and box deltas for every anchor, its proposals (held
constant, no gradient through their coordinates) are sampled against the ground truth
and pooled by the head, and the four losses

    L = L_rpn_cls + L_rpn_reg + L_head_cls + L_head_box

send their gradients back into the shared features, where the two streams add up.

On the GPU (``FasterRCNN(config, rng, device="cuda")`` or ``model.to("cuda")``) the
dense layers run as CUDA kernels and the small, sort-and-sample work stays on the host;
the class docstring lists what crosses the bus in a training step.
"""

import json
import os
import secrets
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import anchors as anchors_mod
from .backbone import BACKBONE_STRIDE, make_backbone
from .boxes import _check_weights
from .checks import (as_box_array, as_float_array, cast_finite, check_boxes, check_finite, check_number,
                     check_positive_int, check_rng)
from .device import check_device, is_device_array, to_device, to_host
from .head import POOLINGS, FastRCNNHead, head_loss, postprocess_detections
from .layers import Module, add_
from .losses import _smooth_l1_beta
from .rpn import RPNHead, _proposals_batch, _rpn_loss_batch, generate_proposals_batch
from .targets import (HEAD_BOX_WEIGHTS, _anchor_targets_batch, _anchors_inside, _gather_proposals, _label_candidates,
                      _pick, _proposal_candidates, _sampled_labels, check_gt_boxes_batch, check_labels)

CHECKPOINT_FORMAT = "tinyfrcnn-checkpoint-1"


class NonFiniteLoss(FloatingPointError):
    """A loss term (or the network output it is computed from), or the whole loss
    (``term`` "loss"), became NaN or inf."""

    def __init__(self, term, value, detail="", step=None):
        self.term, self.value, self.detail, self.step = term, value, detail, step
        what = "the loss" if term == "loss" else f"loss term {term}"
        super().__init__((f"step {step}: " if step is not None else "") + f"{what} is {value}"
                         + (f" ({detail})" if detail else ""))


def _require_finite(array, term, where):
    if not np.isfinite(array).all():
        raise NonFiniteLoss(term, "nan" if np.isnan(array).any() else "inf", f"{where} are not finite")


@dataclass
class ModelConfig:
    """Everything that fixes the network's shape and its training targets.

    ``rpn_allowed_border``: anchors crossing the image border by more than this many
    pixels are ignored in RPN training, as in the paper (which uses 0); a negative value
    keeps them all, as torchvision does. On 128x128 images half of the anchors cross the
    border and many objects touch it, so all are kept by default.

    Anchors: the paper's 3 scales x 3 ratios suit VOC/COCO objects. Shapes boxes are
    nearly square (h/w within 0.92..1.09 for 98% of them; partly hidden shapes reach
    about 0.6..1.55) and 9 to 64 px wide, so chapter 04 measures that ratios 0.5 and 2
    add no coverage, while sizes a factor sqrt(2) apart (16 to 64) double the share of
    objects with an anchor at IoU >= 0.7 (70% against 35%).
    """

    num_classes: int = 3
    backbone_channels: tuple = (16, 32, 64, 64)
    anchor_sizes: tuple = (16, 23, 32, 45, 64)
    anchor_ratios: tuple = (1.0,)
    rpn_mid_channels: int = 64
    rpn_pos_iou: float = 0.7
    rpn_neg_iou: float = 0.3
    rpn_allowed_border: float = -1.0
    rpn_batch: int = 256
    rpn_pos_fraction: float = 0.5
    rpn_sigma: float = 3.0
    rpn_nms: float = 0.7
    rpn_min_size: float = 2.0
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 500
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 300
    roi_batch: int = 64
    fg_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: tuple = (0.0, 0.5)
    pool_size: int = 7
    pooling: str = "roi_align"
    head_hidden: int = 256
    head_sigma: float = 1.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.3
    max_detections: int = 100

    def __post_init__(self):
        self.check()

    def check(self):
        """Raise ValueError naming the first field out of range; returns self. Runs on
        construction and again when a model is built (fields may be set in between)."""
        where = "ModelConfig"
        for name in ("num_classes", "rpn_mid_channels", "rpn_batch", "rpn_pre_nms_train", "rpn_post_nms_train",
                     "rpn_pre_nms_test", "rpn_post_nms_test", "roi_batch", "pool_size", "head_hidden",
                     "max_detections"):
            check_positive_int(getattr(self, name), name, where)
        _sequence(self.backbone_channels, "backbone_channels", where, lambda v, n: check_positive_int(v, n, where))
        if len(self.backbone_channels) < 4:
            raise ValueError(f"{where}: backbone_channels needs at least 4 entries (three pools), "
                             f"got {self.backbone_channels!r}")
        positive = lambda v, n: check_number(v, n, low=0, low_open=True, where=where)  # noqa: E731
        _sequence(self.anchor_sizes, "anchor_sizes", where, positive)
        _sequence(self.anchor_ratios, "anchor_ratios", where, positive)
        check_number(self.rpn_pos_iou, "rpn_pos_iou", low=0, high=1, low_open=True, where=where)
        check_number(self.rpn_neg_iou, "rpn_neg_iou", low=0, high=self.rpn_pos_iou, where=where)
        check_number(self.rpn_allowed_border, "rpn_allowed_border", where=where)
        check_number(self.fg_iou, "fg_iou", low=0, high=1, low_open=True, where=where)
        _sequence(self.bg_iou, "bg_iou", where, lambda v, n: check_number(v, n, low=0, high=self.fg_iou, where=where))
        if len(self.bg_iou) != 2 or not self.bg_iou[0] < self.bg_iou[1]:
            raise ValueError(f"{where}: bg_iou must be a (low, high) pair with low < high, got {self.bg_iou!r}")
        for name in ("rpn_pos_fraction", "fg_fraction", "rpn_nms", "nms_thresh", "score_thresh"):
            check_number(getattr(self, name), name, low=0, high=1, where=where)
        for name in ("rpn_sigma", "head_sigma"):
            check_number(getattr(self, name), name, low=0, low_open=True, where=where)
        check_number(self.rpn_min_size, "rpn_min_size", low=0, where=where)
        if self.pooling not in POOLINGS:
            raise ValueError(f"{where}: pooling must be {' or '.join(map(repr, POOLINGS))}, got {self.pooling!r}")
        return self

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint config is not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"checkpoint config must be a JSON object, got {text[:80]!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"checkpoint config has unknown keys {sorted(unknown)}")
        for key, value in raw.items():
            if isinstance(value, list):
                raw[key] = tuple(value)
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"checkpoint config: {e}") from None


def _sequence(values, name, where, check_item):
    """A non-empty tuple or list, each item passing ``check_item(item, f"{name}[i]")``."""
    if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"{where}: {name} must be a non-empty tuple, got {values!r}")
    for i, v in enumerate(values):
        check_item(v, f"{name}[{i}]")


def _ground_truth(gt_boxes, gt_labels, n, num_classes, where):
    """Each image's boxes as (K_i, 4) float32 (their values unchecked: ``check_gt_boxes_batch``)
    and labels as (K_i,) int64 in 1..num_classes."""
    if len(gt_boxes) != n or len(gt_labels) != n:
        raise ValueError(f"{where}: got {n} images but {len(gt_boxes)} gt_boxes and {len(gt_labels)} gt_labels")
    boxes, labels = [], []
    for i, (b, l) in enumerate(zip(gt_boxes, gt_labels)):
        b = np.asarray(b, dtype=np.float32)
        boxes.append(as_box_array(b.reshape(0, 4) if b.shape == (0,) else b, f"gt_boxes[{i}]", where))  # (K, 4)
        l = np.asarray(l)
        l = check_labels(np.zeros(0, np.int64) if l.shape == (0,) else l, f"gt_labels[{i}]", where,
                         low=1, high=num_classes)
        if len(l) != len(boxes[-1]):
            raise ValueError(f"{where}: gt_labels[{i}] has {len(l)} labels but gt_boxes[{i}] has {len(boxes[-1])} boxes")
        labels.append(l.astype(np.int64))  # (K,)
    return boxes, labels


class FasterRCNN(Module):
    """Backbone + RPN + Fast R-CNN head sharing the backbone's features.

    ``device`` ("cpu" or "cuda") is where the parameters live; ``to(device)`` moves them
    and ``device`` reports it. Asking for "cuda" without a usable GPU raises
    RuntimeError (never a silent fallback to the CPU). Images, ground truth and results
    are NumPy arrays on either device. On "cuda" one training step does:

    1. up: the images, once (N*3*H*W floats, cast to the parameters' dtype);
    2. device: the backbone, the RPN head's convs and the permutation of its outputs
       to one row per anchor (``rpn.to_anchor_rows``, a small CUDA kernel, so that the
       copy down is one contiguous array in the layout the host code reads);
    3. down: the RPN's logits and deltas, N*A*6 floats (A anchors per image). Anchor
       labelling and sampling, the RPN loss, the proposal layer (decode, top-n, NMS) and
       RoI sampling stay on the host: they sort, sample and index a few thousand numbers
       per image, which a kernel launch per step would not speed up;
    4. up: the R sampled RoIs (R*5 floats; the RoI layer checks them on the host and
       uploads them, and keeps the checked copy for the backward); device: RoI pooling
       and the head's fc layers;
    5. down: the class logits and box deltas, R*5(K+1) floats; the head's loss runs on
       the host;
    6. up: the loss gradients, N*A*6 + R*5(K+1) floats; device: the whole backward, the
       two gradient streams added on the device, and SGD's update (``optim.SGD``).

    For the default network at batch 8 (the GPU benchmark's; ``TrainConfig`` trains
    with 4) on 128x128 images (stride 8 so A = 16*16*5 = 1280, R <= 8*64 = 512, K = 3),
    in float32: images 1,572,864 B up; RPN outputs 245,760 B down and their gradients
    245,760 B up; RoIs 10,240 B up; head outputs 40,960 B down and their gradients
    40,960 B up. In all 1,869,824 B up and 286,720 B down per step (about 1.9 MB and
    0.3 MB); no parameter or activation crosses. ``detect`` moves the
    same kinds of arrays, without gradients. Uploads are queued behind the kernels
    before them (``device.to_device``) and the host goes on; each download waits for
    the GPU to reach it, so steps 3 and 5 are where the host waits.
    """

    def __init__(self, config=None, rng=None, device="cpu"):
        check_device(device)
        if config is not None and not isinstance(config, ModelConfig):
            raise ValueError(f"FasterRCNN: config must be a ModelConfig, got {type(config).__name__}")
        self.config = config = (config or ModelConfig()).check()
        rng = rng if rng is not None else np.random.default_rng(0)
        self.stride = BACKBONE_STRIDE
        self.backbone = make_backbone(config.backbone_channels, rng=rng)
        feat_ch = config.backbone_channels[-1]
        self.base_anchors = self._base_anchors(config)  # (k, 4)
        self._anchor_grids = {}  # (feat_height, feat_width, ...) -> anchors, see anchors_for
        self.num_anchors = len(self.base_anchors)
        self.rpn = RPNHead(feat_ch, config.rpn_mid_channels, self.num_anchors, rng=rng)
        self.head = FastRCNNHead(
            feat_ch, config.num_classes, pool_size=config.pool_size, hidden=config.head_hidden,
            spatial_scale=1.0 / self.stride, pooling=config.pooling, rng=rng,
        )
        self._cache = None
        if device != "cpu":
            self.to(device)

    @property
    def device(self):
        """Where the parameters live: "cpu" or "cuda"."""
        return self.parameters()[0].device

    def to(self, device):
        """Move every parameter (data and grad) to "cpu" or "cuda"; returns self. Call it
        between training steps (a pending ``backward`` is forgotten)."""
        super().to(device)
        self._cache = None
        return self

    def _upload(self, images, where):
        """Validate host images (N, 3, H, W); on "cuda" copy them to the device in the
        parameters' dtype."""
        if is_device_array(images):
            raise ValueError(f"{where}: images must be a NumPy array (the model copies it to its device)")
        images = as_float_array(images, "images", ndim=4, where=where)
        check_finite(images, "images", where)
        first = self.backbone[0].weight  # the parameters' device and dtype, without collecting them all
        if first.device == "cuda":
            return to_device(np.ascontiguousarray(images, dtype=first.data.dtype))
        return images

    @staticmethod
    def _base_anchors(config):
        sizes = np.asarray(config.anchor_sizes, dtype=np.float64)
        return anchors_mod.base_anchors(base_size=1, scales=tuple(sizes), ratios=tuple(config.anchor_ratios))

    def named_parameters(self, prefix=""):
        return (self.backbone.named_parameters(f"{prefix}backbone.") + self.rpn.named_parameters(f"{prefix}rpn.")
                + self.head.named_parameters(f"{prefix}head."))

    def anchors_for(self, feat_height, feat_width):
        """All anchors over a feature grid: (feat_height * feat_width * k, 4), read-only:
        the last few grids are kept, since every batch of one image size has the same."""
        key = (feat_height, feat_width, self.stride, self.base_anchors.tobytes())
        grids = self._anchor_grids
        if key not in grids:
            if len(grids) >= 8:
                grids.clear()
            grids[key] = anchors_mod.grid_anchors(self.base_anchors, feat_height, feat_width, self.stride)
            grids[key].flags.writeable = False
        return grids[key]

    # ------------------------------------------------------------------ training
    def forward(self, images, gt_boxes, gt_labels, rng, train_rpn=True, train_head=True, proposals=None):
        """Run one training step's forward pass and its losses.

        images (N, 3, H, W); gt_boxes and gt_labels: one (K_i, 4) / (K_i,) array per image.
        Returns a dict of the four loss terms (floats) and their sum ``loss``; the
        gradients of the losses w.r.t. the network's outputs are kept for ``backward``.
        ``train_rpn`` / ``train_head`` switch either loss off (the 4-step schedule trains
        them apart); ``proposals`` (one (P_i, 4) array per image) replaces the model's
        own proposals for the head, as step 2 of that schedule needs.
        """
        where = "FasterRCNN.forward"
        cfg = self.config.check()  # its fields may have been set since: the targets below take them unchecked
        images = self._upload(images, where)
        gpu = is_device_array(images)
        n, _, height, width = images.shape
        if n == 0:
            raise ValueError(f"{where}: images holds no images; a training step needs at least one")
        boxes, gt_labels = _ground_truth(gt_boxes, gt_labels, n, cfg.num_classes, where)
        check_gt_boxes_batch(boxes, (height, width) if train_rpn else None, where)  # inside, for the anchor targets
        rng = check_rng(rng, where)
        feats = self.backbone.forward(images)  # (N, C, h, w)
        fh, fw = feats.shape[2:]
        anchors = self.anchors_for(fh, fw)  # (A, 4)
        rpn_out = self.rpn.forward(feats)  # on "cuda": queued on the GPU
        # Anchor labels and targets depend only on the boxes, so the host works them out
        # while the GPU runs the network; to_host below waits for the RPN's outputs. The
        # arguments were checked above, once for all images: the targets' unchecked cores.
        if train_rpn:
            border = None if cfg.rpn_allowed_border < 0 else cfg.rpn_allowed_border
            inside = _anchors_inside(anchors, (height, width), border, where)  # (A,)
            unit = _check_weights((1.0,) * 4, where, np.result_type(anchors.dtype, np.float32))
            anchor_labels, _, reg_targets = _anchor_targets_batch(  # (N, A), (N, A), (N, A, 4)
                anchors, boxes, cfg.rpn_pos_iou, cfg.rpn_neg_iou, inside, unit)
        logits, deltas = (to_host(a) for a in rpn_out)  # (N, A, 2), (N, A, 4)
        _require_finite(logits, "rpn_cls", "the RPN's objectness logits")
        _require_finite(deltas, "rpn_reg", "the RPN's box deltas")

        if train_head and proposals is None:
            proposals = [p for p, _ in _proposals_batch(  # arguments checked above: the unchecked core
                logits, deltas, anchors.astype(deltas.dtype, copy=False), height, width, cfg.rpn_pre_nms_train,
                cfg.rpn_post_nms_train, cfg.rpn_nms, cfg.rpn_min_size)]
        elif train_head:
            if len(proposals) != n:
                raise ValueError(f"{where}: got {n} images but {len(proposals)} proposals")
            proposals = [check_boxes(np.asarray(p, dtype=np.float32).reshape(-1, 4), f"proposals[{i}]", where)
                         for i, p in enumerate(proposals)]
        if train_head:
            weights = _check_weights(HEAD_BOX_WEIGHTS, where, np.result_type(*(p.dtype for p in proposals), np.float32))
        # The random draws image by image (the RPN's anchors, then the head's RoIs: the
        # order of the random stream); what needs no draw, once for the whole batch.
        if train_rpn:
            positive, negative = _label_candidates(anchor_labels)
        if train_head:
            candidates = _proposal_candidates(proposals, boxes, cfg.fg_iou, cfg.bg_iou[0], cfg.bg_iou[1])
        rpn_picks, roi_picks = [], []
        for i in range(n):
            if train_rpn:
                rpn_picks.append(_pick(positive[i], negative[i], cfg.rpn_batch, cfg.rpn_pos_fraction, rng))
            if train_head:
                roi_picks.append(_pick(candidates["fg"][i], candidates["bg"][i], cfg.roi_batch, cfg.fg_fraction, rng))
        if train_head:
            sample = _gather_proposals(candidates, roi_picks, gt_labels, weights)
            image = np.repeat(np.arange(n), sample["counts"]).astype(sample["rois"].dtype)  # (R,)
            rois = np.concatenate([image[:, None], sample["rois"]], axis=1).astype(feats.dtype)  # (R, 5)
            head_out = self.head.forward(feats, rois)  # on "cuda": the RoI layer uploads the RoIs; queued

        # The RPN's losses on the host, while the GPU runs the head.
        rpn_cls = rpn_reg = 0.0
        if train_rpn:
            reg_targets = cast_finite(reg_targets, deltas.dtype, "the RPN's regression targets", "deltas", where)
            sampled = _sampled_labels(anchor_labels.shape, rpn_picks)  # (N, A)
            out = _rpn_loss_batch(logits, deltas, sampled, reg_targets,  # each image its own mean
                                  _smooth_l1_beta(cfg.rpn_sigma, where), 1.0)
            for loss_cls, loss_reg in zip(out["loss_cls"], out["loss_reg"]):
                rpn_cls += loss_cls / n
                rpn_reg += loss_reg / n
            grad_logits, grad_deltas = out["grad_logits"] / n, out["grad_deltas"] / n
        else:
            grad_logits, grad_deltas = np.zeros_like(logits), np.zeros_like(deltas)

        head_cls = head_box = 0.0
        grad_cls = grad_box = None
        if train_head:
            cls_logits, box_deltas = (to_host(a) for a in head_out)  # (R, C+1), (R, 4(C+1))
            _require_finite(cls_logits, "head_cls", "the head's class logits")
            _require_finite(box_deltas, "head_box", "the head's box deltas")
            h = head_loss(cls_logits, box_deltas, sample["labels"], sample["box_targets"], sigma=cfg.head_sigma)
            head_cls, head_box = h["loss_cls"], h["loss_box"]
            grad_cls, grad_box = h["grad_cls"], h["grad_box"]
        self._cache = (grad_logits if train_rpn else None, grad_deltas, grad_cls, grad_box, gpu)
        losses = {
            "rpn_cls": float(rpn_cls), "rpn_reg": float(rpn_reg),
            "head_cls": float(head_cls), "head_box": float(head_box),
        }
        losses["loss"] = sum(losses.values())
        return losses

    def backward(self, train_backbone=True):
        """Back-propagate the losses of the last ``forward`` into every parameter's grad
        (the shared features receive the sum of the RPN's and the head's gradients).
        On "cuda" the loss gradients are uploaded and everything else stays there."""
        if self._cache is None:
            raise ValueError("FasterRCNN.backward: call forward first")
        grad_logits, grad_deltas, grad_cls, grad_box, gpu = self._cache
        self._cache = None
        # All uploads first, before any backward kernel: an upload that waits (a large one
        # goes direct, or a staging buffer still in use) then waits for no kernel.
        up = to_device if gpu else np.asarray
        head = None if grad_cls is None else (up(grad_cls), up(grad_box))
        rpn = None if grad_logits is None else (up(grad_logits), up(grad_deltas))
        streams = []
        if head is not None:
            streams.append(self.head.backward(*head))  # (N, C, h, w)
        if rpn is not None:
            streams.append(self.rpn.backward(*rpn))  # (N, C, h, w)
        if not train_backbone or not streams:
            return
        grad_feats = streams[0]
        for g in streams[1:]:
            add_(grad_feats, g)  # the two gradient streams meet in the shared features
        self.backbone.backward(grad_feats)

    # ----------------------------------------------------------------- inference
    def propose(self, images):
        """RPN proposals for each image at test settings: list of ((P, 4), (P,)) NumPy arrays."""
        images = self._upload(images, "FasterRCNN.propose")
        return self._propose(self.backbone.forward(images), images.shape[2], images.shape[3])[1]

    def _propose(self, feats, height, width):
        cfg = self.config
        anchors = self.anchors_for(*feats.shape[2:])
        logits, deltas = (to_host(a) for a in self.rpn.forward(feats))  # (N, A, 2), (N, A, 4)
        out = generate_proposals_batch(logits, deltas, anchors, (height, width), cfg.rpn_pre_nms_test,
                                       cfg.rpn_post_nms_test, nms_thresh=cfg.rpn_nms, min_size=cfg.rpn_min_size)
        return feats, out

    def detect(self, images):
        """Detections for a batch: a list with one dict per image, ``boxes`` (D, 4),
        ``scores`` (D,), ``labels`` (D,) int64 in 1..C (NumPy arrays, also on "cuda")."""
        cfg = self.config
        images = self._upload(images, "FasterRCNN.detect")
        n, _, height, width = images.shape
        if n == 0:
            return []
        feats, proposals = self._propose(self.backbone.forward(images), height, width)
        rois = np.concatenate(
            [np.concatenate([np.full((len(p), 1), i, dtype=np.float32), p.astype(np.float32)], axis=1)
             for i, (p, _) in enumerate(proposals)]).astype(feats.dtype)  # (R, 5)
        cls_logits, box_deltas = self.head.forward(feats, rois)
        cls_logits, box_deltas = to_host(cls_logits), to_host(box_deltas)  # (R, C+1), (R, 4(C+1))
        results = []
        for i in range(n):
            sel = rois[:, 0] == i
            results.append(postprocess_detections(
                rois[sel, 1:], cls_logits[sel], box_deltas[sel], (height, width),
                score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, max_detections=cfg.max_detections))
        return results

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self):
        """Parameter name -> NumPy array (a host copy when the model is on "cuda")."""
        return {name: to_host(p.data) for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        for name, p in self.named_parameters():
            if name not in state:
                raise ValueError(f"checkpoint lacks parameter {name!r}")
            value = np.asarray(state[name])
            if value.shape != p.data.shape:
                raise ValueError(
                    f"checkpoint parameter {name!r} has shape {value.shape}, the model expects {p.data.shape}")
            if value.dtype.kind not in "iuf":
                raise ValueError(f"checkpoint parameter {name!r} has dtype {value.dtype.name}, not a real number type")
            with np.errstate(over="ignore", invalid="ignore"):
                value = value.astype(p.data.dtype)
            if not np.isfinite(value).all():
                raise ValueError(f"checkpoint parameter {name!r} holds NaN or inf (in {value.dtype.name})")
            if is_device_array(p.data):
                p.data.copy_to_device(np.ascontiguousarray(value))
            else:
                p.data[...] = value

    def save(self, path, extra=None):
        """Write weights (host copies: a checkpoint from "cuda" loads on "cpu"),
        configuration and ``extra`` arrays to one ``.npz`` file, atomically: a temporary
        file in the same folder is renamed over ``path`` only once complete."""
        arrays = {f"param/{k}": v for k, v in self.state_dict().items()}
        arrays["format"] = np.array(CHECKPOINT_FORMAT)
        arrays["config"] = np.array(self.config.to_json())
        for k, v in (extra or {}).items():
            arrays[f"extra/{k}"] = np.asarray(v)
            if arrays[f"extra/{k}"].dtype.kind == "O":  # np.load(allow_pickle=False) could not read it back
                raise ValueError(f"FasterRCNN.save: extra[{k!r}] must be numbers or a string, got {type(v).__name__}")
        save_npz_atomically(path, arrays)

    @classmethod
    def load(cls, path, device="cpu"):
        """Rebuild a model from a checkpoint on ``device``; returns (model, extra arrays)."""
        check_device(device)
        arrays = read_checkpoint(path)
        model = cls(ModelConfig.from_json(str(arrays["config"])))
        model.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
        model.to(device)
        extra = {k[len("extra/"):]: v for k, v in arrays.items() if k.startswith("extra/")}
        return model, extra


def save_npz_atomically(path, arrays):
    """``np.savez`` to a new file beside ``path``, then renamed over it: a reader sees the
    old checkpoint or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _new_file(folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _new_file(folder):
    """(descriptor, path) of a file made in ``folder`` under a fresh name, with the mode
    ``open()`` gives a new file (0o666 less the process's umask, which the system applies)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}.npz")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 2**-64 a try
            continue


def read_checkpoint(path):
    """All arrays of a checkpoint file, after checking it is one."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"checkpoint path must be a string or path, got {type(path).__name__}")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder; give the .npz file in it "
                         f"(train writes {os.path.join(path, 'checkpoint.npz')!r})")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"{path!r} is not a tinyfrcnn checkpoint (cannot read it as .npz: {e})") from None
    if "format" not in arrays or str(arrays["format"]) != CHECKPOINT_FORMAT or "config" not in arrays:
        raise ValueError(f"{path!r} is not a tinyfrcnn checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return arrays
