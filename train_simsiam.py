"""Deep non-contrastive SSL without an EMA target (SimSiam-style): shared weights, stop-gradient.

The targets are the online network's own outputs of the same forward pass, detached; there is no
second network. Everything else (data, model, loop, checkpoints, metrics) is train_byol.py's:
this file only holds the presets (SGD lr 0.1 x batch/256, momentum 0.9, tau_c = 0.5; SPEC 6).

The paper's grid without an EMA target:

    python train_simsiam.py simsiam            --dataset cifar10     # MLP predictor, cosine loss, wd 1e-5
    python train_simsiam.py directpred         --dataset cifar10     # closed-form W_P = C^0.5, wd 1e-4
    python train_simsiam.py directcopy         --dataset cifar10     # closed-form W_P = C / max + 0.25 I, wd 1e-4
    python train_simsiam.py isoloss            --dataset cifar10     # IsoLoss, DirectPred spectrum, wd 1e-4
    python train_simsiam.py isoloss-directcopy --dataset cifar10     # IsoLoss, DirectCopy spectrum, wd 1e-4
    python train_simsiam.py linear             --dataset cifar10     # learnable linear predictor

and the same with --dataset cifar100, --dataset stl10, --dataset tinyimagenet --data-dir
data/tiny-imagenet-200. The collapse ablations of SPEC section 1 (watch std_normalized_z in
metrics.jsonl fall towards 0):

    python train_simsiam.py no-predictor  --dataset cifar10
    python train_simsiam.py no-stop-grad  --dataset cifar10

Laptop trial (minutes on two CPU cores; any small DIR/train/<class>/* + DIR/val/<class>/* tree):

    python train_simsiam.py cpu-demo --data-dir data/imagenette2-160

Several GPUs: torchrun --standalone --nproc_per_node 8 train_simsiam.py isoloss --dataset cifar100

Run directory, resuming and errors: as train_byol.py (python train_byol.py --help).
"""

import dataclasses

import train_byol
from train_byol import Args

# No EMA target, SGD, and the faster running correlation matrix of the released config.
_BASE = Args(name="simsiam", ema=False, optimizer="sgd", lr=0.1, tau_c=0.5)
_CLOSED = dict(weight_decay=1e-4)
PRESETS = {
    "simsiam": ("SimSiam: MLP predictor, cosine loss, shared weights, SGD.", _BASE),
    "directpred": ("DirectPred without EMA: closed-form predictor W_P = C^0.5 (normalised).",
                   dataclasses.replace(_BASE, name="simsiam-directpred", predictor="directpred", **_CLOSED)),
    "directcopy": ("DirectCopy without EMA: closed-form predictor W_P = C / max(s) + 0.25 I.",
                   dataclasses.replace(_BASE, name="simsiam-directcopy", predictor="directcopy", **_CLOSED)),
    "isoloss": ("IsoLoss without EMA, DirectPred spectrum (the paper's claim: stable without the target).",
                dataclasses.replace(_BASE, name="simsiam-isoloss", predictor="directpred", isoloss=True, **_CLOSED)),
    "isoloss-directcopy": ("IsoLoss without EMA, DirectCopy spectrum.",
                           dataclasses.replace(_BASE, name="simsiam-isoloss-directcopy", predictor="directcopy",
                                               isoloss=True, **_CLOSED)),
    "linear": ("Learnable linear predictor without EMA; logs the eigenvector alignment of W with C.",
               dataclasses.replace(_BASE, name="simsiam-linear", predictor="linear")),
    "no-predictor": ("Ablation: no predictor (p = z); collapses.",
                     dataclasses.replace(_BASE, name="simsiam-no-predictor", predictor="none")),
    "no-stop-grad": ("Ablation: the gradient also flows through the targets; collapses.",
                     dataclasses.replace(_BASE, name="simsiam-no-stop-grad", stop_grad=False)),
    "cpu-demo": ("Laptop trial: IsoLoss without EMA at a quarter width on a small ImageFolder, two CPU cores.",
                 dataclasses.replace(train_byol.PRESETS["cpu-demo"][1], name="simsiam-cpu-demo", ema=False,
                                     optimizer="sgd", lr=0.1, tau_c=0.5)),
}

if __name__ == "__main__":
    train_byol.main(PRESETS, doc=__doc__)
