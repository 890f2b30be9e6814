#!/usr/bin/env python
"""Is a face's re-identifiability a property of the face, and can the policy see it? (issue 14, the ladder)

Reads the per-victim scores that the benchmark's attack caches hold (``per_image``: the SFace rank of the true
identity and the identity similarity of each victim's reconstruction) for several maskings attacked with the
same victims, and prints:

* per masking and attack: rank-1, how many of its hits are also hits of the reference masking, and the
  correlation of the per-victim identity similarity with the reference's (high = the same faces fall whatever
  the masking);
* for each ``--policies`` file: the mean and the per-face standard deviation of its action probabilities on the
  victims (a policy that adapts to the face has a spread well above 0);
* the correlation of each of the policy's context features (``hybridmask.policy.context_features``, read from
  the victims' full-channel masking) with the reference's per-victim identity similarity (high = the policy
  could learn which faces need more masking).

    OMP_NUM_THREADS=1 python scripts/perface_attackability.py --data ../shared/data/faces

Defaults: the student budget's caches (``outputs/benchmark_student/attacks``), reference ``low15`` demix.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEYS = "ppfrfd-drop_low15-shuffle_sample,ppfrfd-low15-subset60,ppfrfd-low15-qk2,adaptive-ladder"


def per_victim(cache_dir: str, key: str, attack: str):
    """(hit (n,) bool, identity similarity (n,)) of the newest cache of ``key`` holding ``attack``; None if none."""
    for d in sorted(glob.glob(os.path.join(cache_dir, f"{key}-*")), key=os.path.getmtime, reverse=True):
        try:
            res = json.loads(Path(d, "results.json").read_text())
        except (OSError, ValueError):
            continue
        a = (res.get("attacks") or {}).get(attack)
        if a and "per_image" in a:
            pi = a["per_image"]
            return np.asarray(pi["rank"]) == 1, np.asarray(pi["identity_similarity"], dtype=float)
    return None


def corr(a, b) -> float:
    if np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", str(REPO.parent / "shared" / "data" / "faces")))
    p.add_argument("--caches", default="outputs/benchmark_student/attacks")
    p.add_argument("--keys", default=KEYS, help="comma-separated benchmark/frontier keys attacked with the same victims")
    p.add_argument("--attacks", default="cgan_whitebox,demix")
    p.add_argument("--reference", default="ppfrfd-drop_low15-shuffle_sample:demix", help="KEY:ATTACK")
    p.add_argument("--n-victims", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the benchmark's seed (which victims)")
    p.add_argument("--drop", default="low15", help="the channel drop of the masking the context is read from")
    p.add_argument("--u", type=int, default=8)
    p.add_argument("--policies", default="policies/celeba_adaptive_ladder_student.pt,"
                                         "policies/celeba_adaptive_low15_attacker_student.pt,policies/celeba_freq_adaptive.pt",
                   help="comma-separated policy files whose per-face spread is printed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rk, ra = args.reference.split(":")
    ref = per_victim(args.caches, rk, ra)
    if ref is None:
        raise SystemExit(f"no cached {ra} result of {rk} under {args.caches}")
    ref_hit, ref_sim = ref
    print(f"reference: {rk} / {ra}: rank-1 {100 * ref_hit.mean():.1f} % of {len(ref_hit)} victims\n")
    print("| masking | attack | rank-1 % | hits also hits of the reference | corr. of identity similarity |")
    print("|---|---|---|---|---|")
    for key in [k.strip() for k in args.keys.split(",") if k.strip()]:
        for a in [x.strip() for x in args.attacks.split(",") if x.strip()]:
            got = per_victim(args.caches, key, a)
            if got is None or len(got[0]) != len(ref_hit):
                continue
            h, s = got
            print(f"| {key} | {a} | {100 * h.mean():.1f} | {int((h & ref_hit).sum())} / {int(h.sum())} | "
                  f"{corr(s, ref_sim):.2f} |")
    from hybridmask.attacks.data import build_attack_data
    from hybridmask.freq import HybridMask
    from hybridmask.policy import context_features
    data = build_attack_data(args.data, "lfw", n_victims=args.n_victims, n_distractors=64, n_public=16,
                             seed=args.seed, progress=False)
    hm = HybridMask(u=args.u, drop=args.drop, seed=0)
    with torch.no_grad():
        ctx = context_features(hm.encode(data.victims), 0.0, 1.0).numpy()
    from hybridmask.defenses import load_defense
    print("\n| policy | k values | mean probability per k | per-face std per k |")
    print("|---|---|---|---|")
    for f in [x.strip() for x in args.policies.split(",") if x.strip()]:
        d = load_defense(f, seed=0)
        with torch.no_grad():
            pr = d.policy.probs(d.context(d.mask.front(data.victims, d.mask.face_draw(len(data.victims)))))
        print(f"| {Path(f).name} | {list(d.policy.k_values)} | {' / '.join(f'{v:.3f}' for v in pr.mean(0).tolist())} | "
              f"{' / '.join(f'{v:.4f}' for v in pr.std(0).tolist())} |")
    print("\n| context feature | corr. with the reference's identity similarity |")
    print("|---|---|")
    for j in range(ctx.shape[1]):
        print(f"| {j} | {corr(ctx[:, j], ref_sim):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
