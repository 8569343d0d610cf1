"""Quality figures of generated samples under the pinned protocol (common/metrics/protocol.yaml).

MNIST: Frechet distance on the shipped classifier's penultimate features against the training
reference, class accuracy of conditional samples, precision / recall, with the real-vs-real
floor (held-out digits vs the reference, same sample count) reported beside every FD.
2-D toys: sliced Wasserstein distance to held-out points and mode coverage.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from common.metrics.fd import feature_stats, frechet_distance, mode_coverage, precision_recall, sliced_wasserstein
from common.teachers.embedded import build_net, file_sha256, load_weights

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_FILE = Path(__file__).parent / "protocol.yaml"


def protocol(name: str = "mnist") -> dict:
    return OmegaConf.to_container(OmegaConf.load(PROTOCOL_FILE))[name]


def _repo_path(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else ROOT / p


@lru_cache(maxsize=2)
def load_classifier(path: str | None = None):
    path = _repo_path(path or protocol()["classifier"])
    ckpt = load_weights(path)
    net = build_net(ckpt["net"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval().requires_grad_(False), ckpt.get("meta", {})


@torch.no_grad()
def classify(x: torch.Tensor, classifier=None, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features, predicted labels) of images in [-1, 1]."""
    net = classifier or load_classifier()[0]
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = net.features(x[i:i + batch_size].float())
        feats.append(f.double().numpy())
        preds.append(net.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(n) % num_classes


def build_reference(out: str | None = None) -> dict:
    """Compute the reference statistics and the real-vs-real floor; write them to the protocol's file."""
    from common.data.embedded import load_tensors

    p = protocol()
    ref_x, _ = load_tensors(p["dataset"], p["reference_split"])
    held_x, held_y = load_tensors(p["dataset"], p["floor_split"])
    if len(held_x) != p["num_samples"]:
        raise ValueError(f"the floor split has {len(held_x)} samples, the protocol generates {p['num_samples']}")
    ref_f, _ = classify(ref_x)
    held_f, held_pred = classify(held_x)
    mu, sigma = feature_stats(ref_f)
    fd_floor = frechet_distance(*feature_stats(held_f), mu, sigma)
    prec, rec = precision_recall(ref_f, held_f, p["pr_k"])
    out = _repo_path(out or p["reference"])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, mu=mu, sigma=sigma, features=ref_f.astype(np.float32), fd_floor=fd_floor,
             floor_precision=prec, floor_recall=rec, heldout_accuracy=float((held_pred == held_y.numpy()).mean()),
             classifier_sha256=file_sha256(_repo_path(p["classifier"])))
    return {"fd_floor": fd_floor, "floor_precision": prec, "floor_recall": rec,
            "heldout_accuracy": float((held_pred == held_y.numpy()).mean())}


@lru_cache(maxsize=2)
def load_reference(path: str | None = None) -> dict:
    p = protocol()
    path = _repo_path(path or p["reference"])
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path} (build with "
                                f"`python launchers/evaluate.py --build-reference`)")
    ref = dict(np.load(path))
    expected = file_sha256(_repo_path(p["classifier"]))
    if str(ref["classifier_sha256"]) != expected:
        raise ValueError(f"{path} was computed with another classifier than {p['classifier']}; rebuild it")
    return ref


def evaluate_images(x: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """FD (with floor), accuracy against the conditioning labels, precision and recall."""
    p = protocol()
    ref = load_reference()
    feats, pred = classify(x)
    fd = frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"])
    prec, rec = precision_recall(ref["features"], feats, p["pr_k"])
    out = {"fd": fd, "fd_floor": float(ref["fd_floor"]), "fd_over_floor": fd / float(ref["fd_floor"]),
           "precision": prec, "recall": rec, "num_samples": len(x)}
    if labels is not None:
        out["accuracy"] = float((pred == labels.cpu().numpy()).mean())
    return out


def evaluate_points(x: torch.Tensor, name: str) -> dict:
    from common.data.embedded import load_tensors
    from data.build_toy2d import MODE_RADIUS, MODES

    p = protocol("toy2d")
    ref, _ = load_tensors(name, "heldout")
    cov = mode_coverage(x, MODES[name], MODE_RADIUS[name], p["min_mode_share"], chebyshev=name == "checkerboard")
    return {"swd": sliced_wasserstein(x, ref, p["swd_projections"], p["seed"]), **cov, "num_samples": len(x)}


def protocol_for(dataset: str) -> dict:
    """The protocol that measures samples of ``dataset`` (``mnist``; the 2-D toys share ``toy2d``)."""
    all_ = OmegaConf.to_container(OmegaConf.load(PROTOCOL_FILE))
    for name, p in all_.items():
        if dataset == name or dataset in p.get("datasets", ()):
            return p
    raise ValueError(f"no evaluation protocol for data set {dataset!r}; protocols: {sorted(all_)}")


def evaluate(x: torch.Tensor, labels: torch.Tensor | None, dataset: str) -> dict:
    """The metric set of ``dataset``'s protocol: images (FD, accuracy, precision, recall) or 2-D points
    (SWD, mode coverage)."""
    kind = protocol_for(dataset)["kind"]
    if kind == "images":
        return evaluate_images(x, labels)
    if kind == "points":
        return evaluate_points(x, dataset)
    raise ValueError(f"protocol kind {kind!r} has no metric set")


def teacher_best(dataset: str = "mnist") -> dict | None:
    """The embedded teacher's best guided FD under the protocol (``teacher_best`` in protocol.yaml)."""
    return protocol_for(dataset).get("teacher_best")
