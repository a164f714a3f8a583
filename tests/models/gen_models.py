#!/usr/bin/python3
"""gen_models.py: radpipe's test models, made here with PyTorch instead of downloaded.

Builds small 2D and 3D U-Nets from nnU-Net's building blocks (conv-instancenorm-leakyrelu
stages, strided convolution down, transposed convolution up, skip concatenation, 1x1 head),
one with BatchNorm (folded by the engine at load), and small graphs exercising the other
operators exporters emit (Resize/Upsample, MaxPool, AveragePool, Sigmoid, PRelu, Add, Mul,
Concat, Reshape, Softmax, ArgMax); seeds the weights, exports ONNX at fixed opsets and saves a
reference input and PyTorch's output beside each model:

    tests/data/models/<name>/model.onnx   the exported graph
    tests/data/models/<name>/input.bin    raw little-endian float32, C order (N, C, spatial)
    tests/data/models/<name>/output.bin   PyTorch's output for it, the same layout
    tests/data/models/<name>/meta.json    shapes, opset, operators, tolerance, description

and trains one tiny 3D U-Net for 300 iterations (about two minutes) on generated CT phantoms (bodies and
air-filled head phantoms with fat, soft tissue and bone at distinct Hounsfield units, lungs,
holders) as a demo model with a model.json
(proto/models/model.schema.json) for the gpu-segmenter's registry.

Run by `make models` (Debian python3-torch and python3-onnx), never by `make test`; the
outputs are committed. Usage:
    gen_models.py [--out DIR] [--only NAME,...] [--train-iterations N]
    gen_models.py --bench DIR [--features 32,64,128,256] [--patch 64,96,96]
        (a larger untrained 3D U-Net for tests/bench/bench_nn.sh, not committed)
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

TOLERANCE = 1e-4  # max abs difference allowed between an engine's float32 output and PyTorch's


# --- nnU-Net building blocks ------------------------------------------------------------------

def conv_nd(dims):
    return nn.Conv3d if dims == 3 else nn.Conv2d


def convT_nd(dims):
    return nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d


class ConvBlock(nn.Module):
    """conv (3x3[x3], pad 1, bias) -> norm -> nonlinearity: nnU-Net's ConvDropoutNormReLU."""

    def __init__(self, dims, cin, cout, stride=1, norm="instance"):
        super().__init__()
        self.conv = conv_nd(dims)(cin, cout, 3, stride=stride, padding=1, bias=True)
        if norm == "instance":
            self.norm = (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(
                cout, eps=1e-5, affine=True)
            self.act = nn.LeakyReLU(0.01, inplace=False)
        else:
            self.norm = (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(cout, eps=1e-5)
            self.act = nn.ReLU(inplace=False)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class PlainConvUNet(nn.Module):
    """nnU-Net's PlainConvUNet: per stage n_conv blocks, the first of every stage after the
    first with stride 2; decoder: transposed conv (kernel = stride = 2) to the skip's width,
    concat [up, skip], n_conv blocks; a 1x1[x1] head giving class logits."""

    def __init__(self, dims, in_ch, features, classes, n_conv=2, norm="instance"):
        super().__init__()
        self.enc = nn.ModuleList()
        cin = in_ch
        for s, f in enumerate(features):
            blocks = [ConvBlock(dims, cin, f, stride=1 if s == 0 else 2, norm=norm)]
            blocks += [ConvBlock(dims, f, f, norm=norm) for _ in range(n_conv - 1)]
            self.enc.append(nn.Sequential(*blocks))
            cin = f
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for s in range(len(features) - 1, 0, -1):
            fb, fs = features[s], features[s - 1]
            self.up.append(convT_nd(dims)(fb, fs, 2, stride=2, bias=True))
            blocks = [ConvBlock(dims, 2 * fs, fs, norm=norm)]
            blocks += [ConvBlock(dims, fs, fs, norm=norm) for _ in range(n_conv - 1)]
            self.dec.append(nn.Sequential(*blocks))
        self.head = conv_nd(dims)(features[0], classes, 1, bias=True)

    def forward(self, x):
        skips = []
        for stage in self.enc:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def init_weights(model, seed):
    """He init as nnU-Net's InitWeights_He(1e-2); norm scales and shifts away from 1 and 0,
    BatchNorm running statistics away from 0 and 1, so that an engine that ignores any of
    them fails the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                fan_in = m.weight[0].numel() if not isinstance(
                    m, (nn.ConvTranspose2d, nn.ConvTranspose3d)) else m.weight.shape[0] * m.weight[0, 0].numel()
                std = math.sqrt(2.0 / (1 + 0.01 ** 2) / fan_in)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm2d,
                                nn.BatchNorm3d)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                    m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 + 0.1 * torch.randn(m.weight.shape, generator=g))


# --- graphs for the other operators -------------------------------------------------------------

class Ops3d(nn.Module):
    """PRelu, MaxPool, AveragePool, Add, Sigmoid, Mul, Resize (nearest and linear), Concat,
    Reshape (constant shapes) and Softmax over the channels: what MONAI-style networks and
    exporters add to the U-Net's operators."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(1, 6, 3, padding=1)
        self.prelu = nn.PReLU(6)
        self.c2 = nn.Conv3d(6, 6, 3, padding=1)
        self.up_nearest = nn.Upsample(scale_factor=2, mode="nearest")
        self.up_linear = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.head = nn.Conv3d(18, 3, 1)

    def forward(self, x):
        a = self.prelu(self.c1(x))
        # count_include_pad=False: with the default, torch 1.13 puts a zero Pad before it
        d = F.max_pool3d(a, 2) + F.avg_pool3d(a, 2, count_include_pad=False)
        d = d * torch.sigmoid(d)
        e = self.c2(d)
        f = torch.cat([a, self.up_nearest(e), self.up_linear(e)], dim=1)
        logits = self.head(f)
        n, c = logits.shape[0], logits.shape[1]
        flat = logits.reshape(n, c, -1)  # constant shapes: the input shape is fixed
        return torch.softmax(flat, dim=1).reshape(logits.shape)


class Upsample2dOld(nn.Module):
    """Opset 9: the old Upsample operator (nearest, integer scale), MaxPool, Concat."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = F.leaky_relu(self.c1(x), 0.01)
        b = F.relu(self.c2(F.max_pool2d(a, 2)))
        return self.head(torch.cat([a, self.up(b)], dim=1))


class ArgMax3d(nn.Module):
    """A label map straight from the graph: conv-instancenorm-leakyrelu, head, ArgMax over
    the channels (int64, keepdims). The head's weights are scaled so the two best logits of
    every voxel stay well apart (meta.json records the smallest margin)."""

    def __init__(self):
        super().__init__()
        self.b1 = ConvBlock(3, 1, 8)
        self.b2 = ConvBlock(3, 8, 8)
        self.head = nn.Conv3d(8, 4, 1)

    def forward(self, x):
        return torch.argmax(self.head(self.b2(self.b1(x))), dim=1, keepdim=True)


# --- export and references ----------------------------------------------------------------------

def write_f32(path, a):
    np.ascontiguousarray(a, dtype="<f4").tofile(path)


def graph_ops(path):
    m = onnx.load(path)
    onnx.checker.check_model(m)
    onnx.shape_inference.infer_shapes(m, strict_mode=True)
    return sorted({n.op_type for n in m.graph.node}), m.opset_import[0].version


def export(name, model, x, opset, description, out_root, dynamic=None, extra=None,
           preserve=False):
    """Export model (eval mode) for input x, save x and PyTorch's output as references."""
    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    model.eval()
    with torch.no_grad():
        y = model(x)
    path = os.path.join(d, "model.onnx")
    dyn = None
    if dynamic:
        dyn = {"input": dynamic, "output": dynamic}
    torch.onnx.export(model, x, path, opset_version=opset, input_names=["input"],
                      output_names=["output"], dynamic_axes=dyn, do_constant_folding=True,
                      training=torch.onnx.TrainingMode.PRESERVE if preserve else
                      torch.onnx.TrainingMode.EVAL)
    ops, got_opset = graph_ops(path)
    assert got_opset == opset, (name, got_opset, opset)
    write_f32(os.path.join(d, "input.bin"), x.numpy())
    out_dtype = "float32"
    if y.dtype != torch.float32:
        out_dtype = str(y.dtype).replace("torch.", "")
    write_f32(os.path.join(d, "output.bin"), y.float().numpy())
    params = sum(p.numel() for p in model.parameters())
    meta = {
        "name": name,
        "description": description,
        "opset": opset,
        "operators": ops,
        "input": {"name": "input", "shape": list(x.shape), "dtype": "float32",
                  "dynamic_axes": {str(k): v for k, v in (dynamic or {}).items()}},
        "output": {"name": "output", "shape": list(y.shape), "dtype": out_dtype,
                   "stored_as": "float32"},
        "parameters": params,
        "tolerance": {"max_abs": 0.0 if out_dtype != "float32" else TOLERANCE},
        "reference": "PyTorch %s, float32, eval mode, CPU" % torch.__version__,
        "output_range": [float(y.float().min()), float(y.float().max())],
        "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
    }
    if extra:
        meta.update(extra)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
    print("%-22s opset %-2d %7d params %6.0f KiB  %s" % (name, opset, params, size / 1024,
                                                        " ".join(ops)))
    return y


def gen_unet3d_instnorm(out):
    torch.manual_seed(1)
    m = PlainConvUNet(3, 1, (4, 8, 16), 3)
    init_weights(m, 11)
    x = torch.randn(2, 1, 16, 24, 32, generator=torch.Generator().manual_seed(12))
    export("unet3d-instnorm", m, x, 13,
           "3D nnU-Net PlainConvUNet: 3 stages (4, 8, 16 features), 2 conv-instancenorm-"
           "leakyrelu blocks per stage, strided conv down, transposed conv up, skip concat, "
           "3-class 1x1x1 head; batch of 2 on an anisotropic 16x24x32 patch; N is free",
           out, dynamic={0: "N"})


def gen_unet2d_instnorm(out):
    torch.manual_seed(2)
    m = PlainConvUNet(2, 1, (8, 16, 32, 32), 3)
    init_weights(m, 21)
    x = torch.randn(1, 1, 48, 64, generator=torch.Generator().manual_seed(22))
    export("unet2d-instnorm", m, x, 11,
           "2D nnU-Net PlainConvUNet at an older opset: 4 stages (8, 16, 32, 32 features), "
           "conv-instancenorm-leakyrelu, strided conv down, transposed conv up, skip concat, "
           "3 classes; N, H and W are free (sizes divisible by 8)",
           out, dynamic={0: "N", 2: "H", 3: "W"})


def gen_unet3d_batchnorm(out):
    torch.manual_seed(3)
    m = PlainConvUNet(3, 1, (4, 8, 16), 2, norm="batch")
    init_weights(m, 31)
    x = torch.randn(1, 1, 16, 16, 24, generator=torch.Generator().manual_seed(32))
    export("unet3d-batchnorm", m, x, 17,
           "3D U-Net with BatchNormalization (eval: running statistics, to be folded into the "
           "preceding Conv at load) and ReLU at a newer opset; 3 stages (4, 8, 16), 2 classes; "
           "fixed shape (exported with TrainingMode.PRESERVE: in EVAL mode the exporter folds "
           "BatchNormalization itself)",
           out, preserve=True)


def gen_ops3d(out):
    torch.manual_seed(4)
    m = Ops3d()
    init_weights(m, 41)
    x = torch.randn(1, 1, 8, 12, 16, generator=torch.Generator().manual_seed(42))
    export("ops3d", m, x, 13,
           "the other operators of the issue as PyTorch exports them: PRelu, MaxPool, "
           "AveragePool, Add, Sigmoid, Mul, Resize (nearest/asymmetric/floor and "
           "linear/pytorch_half_pixel, scale 2), Concat, Reshape with Constant shapes, Softmax "
           "over the channels; fixed shape; the output is probabilities",
           out)


def gen_upsample2d_opset9(out):
    torch.manual_seed(5)
    m = Upsample2dOld()
    init_weights(m, 51)
    x = torch.randn(1, 1, 16, 20, generator=torch.Generator().manual_seed(52))
    export("upsample2d-opset9", m, x, 9,
           "opset 9: the old Upsample operator (nearest, scale 2; scales as an input), "
           "MaxPool, LeakyRelu, Relu, Concat; fixed shape",
           out)


def gen_argmax3d(out):
    torch.manual_seed(6)
    m = ArgMax3d()
    init_weights(m, 61)
    with torch.no_grad():
        m.head.weight.mul_(500)
    x = torch.randn(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(62))
    m.eval()
    with torch.no_grad():
        logits = m.head(m.b2(m.b1(x)))
        top2 = torch.topk(logits, 2, dim=1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        scale = float(logits.abs().max())
    assert margin > 1e-5 * scale and margin > 1e-2, (margin, scale)
    export("argmax3d", m, x, 13,
           "a label map from the graph: conv-instancenorm-leakyrelu twice, 4-class head, "
           "ArgMax over the channels (keepdims, int64: output.bin holds the class indices as "
           "float32); every voxel's two best logits differ by at least min_top2_margin",
           out, extra={"min_top2_margin": margin, "max_abs_logit": scale})


# --- the demo model: a tiny 3D U-Net trained on CT phantoms -------------------------------------

DEMO_SPACING = (5.0, 2.0, 2.0)  # z, y, x mm: the model's target spacing
DEMO_PATCH = (16, 64, 64)       # z, y, x
DEMO_CLASSES = ("background", "adipose tissue", "soft tissue", "bone")
# Hounsfield ranges of the classes: what a structure of that density is called
HU_FAT = (-180, -60)
HU_SOFT = (-20, 200)
HU_BONE = (350, 1400)


def phantom(rng, shape=(24, 96, 96)):
    """A CT phantom at DEMO_SPACING. Air (background) around an elliptic body or head: a
    body of soft tissue with fat under the skin and in blobs, or an air-filled head phantom
    (a bony shell with inserts, as the Philips head phantom of the shared corpus); optional
    bony shell, spine and ribs, lungs (air: background), a plastic holder arc under it;
    inserts of every class. Labels by the structure's density class: 0 air, 1 adipose tissue
    (-180..-60 HU), 2 soft tissue (-20..200 HU), 3 bone (350..1400 HU). Blurred (partial
    volume) and noisy (sd 15 HU) after labelling."""
    from scipy.ndimage import gaussian_filter
    D, H, W = shape
    z, y, x = np.meshgrid(np.arange(D) * DEMO_SPACING[0], np.arange(H) * DEMO_SPACING[1],
                          np.arange(W) * DEMO_SPACING[2], indexing="ij")
    cz = D * DEMO_SPACING[0] / 2
    cy = H * DEMO_SPACING[1] / 2 + rng.uniform(-10, 10)
    cx = W * DEMO_SPACING[2] / 2 + rng.uniform(-10, 10)
    img = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)

    def put(mask, cls):
        lo, hi = (HU_FAT, HU_SOFT, HU_BONE)[cls - 1]
        img[mask] = rng.uniform(lo, hi)
        lab[mask] = cls

    def ell(ry, rx, rz, oy=0.0, ox=0.0):
        return ((y - cy - oy) / ry) ** 2 + ((x - cx - ox) / rx) ** 2 + ((z - cz) / rz) ** 2 <= 1

    ry, rx, rz = rng.uniform(45, 80), rng.uniform(55, 88), rng.uniform(60, 250)
    body = ell(ry, rx, rz)
    hollow = rng.random() < 0.4  # an air-filled head phantom
    if not hollow:
        put(body, 1)  # fat, then soft tissue inside it
        t = rng.uniform(3, 12)
        put(ell(ry - t, rx - t, rz), 2)
    if hollow or rng.random() < 0.3:
        t = rng.uniform(3, 9)
        put(body & ~ell(ry - t, rx - t, rz), 3)  # bony shell
        if hollow:
            img[ell(ry - t, rx - t, rz)] = -1000
            lab[ell(ry - t, rx - t, rz)] = 0
    elif rng.random() < 0.6:
        for side in (-1, 1):  # lungs: air inside the body
            lungs = body & ell(0.55 * ry, 0.3 * rx, rz, -0.1 * ry, side * 0.45 * rx)
            img[lungs] = rng.uniform(-950, -750)
            lab[lungs] = 0
        spine = ((y - cy - 0.62 * ry) ** 2 + (x - cx) ** 2) <= rng.uniform(8, 14) ** 2
        put(spine & body, 3)
    for _ in range(rng.integers(2, 7)):  # inserts of every class
        oy, ox = rng.uniform(-0.5, 0.5) * ry, rng.uniform(-0.5, 0.5) * rx
        r = rng.uniform(5, 18)
        blob = body & (((y - cy - oy) ** 2 + (x - cx - ox) ** 2 + ((z - cz) * 0.2) ** 2) <= r * r)
        put(blob, int(rng.integers(1, 4)))
    if rng.random() < 0.5:  # a holder: a thin arc under the body
        r = ry + rng.uniform(8, 20)
        d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        arc = (np.abs(d - r) < rng.uniform(1, 3)) & (y > cy)
        put(arc & ~body, int(rng.choice([2, 3])))
    img = gaussian_filter(img, sigma=(0.3, 0.8, 0.8))
    img += rng.normal(0, 15, shape).astype(np.float32)
    return img, lab


def normalisation_stats(rng, n=12):
    """nnU-Net's CT normalisation statistics over the foreground of the training phantoms:
    the 0.5 and 99.5 percentiles (clip bounds), then mean and std of the clipped values."""
    vals = []
    for _ in range(n):
        img, lab = phantom(rng)
        vals.append(img[lab > 0])
    v = np.concatenate(vals)
    lo, hi = np.percentile(v, 0.5), np.percentile(v, 99.5)
    c = np.clip(v, lo, hi)
    return {"scheme": "ct", "percentile_00_5": round(float(lo), 2),
            "percentile_99_5": round(float(hi), 2), "mean": round(float(c.mean()), 3),
            "std": round(float(c.std()), 3)}


def normalise(img, norm):
    c = np.clip(img, norm["percentile_00_5"], norm["percentile_99_5"])
    return (c - norm["mean"]) / max(norm["std"], 1e-8)


def gen_demo(out, iterations):
    name = "demo-phantom-ct"
    torch.manual_seed(7)
    rng = np.random.default_rng(70)
    norm = normalisation_stats(rng)
    m = PlainConvUNet(3, 1, (8, 16, 32), len(DEMO_CLASSES))
    init_weights(m, 71)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    # class weights: fat and bone are the small classes
    weight = torch.tensor([1.0, 2.0, 1.0, 2.0])
    t0 = time.time()
    # a pool of phantoms made once, then random crops and flips of it
    pool = [phantom(rng) for _ in range(64)]
    m.train()
    it = 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 if i < 300 else 0.3)
    while it < iterations:
        xs, ys = [], []
        for _ in range(2):
            img, lab = pool[rng.integers(len(pool))]
            for ax in (1, 2):
                if rng.random() < 0.5:
                    img, lab = np.flip(img, ax), np.flip(lab, ax)
            D, H, W = img.shape
            oz = rng.integers(0, D - DEMO_PATCH[0] + 1)
            oy = rng.integers(0, H - DEMO_PATCH[1] + 1)
            ox = rng.integers(0, W - DEMO_PATCH[2] + 1)
            sl = (slice(oz, oz + DEMO_PATCH[0]), slice(oy, oy + DEMO_PATCH[1]),
                  slice(ox, ox + DEMO_PATCH[2]))
            xs.append(np.ascontiguousarray(normalise(img[sl], norm)[None]))
            ys.append(np.ascontiguousarray(lab[sl]).astype(np.int64))
        x = torch.from_numpy(np.stack(xs)).float()
        y = torch.from_numpy(np.stack(ys))
        loss = F.cross_entropy(m(x), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        it += 1
    m.eval()
    # accuracy on fresh phantoms, whole volumes (fully convolutional)
    correct = total = 0
    dice = []
    with torch.no_grad():
        for _ in range(4):
            img, lab = phantom(rng, (16, 96, 96))
            pred = m(torch.from_numpy(normalise(img, norm)[None, None]).float()).argmax(1)[0].numpy()
            correct += int((pred == lab).sum())
            total += lab.size
            for c in range(1, len(DEMO_CLASSES)):
                a, b = pred == c, lab == c
                if b.sum():
                    dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    acc = correct / total
    print("demo: %d phantoms, %d iterations in %.0f s, loss %.3f, voxel accuracy %.3f, mean dice "
          "%.3f" % (len(pool), it, time.time() - t0, float(loss), acc, float(np.mean(dice))))
    img, lab = phantom(np.random.default_rng(79), (16, 32, 32))
    x = torch.from_numpy(normalise(img, norm)[None, None]).float()
    export(name, m, x, 13,
           "demo: a tiny 3D nnU-Net (3 stages: 8, 16, 32 features) trained for %d iterations "
           "(%.0f s) on generated CT phantoms at 5 x 2 x 2 mm; classes background (air), "
           "adipose tissue, soft tissue, bone; voxel accuracy %.3f on fresh phantoms; N, D, H, "
           "W free (sizes divisible by 4)" % (it, time.time() - t0, acc),
           out, dynamic={0: "N", 2: "D", 3: "H", 4: "W"},
           extra={"training": {"iterations": it, "seconds": round(time.time() - t0, 1),
                               "voxel_accuracy": round(acc, 4),
                               "mean_dice": round(float(np.mean(dice)), 4)}})
    sha = hashlib.sha256(open(os.path.join(out, name, "model.onnx"), "rb").read()).hexdigest()
    model_json = {
        "name": name,
        "version": "1.0.0",
        "description": "radpipe's demo: a tiny 3D U-Net trained for a minute on generated CT "
                       "phantoms (tests/models/gen_models.py) to label air, fat, soft tissue "
                       "and bone; not for clinical use",
        "modality": "CT",
        "labels": [
            {"value": 1, "name": "Adipose tissue",
             "category": {"code": "85756007", "scheme": "SCT", "meaning": "Tissue"},
             "type": {"code": "55603005", "scheme": "SCT", "meaning": "Adipose tissue"},
             "color": [255, 220, 90]},
            {"value": 2, "name": "Soft tissue",
             "category": {"code": "85756007", "scheme": "SCT", "meaning": "Tissue"},
             "type": {"code": "87784001", "scheme": "SCT", "meaning": "Soft tissue"},
             "color": [230, 110, 90]},
            {"value": 3, "name": "Bone",
             "category": {"code": "85756007", "scheme": "SCT", "meaning": "Tissue"},
             "type": {"code": "272673000", "scheme": "SCT", "meaning": "Bone"},
             "color": [120, 200, 255]},
        ],
        "normalization": norm,
        "spacing_mm": list(DEMO_SPACING),
        "patch_size": list(DEMO_PATCH),
        "mirroring": False,
        "onnx_sha256": sha,
    }
    with open(os.path.join(out, name, "model.json"), "w") as f:
        json.dump(model_json, f, indent=2)
        f.write("\n")


def gen_bench(out, features, patch):
    """An untrained nnU-Net-sized 3D U-Net for the benchmark (not committed): model.onnx,
    input.bin (one patch) and meta.json with the shapes."""
    torch.manual_seed(8)
    m = PlainConvUNet(3, 1, tuple(features), 3)
    init_weights(m, 81)
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(82))
    os.makedirs(out, exist_ok=True)
    m.eval()
    path = os.path.join(out, "model.onnx")
    torch.onnx.export(m, x, path, opset_version=13, input_names=["input"],
                      output_names=["output"], do_constant_folding=True)
    write_f32(os.path.join(out, "input.bin"), x.numpy())
    torch.save(m.state_dict(), os.path.join(out, "model.pt"))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"features": features, "patch": patch, "classes": 3,
                   "parameters": sum(p.numel() for p in m.parameters()),
                   "input": {"shape": list(x.shape)}}, f)


GENERATORS = {
    "unet3d-instnorm": gen_unet3d_instnorm,
    "unet2d-instnorm": gen_unet2d_instnorm,
    "unet3d-batchnorm": gen_unet3d_batchnorm,
    "ops3d": gen_ops3d,
    "upsample2d-opset9": gen_upsample2d_opset9,
    "argmax3d": gen_argmax3d,
}


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(root, "tests", "data", "models"))
    ap.add_argument("--only", default="")
    ap.add_argument("--train-iterations", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench")
    ap.add_argument("--features", default="32,64,128,256")
    ap.add_argument("--patch", default="64,96,96")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.bench:
        gen_bench(a.bench, [int(v) for v in a.features.split(",")],
                  [int(v) for v in a.patch.split(",")])
        return 0
    only = set(filter(None, a.only.split(",")))
    for name, fn in GENERATORS.items():
        if not only or name in only:
            fn(a.out)
    if not only or "demo-phantom-ct" in only:
        gen_demo(a.out, a.train_iterations)
    total = 0
    for dp, _, fs in os.walk(a.out):
        total += sum(os.path.getsize(os.path.join(dp, f)) for f in fs)
    print("total %.2f MiB in %s" % (total / 1048576, a.out))
    if total > 5 * 1048576:
        print("too large: the committed models must stay under 5 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
