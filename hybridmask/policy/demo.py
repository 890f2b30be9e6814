"""Policy demos with measured numbers.

``python -m hybridmask.policy.demo toy`` plays the synthetic masking game
(:class:`~hybridmask.policy.ToyMaskingGame`) with and without the utility constraint and prints
the learned k distribution, the utility and the multiplier: with the FR loss alone the policy
collapses to k=6; with the constraint it settles on a mix that meets the utility target.

``python -m hybridmask.policy.demo features --faces DIR`` masks real aligned faces with
``HybridMask`` at k = 1..6 and reports what the context features see of the mixing degree (per-k
feature means and the accuracy of a nearest-centroid classifier that predicts k from the
features on held-out faces) and how long :func:`context_features` takes per batch.

Both expose ``add_arguments(parser)`` / ``run(args) -> int`` for the ``hybridmask`` CLI.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import List

import torch

from .features import FEATURE_NAMES, context_features
from .reinforce import Reinforce
from .reward import LagrangianReward
from .strategy import K_VALUES, StrategyNet
from .toy import ToyMaskingGame


def play_toy(constraint: bool, target: float = 0.75, steps: int = 250, batch: int = 32, seed: int = 0,
             lr: float = 3e-3, entropy_coef: float = 0.1, **reward_kw) -> dict:
    """Train a :class:`StrategyNet` on the toy game; returns the final k distribution, the mean
    utility over the last 30 % of steps, the multiplier and the entropy."""
    game = ToyMaskingGame(seed=seed)
    torch.manual_seed(seed)
    pol = StrategyNet(hidden=32, seed=seed + 1)
    pol.calibrate(game.contexts(256, 2.0, 0.5))
    rl = Reinforce(pol, lr=lr, entropy_coef=entropy_coef)
    rw = LagrangianReward(utility_target=target, constraint=constraint, **reward_kw)
    utils, running = [], 0.0
    for t in range(steps):
        ctx = game.contexts(batch, running, t / steps)
        k, _, lp = pol.act(ctx)
        fr, u = game.play(k)
        running = 0.9 * running + 0.1 * float(fr.mean())
        rl.update(lp, rw(fr, k), entropy=pol.dist(ctx).entropy())
        rw.update_multiplier(u)
        utils.append(u)
    p = pol.probs(game.contexts(512, running, 1.0)).mean(0)
    tail = utils[-max(1, steps * 3 // 10):]
    return {"probs": [float(x) for x in p], "utility": sum(tail) / len(tail), "mu": rw.mu,
            "entropy": float(-(p * p.clamp_min(1e-12).log()).sum()),
            "mean_k": float((p * torch.tensor(K_VALUES, dtype=p.dtype)).sum())}


def _fmt(res: dict) -> str:
    probs = " ".join(f"k{k}={p:.2f}" for k, p in zip(K_VALUES, res["probs"]))
    return (f"{probs} | mean k {res['mean_k']:.2f} | entropy {res['entropy']:.2f} (max {math.log(5):.2f}) | "
            f"utility {res['utility']:.3f} | mu {res['mu']:.2f}")


def _run_toy(args) -> int:
    game = ToyMaskingGame()
    pure = "  ".join(f"k{k}: {u:.3f}" for k, u in game.pure_utilities().items())
    print(f"toy game: utility if every sample used one k: {pure}; target {args.target}")
    for seed in range(args.seeds):
        t0 = time.time()
        free = play_toy(False, args.target, args.steps, seed=seed)
        con = play_toy(True, args.target, args.steps, seed=seed, mu_kp=args.mu_kp, mu_lr=args.mu_lr)
        print(f"seed {seed}  FR loss only : {_fmt(free)}")
        print(f"seed {seed}  constrained  : {_fmt(con)}   ({time.time() - t0:.1f} s)", flush=True)
    return 0


def _load_faces(root: Path, n: int) -> torch.Tensor:
    from ..data.image import is_image_file, load_image
    files: List[Path] = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise FileNotFoundError(f"no face images under {root}")
    step = max(1, len(files) // n)
    return torch.stack([load_image(p) for p in files[::step][:n]])


def _run_features(args) -> int:
    from ..freq import HybridMask
    faces = _load_faces(Path(args.faces), args.n)
    n = faces.shape[0]
    hm = HybridMask(u=args.u, drop="dc", seed=0)
    feats, labels, secs = [], [], []
    for k in range(1, 7):
        with torch.no_grad():
            masked, _ = hm(faces, k=k)
        t0 = time.perf_counter()
        ctx = context_features(masked, 0.0, 0.0)
        secs.append(time.perf_counter() - t0)
        feats.append(ctx[:, :10].double())  # drop the two broadcast training scalars
        labels.append(torch.full((n,), k))
    X, y = torch.cat(feats), torch.cat(labels)
    print(f"{n} faces from {args.faces}, HybridMask(u={args.u}, drop='dc'), masked shape {tuple(masked.shape)}")
    print("per-k feature means:")
    print("   k  " + " ".join(f"{nm:>14s}" for nm in FEATURE_NAMES[:10]))
    for k in range(1, 7):
        m = X[y == k].mean(0)
        print(f"  {k:2d}  " + " ".join(f"{v:14.3f}" for v in m.tolist()))
    # nearest centroid on standardised features, train on even-indexed faces, test on odd
    face_idx = torch.arange(n).repeat(6)
    tr, te = face_idx % 2 == 0, face_idx % 2 == 1
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp_min(1e-6)
    Z = (X - mu) / sd
    ks = list(range(1, 7))
    cents = torch.stack([Z[tr & (y == k)].mean(0) for k in ks])
    pred = torch.tensor(ks)[torch.cdist(Z[te], cents).argmin(1)]
    acc = float((pred == y[te]).double().mean())
    within1 = float(((pred - y[te]).abs() <= 1).double().mean())
    print(f"nearest-centroid k prediction from the context on held-out faces: accuracy {acc:.3f} "
          f"(chance {1 / 6:.3f}), within +-1: {within1:.3f}")
    print(f"context_features time per batch of {n}: {1000 * sum(secs) / len(secs):.1f} ms "
          f"({torch.get_num_threads()} threads)")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("toy", help="collapse demo on the synthetic game")
    t.add_argument("--target", type=float, default=0.75, help="utility target")
    t.add_argument("--steps", type=int, default=250)
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--mu-lr", type=float, default=0.5)
    t.add_argument("--mu-kp", type=float, default=10.0)
    f = sub.add_parser("features", help="what the context sees on real masked faces")
    f.add_argument("--faces", required=True, help="folder of aligned 112x112 faces (searched recursively)")
    f.add_argument("--n", type=int, default=128, help="number of faces (<= 128 per batch)")
    f.add_argument("--u", type=int, default=1, help="BDCT upsampling factor")


def run(args) -> int:
    if args.what == "toy":
        torch.set_num_threads(1)   # thousands of tiny ops: threads only add synchronisation
        return _run_toy(args)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not 2 <= args.n <= 128:
        raise ValueError(f"--n must be in [2, 128], got {args.n}")
    return _run_features(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridmask.policy.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
