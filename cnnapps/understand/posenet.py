"""Position-information probe after Islam, Jia & Bruce (ICLR 2020), "How much position information do CNNs encode?",
on CPU-sized backbones trained here: a frozen backbone's multi-scale features, one conv layer (PosENet) reading out
gradient-like position maps, Spearman correlation and MAE on natural, all-black and all-white images."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from cnnapps.backbones import Backbone
from cnnapps.backbones.resnet import BasicBlock
from cnnapps.backbones.vgg import VGG, VGG_CONFIGS
from cnnapps.understand.equivariance import WithPadding
from cnnapps.understand.receptive import stage_outputs

log = logging.getLogger(__name__)

TARGETS = ("H", "V", "G", "HS", "VS")
MODELS = ("posenet", "vgg16", "resnet18", "vgg16_nopad")
MODEL_NAMES = {"posenet": "PosENet (raw image)", "vgg16": "VGG-16", "resnet18": "ResNet-18",
               "vgg16_nopad": "VGG-16 without zero padding"}
# Islam et al. 2020, table 1 (H target, PASCAL-S, 3x3 PosENet on all five stages; ImageNet VGG-16 and
# ResNet-152) and table 4 (VGG-16 without padding): (SPC, MAE). Shown beside ours, never used in a computation.
PAPER_H = {"posenet": (0.012, 0.251), "vgg16": (0.742, 0.149), "resnet18": (0.933, 0.084),
           "vgg16_nopad": (0.381, 0.223)}
PAPER_NOTE = "paper: 224x224 inputs, ImageNet-trained VGG-16 and ResNet-152, trained on DUT-S, tested on PASCAL-S"


@dataclass
class ProbeConfig:
    """Sizes and schedules of the probe (defaults: the CPU-sized run of the report; ``quick()`` for tests).

    Backbones: VGG-16 (configuration D) and a ResNet-18 layout with every width divided by ``width_div``, trained
    from scratch on the CIFAR-10 subset at ``train_size`` pixels for ``train_epochs`` (AdamW, one-cycle learning
    rate peaking at ``lr``, weight decay 5e-4, random flips and 4-pixel reflect-padded crops).
    Probe: VOC-mini images resized to ``image_size`` squares; every stage map resized bilinearly to
    ``map_size`` squares and concatenated; targets of ``map_size``; read-outs trained ``readout_epochs`` with
    Adam on MSE, as the paper (on channel-whitened features, see ``PosENet``). ``train_epochs=0`` leaves the
    backbones as initialised (``quick``: a test of the machinery, not a trained result)."""

    image_size: int = 64
    map_size: int = 16
    width_div: int = 8
    train_size: int = 32
    train_epochs: int = 5
    train_limit: int = 0  # 0: the whole CIFAR-10 training subset (10,000 images)
    batch_size: int = 128
    lr: float = 0.002
    voc_train: int = 1000
    voc_test: int = 500
    readout_epochs: int = 8
    readout_lr: float = 0.02
    readout_batch: int = 50
    kernels: tuple[int, ...] = (1, 3, 7)
    seed: int = 0

    @classmethod
    def quick(cls) -> ProbeConfig:
        """Seconds, not minutes: for tests (numbers from it are a smoke signal, not a result)."""
        return cls(image_size=32, map_size=8, width_div=16, train_size=32, train_epochs=0, voc_train=96,
                   voc_test=24, readout_epochs=8, readout_lr=0.02, readout_batch=16, kernels=(3,))

    def key(self, model: str) -> str:
        """Cache key of a trained backbone: everything that shapes its weights."""
        fields = (model, self.width_div, self.train_size, self.train_epochs, self.train_limit, self.batch_size,
                  self.lr, self.seed, "adamw-v2")
        return hashlib.sha256(repr(fields).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- targets


def position_map(kind: str, size: int) -> torch.Tensor:
    """Ground-truth position map (size, size) in [0, 1].

    H: horizontal gradient, 0 at the left edge to 1 at the right; V: vertical, 0 at the top to 1 at the bottom;
    G: a Gaussian centred in the map, sigma = size / 4, peak 1; HS / VS: horizontal / vertical stripes, the V / H
    gradient repeated four times across the map (our reading of the paper's stripe patterns: its exact stripe
    count is not given in the text we follow)."""
    r = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(r, r, indexing="ij")
    if kind == "H":
        return x / (size - 1)
    if kind == "V":
        return y / (size - 1)
    if kind == "G":
        c, s = (size - 1) / 2, size / 4
        return torch.exp(-((x - c) ** 2 + (y - c) ** 2) / (2 * s * s))
    if kind in ("HS", "VS"):
        t = y if kind == "HS" else x
        period = size / 4
        return torch.remainder(t, period) / max(period - 1, 1)
    raise ValueError(f"unknown position map {kind!r}; choose one of {', '.join(TARGETS)}")


# ---------------------------------------------------------------- backbones


class ResNet18Layout(Backbone):
    """A ResNet-18 (basic blocks 2-2-2-2, the zoo's ``BasicBlock``) with base width ``width`` instead of 64;
    (B, 3, H, W) -> stage maps at strides 2, 4, 8, 16, 32 with width, width, 2, 4 and 8 times width channels.
    The zoo's ``resnet18`` has no width option; this keeps its layout and padding at a CPU-sized width."""

    def __init__(self, width: int = 8, in_chans: int = 3) -> None:
        super().__init__(dim=2)
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i, mult in enumerate((1, 2, 4, 8)):
            planes, stride = width * mult, 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            self.add_module(f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride, down),
                                                           BasicBlock(planes, planes)))
            inplanes = planes
        self._set_stages([(("conv1", "bn1", "relu"), width, 2), (("maxpool", "layer1"), width, 4),
                          (("layer2",), 2 * width, 8), (("layer3",), 4 * width, 16), (("layer4",), 8 * width, 32)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.features_only = True
        self._out_positions = tuple(range(5))


def build_backbone(model: str, cfg: ProbeConfig) -> nn.Module:
    """A freshly initialised probe backbone: ``vgg16``, ``resnet18`` or ``vgg16_nopad`` (VGG-16 run under circular
    padding, see ``cnnapps.understand.equivariance.CircularPadding``). Each returns its five stage maps."""
    if model in ("vgg16", "vgg16_nopad"):
        cfg_d = [v if v == "M" else max(1, v // cfg.width_div) for v in VGG_CONFIGS["D"]]
        vgg = VGG(cfg_d, num_classes=0, features_only=True)
        return WithPadding(vgg, "circular") if model == "vgg16_nopad" else vgg
    if model == "resnet18":
        return ResNet18Layout(width=max(1, 64 // cfg.width_div))
    raise ValueError(f"unknown probe backbone {model!r}; choose vgg16, resnet18 or vgg16_nopad")


class _Classifier(nn.Module):
    """Backbone + global average pool + linear: (B, 3, H, W) -> (B, classes), for training the backbone."""

    def __init__(self, backbone: nn.Module, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(int(backbone.feature_info.channels(-1)), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(stage_outputs(self.backbone, x)[-1].mean((2, 3)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and 4-pixel reflect-padded random crops of a batch (B, 3, S, S)."""
    b, _, s, _ = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=gen).tolist()  # one offset per batch: cheap, still augments
    return padded[:, :, dy:dy + s, dx:dx + s]


@dataclass
class TrainedBackbone:
    """A trained probe backbone and how it was trained."""

    model: str
    backbone: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    info: dict[str, Any]


def train_backbone(model: str, cfg: ProbeConfig, data_root: Path, cache: Path | None = None) -> TrainedBackbone:
    """Train (or load from ``cache``) a probe backbone on the CIFAR-10 subset as ``ProbeConfig`` says; ``info``
    records epochs, images, seconds and test accuracy on the subset's 2,000 test images."""
    from cnnapps.engine.checkpoint import load_checkpoint, save_checkpoint
    from cnnapps.data.cifar10 import prepare_cifar10

    torch.manual_seed(cfg.seed)
    backbone = build_backbone(model, cfg)
    path = cache / f"posenet-{model}-{cfg.key(model)}.pt" if cache is not None else None
    if path is not None and path.is_file():
        state = load_checkpoint(path, task="understand-posenet")
        backbone.load_state_dict(state["model"])
        info = dict(state["info"])
        info["cached"] = str(path)
        return TrainedBackbone(model, backbone.eval(), torch.as_tensor(state["mean"]), torch.as_tensor(state["std"]),
                               info)
    if cfg.train_epochs == 0:  # the quick config probes backbones as initialised; no data needed
        mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
        return TrainedBackbone(model, backbone.eval(), mean, std,
                               {"trained_on": "nothing: train_epochs=0 (weights as initialised)", "epochs": 0,
                                "params": sum(p.numel() for p in backbone.parameters())})
    with np.load(prepare_cifar10(Path(data_root))) as z:
        train_images, train_labels, test_images, test_labels = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
        n_classes = len(z["classes"])
    x_train = torch.from_numpy(train_images).permute(0, 3, 1, 2).float() / 255
    y_train = torch.from_numpy(train_labels).long()
    if cfg.train_limit:  # the cached arrays are grouped by class: take a seeded random subset
        keep = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_limit]
        x_train, y_train = x_train[keep], y_train[keep]
    mean, std = x_train.mean((0, 2, 3)), x_train.std((0, 2, 3))
    x_test = torch.from_numpy(test_images).permute(0, 3, 1, 2).float() / 255
    y_test = torch.from_numpy(test_labels).long()
    if cfg.train_size != x_train.shape[-1]:
        x_train = F.interpolate(x_train, size=cfg.train_size, mode="bilinear", align_corners=False, antialias=True)
        x_test = F.interpolate(x_test, size=cfg.train_size, mode="bilinear", align_corners=False, antialias=True)
    norm = lambda t: (t - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # noqa: E731
    net = _Classifier(backbone, n_classes)
    steps = cfg.train_epochs * math.ceil(len(x_train) / cfg.batch_size)
    # Adam, not the paper-era SGD: the thin VGG-16 has no batch norm, its activations shrink ~10x from the first
    # stage to the last at initialisation, and SGD at lr 0.01-0.05 left its loss at ln 10 for two epochs.
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1), pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    losses = []
    for epoch in range(cfg.train_epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            xb = norm(_augment(x_train[idx], gen))
            loss = F.cross_entropy(net(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
        losses.append(round(total / max(n, 1), 4))
        log.info("probe backbone %s: epoch %d/%d loss %.4f (%.0f s)", model, epoch + 1, cfg.train_epochs,
                 losses[-1], time.perf_counter() - t0)
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(norm(x_test[i:i + 500])).argmax(1) == y_test[i:i + 500]).sum())
                      for i in range(0, len(x_test), 500))
    info = {"trained_on": f"CIFAR-10 subset ({len(x_train)} train images, {cfg.train_size}x{cfg.train_size})",
            "epochs": cfg.train_epochs, "seconds": round(time.perf_counter() - t0, 1), "train_loss": losses,
            "test_accuracy": round(correct / len(x_test), 4),
            "params": sum(p.numel() for p in backbone.parameters()),
            "schedule": f"AdamW, one-cycle lr {cfg.lr}, weight decay 5e-4, batch {cfg.batch_size}, random flips and "
                        "4-pixel reflect-padded crops"}
    if path is not None:
        save_checkpoint({"task": "understand-posenet", "model": backbone.state_dict(), "mean": mean, "std": std,
                         "info": info}, path)
    return TrainedBackbone(model, backbone.eval(), mean, std, info)


# ---------------------------------------------------------------- data and features


def load_voc_images(data_root: Path, split: str, size: int, limit: int = 0) -> torch.Tensor:
    """VOC-mini images of ``split`` (trainval / test) resized (aspect ignored, as the paper's 224x224) to
    (N, 3, size, size) floats in [0, 1]; at most ``limit`` (0: all)."""
    from PIL import Image

    folder = Path(data_root) / "voc_mini"
    names = (folder / "splits" / f"{split}.txt").read_text().split()
    if limit:
        names = names[:limit]
    out = np.empty((len(names), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        with Image.open(folder / "JPEGImages" / f"{name}.jpg") as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def constant_images(value: float, size: int, n: int = 1) -> torch.Tensor:
    """(n, 3, size, size) images of one value in [0, 1]: 0 black, 1 white."""
    return torch.full((n, 3, size, size), float(value))


def extract_features(trained: TrainedBackbone | None, images: torch.Tensor, map_size: int,
                     batch: int = 100) -> tuple[torch.Tensor, list[int]]:
    """Multi-scale features as PosENet reads them: every stage map resized bilinearly to (map_size, map_size) and
    concatenated on channels, (N, sum C, m, m) float16 to save memory, plus the channel count of each stage.
    ``trained=None`` gives the raw image (no normalisation: a black image stays all zeros) at (m, m)."""
    out, chans = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            xb = images[i:i + batch]
            if trained is None:
                maps = [xb]
            else:
                xn = (xb - trained.mean.view(1, -1, 1, 1)) / trained.std.view(1, -1, 1, 1)
                maps = stage_outputs(trained.backbone, xn)
            resized = [F.interpolate(m, size=(map_size, map_size), mode="bilinear", align_corners=False,
                                     antialias=m.shape[-1] > map_size) for m in maps]
            chans = [m.shape[1] for m in resized]
            out.append(torch.cat(resized, 1).half())
    return torch.cat(out), chans


# ---------------------------------------------------------------- the read-out


def whitening(feats: torch.Tensor) -> torch.Tensor:
    """(C, C) matrix ``M^-1/2`` of the features' uncentred second moments ``M = E[f f^T]`` over images and
    positions (eigenvalues floored at 1e-6 of the largest): applied per position, it decorrelates the channels
    without shifting them, so a zero feature stays zero and a constant map stays constant."""
    c = feats.shape[1]
    m = torch.zeros(c, c, dtype=torch.float64)
    n = 0
    for i in range(0, len(feats), 100):
        x = feats[i:i + 100].double().permute(1, 0, 2, 3).reshape(c, -1)
        m += x @ x.T
        n += x.shape[1]
    e, v = torch.linalg.eigh(m / max(n, 1))
    return (v @ torch.diag(e.clamp_min(1e-6 * float(e.max())).rsqrt()) @ v.T).float()


def apply_whitening(w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(N, C, m, m) -> (N, C, m, m) float16, every position's channel vector multiplied by ``w``."""
    return torch.cat([torch.einsum("dc,bchw->bdhw", w, feats[i:i + 100].float()).half()
                      for i in range(0, len(feats), 100)])


class PosENet(nn.Module):
    """The position encoding network: one convolution (``kernel`` 1, 3 or 7, keeping the size) from the features
    to one map, no activation (Islam et al. 2020, sec. 3). Its input is first multiplied per position by a fixed
    channel-whitening matrix (``whitening``: no shift, so zeros stay zeros); a per-position channel mix folds into
    the convolution's weights, so this is still one linear conv layer; it only makes Adam converge in a few
    epochs instead of hundreds.

    ``padding``: ``replicate`` (default here) pads by repeating the edge values, so the read-out cannot tell an
    edge from the interior by itself and any position it reports was in the features; ``zeros`` is a plain
    zero-padded convolution, whose own border is a position cue (on an 8x8 map it lets PosENet find position in
    the raw image). The paper does not say; the report shows both."""

    def __init__(self, in_chs: int, kernel: int = 3, whiten: torch.Tensor | None = None,
                 padding: str = "replicate") -> None:
        super().__init__()
        if padding not in ("replicate", "zeros"):
            raise ValueError(f"PosENet padding must be 'replicate' or 'zeros', got {padding!r}")
        self.conv = nn.Conv2d(in_chs, 1, kernel, padding=kernel // 2, padding_mode=padding)
        self.register_buffer("whiten", whiten if whiten is not None else torch.eye(in_chs))

    def forward(self, x: torch.Tensor, whitened: bool = False) -> torch.Tensor:
        """(B, C, m, m) features -> (B, m, m) map; ``whitened``: ``x`` went through ``apply_whitening`` already."""
        x = x.float() if whitened else torch.einsum("dc,bchw->bdhw", self.whiten, x.float())
        return self.conv(x)[:, 0]


def train_readout(feats: torch.Tensor, target: torch.Tensor, kernel: int, cfg: ProbeConfig,
                  padding: str = "replicate", whiten: torch.Tensor | None = None,
                  whitened: torch.Tensor | None = None) -> PosENet:
    """Fit a PosENet on (N, C, m, m) features to one target map (m, m) (the same map for every image) with MSE
    and Adam. ``whiten`` / ``whitened``: a whitening matrix and the features already multiplied by it (computed
    here when absent), so several read-outs on the same features share that work."""
    torch.manual_seed(cfg.seed)
    if whiten is None:
        whiten = whitening(feats)
    if whitened is None:
        whitened = apply_whitening(whiten, feats)
    net = PosENet(feats.shape[1], kernel, whiten, padding)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.readout_lr)
    steps = cfg.readout_epochs * math.ceil(len(feats) / cfg.readout_batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.readout_epochs):
        order = torch.randperm(len(feats), generator=gen)
        for i in range(0, len(order), cfg.readout_batch):
            xb = whitened[order[i:i + cfg.readout_batch]]
            loss = F.mse_loss(net(xb, whitened=True), target.expand(len(xb), -1, -1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def spc_mae(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float, int]:
    """Mean over images of the Spearman correlation between a predicted map and the target (scipy ``spearmanr``
    on the flattened maps) and mean absolute error; returns (SPC, MAE, constant predictions). A constant
    prediction carries no ranking: its correlation is undefined and counted as 0, as "no position found"."""
    t = target.flatten().numpy()
    spcs, constant = [], 0
    for p in pred.detach().float().flatten(1).numpy():
        if np.ptp(p) <= 1e-7 * max(1.0, float(np.abs(p).max())):
            spcs.append(0.0)
            constant += 1
            continue
        spcs.append(float(spearmanr(p, t).statistic))
    mae = float((pred.detach().float() - target).abs().mean())
    return float(np.mean(spcs)), mae, constant


# ---------------------------------------------------------------- the whole probe


@dataclass
class ProbeRow:
    """One read-out: backbone, target map, kernel, stages read (``all`` or one index), tested on which images."""

    model: str
    target: str
    kernel: int
    stages: str
    images: str
    spc: float
    mae: float
    constant_predictions: int = 0
    padding: str = "replicate"  # the read-out's own padding (see PosENet)


@dataclass
class PositionResult:
    """Everything the probe measured, with the config and how each backbone was trained."""

    config: dict[str, Any]
    backbones: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[ProbeRow] = field(default_factory=list)
    seconds: float = 0.0

    def get(self, model: str, target: str = "H", kernel: int = 3, stages: str = "all",
            images: str = "natural", padding: str = "replicate") -> ProbeRow | None:
        for r in self.rows:
            if (r.model, r.target, r.kernel, r.stages, r.images, r.padding) == (model, target, kernel, stages,
                                                                                 images, padding):
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "backbones": self.backbones, "rows": [asdict(r) for r in self.rows],
                "seconds": self.seconds, "paper_H": {k: {"spc": v[0], "mae": v[1]} for k, v in PAPER_H.items()},
                "paper_note": PAPER_NOTE}


def probe_model(model: str, trained: TrainedBackbone | None, cfg: ProbeConfig, train_imgs: torch.Tensor,
                test_sets: dict[str, torch.Tensor], ablations: bool = True) -> list[ProbeRow]:
    """Read-outs for one backbone (None: PosENet on the raw image): every target with a 3x3 kernel on all stages,
    tested on each of ``test_sets``, and the H target once more with a zero-padded read-out; with ``ablations``
    also the H target with every kernel of ``cfg.kernels`` and with one stage at a time."""
    f_train, chans = extract_features(trained, train_imgs, cfg.map_size)
    f_test = {name: extract_features(trained, imgs, cfg.map_size)[0] for name, imgs in test_sets.items()}
    rows = []

    prepared: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = {}

    def fit_and_test(target: str, kernel: int, sl: slice, stages: str, sets: Sequence[str],
                     padding: str = "replicate") -> None:
        key = (sl.start, sl.stop)
        if key not in prepared:  # whiten each channel selection once, for all its read-outs
            w = whitening(f_train[:, sl])
            prepared[key] = (w, apply_whitening(w, f_train[:, sl]),
                             {n: apply_whitening(w, f[:, sl]) for n, f in f_test.items()})
        w, train_w, test_w = prepared[key]
        gt = position_map(target, cfg.map_size)
        net = train_readout(f_train[:, sl], gt, kernel, cfg, padding, whiten=w, whitened=train_w)
        with torch.no_grad():
            for name in sets:
                spc, mae, const = spc_mae(net(test_w[name], whitened=True), gt)
                rows.append(ProbeRow(model, target, kernel, stages, name, round(spc, 4), round(mae, 4), const,
                                     padding))

    everything = slice(0, sum(chans))
    for target in TARGETS:
        fit_and_test(target, 3, everything, "all", list(test_sets))
    fit_and_test("H", 3, everything, "all", list(test_sets), padding="zeros")
    if ablations:
        for k in cfg.kernels:
            if k != 3:
                fit_and_test("H", k, everything, "all", ["natural"])
        if len(chans) > 1:
            start = 0
            for i, c in enumerate(chans):
                fit_and_test("H", 3, slice(start, start + c), str(i), ["natural"])
                start += c
    return rows


def run_position_probe(cfg: ProbeConfig, data_root: Path, cache: Path | None = None,
                       models: Sequence[str] = MODELS, ablations: bool = True) -> PositionResult:
    """Train (or load) the backbones, then fit and test every read-out; see ``ProbeConfig`` and ``probe_model``.
    Test images: VOC-mini test (natural), one all-black and one all-white image."""
    t0 = time.perf_counter()
    result = PositionResult(config=asdict(cfg))
    train_imgs = load_voc_images(data_root, "trainval", cfg.image_size, cfg.voc_train)
    test_sets = {"natural": load_voc_images(data_root, "test", cfg.image_size, cfg.voc_test),
                 "black": constant_images(0.0, cfg.image_size), "white": constant_images(1.0, cfg.image_size)}
    for model in models:
        trained = None
        if model != "posenet":
            trained = train_backbone(model, cfg, data_root, cache)
            result.backbones[model] = trained.info
            log.info("probe backbone %s: %s", model, json.dumps(trained.info))
        else:
            result.backbones[model] = {"trained_on": "nothing: the read-out sees the raw RGB image in [0, 1]"}
        result.rows += probe_model(model, trained, cfg, train_imgs, test_sets, ablations=ablations and
                                   model in ("vgg16", "resnet18"))
        log.info("position probe %s done (%.0f s)", model, time.perf_counter() - t0)
    result.seconds = round(time.perf_counter() - t0, 1)
    return result


def format_position_tables(result: PositionResult) -> str:
    """Markdown tables: the paper's H column beside ours; every target on natural, black and white images; the
    kernel and per-stage ablations."""
    lines = ["| model | paper H SPC | paper H MAE | ours H SPC | ours H MAE | ours, zero-padded read-out: SPC | MAE |",
             "|---|---|---|---|---|---|---|"]
    for m in MODELS:
        r = result.get(m)
        if r is None:
            continue
        z = result.get(m, padding="zeros")
        p = PAPER_H[m]
        zs = f"{z.spc:.3f} | {z.mae:.3f}" if z else "- | -"
        lines.append(f"| {MODEL_NAMES[m]} | {p[0]:.3f} | {p[1]:.3f} | {r.spc:.3f} | {r.mae:.3f} | {zs} |")
    out = ["Position information, H target, 3x3 PosENet on all stages, natural test images "
           f"(paper's values from {PAPER_NOTE}; ours measured here, read-out padded by replicating edges unless "
           "said otherwise):", "", *lines, ""]
    head = "| model | images | " + " | ".join(f"{t} SPC | {t} MAE" for t in TARGETS) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(TARGETS))]
    for m in MODELS:
        for images in ("natural", "black", "white"):
            cells = []
            for t in TARGETS:
                r = result.get(m, t, 3, "all", images)
                cells += [f"{r.spc:.3f}", f"{r.mae:.3f}"] if r else ["-", "-"]
            if any(c != "-" for c in cells):
                lines.append(f"| {MODEL_NAMES[m]} | {images} | " + " | ".join(cells) + " |")
    out += ["Every target (3x3 read-out, all stages); black and white are single constant images:", "", *lines, ""]
    kernels = sorted({r.kernel for r in result.rows})
    lines = ["| model | " + " | ".join(f"{k}x{k} SPC | {k}x{k} MAE" for k in kernels) + " |",
             "|" + "---|" * (1 + 2 * len(kernels))]
    for m in ("vgg16", "resnet18"):
        cells = []
        for k in kernels:
            r = result.get(m, "H", k)
            cells += [f"{r.spc:.3f}", f"{r.mae:.3f}"] if r else ["-", "-"]
        if any(c != "-" for c in cells):
            lines.append(f"| {MODEL_NAMES[m]} | " + " | ".join(cells) + " |")
    out += ["Read-out kernel size (H target, all stages, natural images):", "", *lines, ""]
    stages = sorted({r.stages for r in result.rows if r.stages != "all"})
    if stages:
        lines = ["| model | " + " | ".join(f"stage {s} SPC | stage {s} MAE" for s in stages) + " | all SPC | all MAE |",
                 "|" + "---|" * (3 + 2 * len(stages))]
        for m in ("vgg16", "resnet18"):
            cells = []
            for s in [*stages, "all"]:
                r = result.get(m, "H", 3, s)
                cells += [f"{r.spc:.3f}", f"{r.mae:.3f}"] if r else ["-", "-"]
            if any(c != "-" for c in cells):
                lines.append(f"| {MODEL_NAMES[m]} | " + " | ".join(cells) + " |")
        out += ["One stage at a time versus all stages (H target, 3x3 read-out, natural images):", "", *lines, ""]
    return "\n".join(out)
