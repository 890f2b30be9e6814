#!/usr/bin/env python
"""Throughput of the alternating trainer vs plain recognizer training, same backbone, same data.

Both sides train the same recognizer architecture (fresh copies, same initial weights) on the
same in-memory faces with the same hybrid masking (BDCT -> PPFR-FD -> MixUp with a per-sample k
in 2..6):

* plain:        a hand-written loop over a shuffling DataLoader: ``defense.release(x)`` (uniform random k) -> model ->
                mixed-label margin loss -> SGD step. Nothing else.
* alternating:  ``AlternatingTrainer`` with the strategy network choosing k from the context,
                ``n_pi`` REINFORCE steps after every ``n_fr`` recognizer steps (re-using the batch),
                the utility U measured every ``utility_every`` steps on a held-out set (the ``Utility``
                callback), and its bookkeeping (k histogram, running loss; no logging or checkpoint callbacks).

Timed rounds alternate between the two in ABBA order (so a change in machine load hits both), each round a
whole number of alternation cycles and utility periods; images/s is counted over the recognizer
steps (images trained on), and each round's pair gives one overhead. The last line is
``overhead: N %`` = extra time per trained image, the median of the per-round overheads.

    python scripts/bench_train.py                                   # synthetic-looking random faces
    python scripts/bench_train.py --data ../shared/data/faces/celeba_112 --model mobilefacenet
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def load_faces(path, n, seed=0):
    if path:
        from hybridmask.data.folder import FaceFolder
        ds = FaceFolder(path, min_images=2)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ds), generator=g)[:n].tolist()
        items = [ds[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([it[1] for it in items])
        _, y = torch.unique(y, return_inverse=True)
        return x, y
    g = torch.Generator().manual_seed(seed)
    ids = 50
    y = torch.arange(n) % ids
    base = torch.nn.functional.interpolate(torch.rand(ids, 3, 14, 14, generator=g) * 2 - 1, size=112,
                                           mode="bilinear", align_corners=False)
    x = (base[y] + 0.2 * torch.randn(n, 3, 112, 112, generator=g)).clamp(-1, 1)
    return x, y


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="face folder root/<id>/<img>.jpg (default: random faces)")
    p.add_argument("--images", type=int, default=640, help="training images held in memory")
    p.add_argument("--model", default="mobilefacenet")
    p.add_argument("--downsample", default="early", choices=["early", "late"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n-fr", type=int, default=4)
    p.add_argument("--n-pi", type=int, default=1)
    p.add_argument("--utility-every", type=int, default=20)
    p.add_argument("--utility-images", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="recognizer steps per timed round (whole cycles)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hybridmask.defenses import AdaptiveMask
    from hybridmask.models import MixedMarginLoss, create_head, create_model
    from hybridmask.policy import LagrangianReward, Reinforce, StrategyNet
    from hybridmask.train import AlternatingTrainer, PolicySetup, TrainOptions, Utility

    x, y = load_faces(args.data, args.images + args.utility_images)
    xu, yu = x[args.images:], y[args.images:]
    x, y = x[:args.images], y[:args.images]
    classes = int(y.max()) + 1
    torch.manual_seed(0)
    model = create_model(args.model, stem="freq", in_chans=189, grid=14, embedding_size=128,
                         downsample=args.downsample)
    head = create_head("arcface", 128, max(classes, int(yu.max()) + 1))
    models = {"plain": (model, head), "alternating": (copy.deepcopy(model), copy.deepcopy(head))}
    opts = {k: torch.optim.SGD(list(m.parameters()) + list(h.parameters()), lr=0.05, momentum=0.9)
            for k, (m, h) in models.items()}

    plain_def = AdaptiveMask(k_values=(2, 3, 4, 5, 6))      # no policy: uniform k per sample
    pm, ph = models["plain"]
    loss_fn = MixedMarginLoss(ph)

    def plain_step(xb, yb):
        masked, rec = plain_def.release(xb)
        loss = loss_fn(pm(masked), rec.mixed_labels(yb), rec.label_weights.float())
        opts["plain"].zero_grad(set_to_none=True)
        loss.backward()
        opts["plain"].step()

    policy = StrategyNet()
    am, ah = models["alternating"]
    setup = PolicySetup(policy, Reinforce(policy), LagrangianReward(policy.k_values, utility_target=0.5),
                        n_fr=args.n_fr, n_pi=args.n_pi)
    trainer = AlternatingTrainer(am, ah, opts["alternating"], torch.utils.data.TensorDataset(x, y),
                                 AdaptiveMask(policy=policy), policy=setup,
                                 callbacks=[Utility((xu, yu), every=args.utility_every)],
                                 options=TrainOptions(batch_size=args.batch, total_steps=10 ** 6))

    plain_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch,
                                               shuffle=True, drop_last=True)

    def plain_batches():
        while True:
            yield from plain_loader
    plain_it = plain_batches()

    def plain_round(n):
        for _ in range(n):
            plain_step(*next(plain_it))

    def alt_round(n):   # the trainer's own loop: recognizer + policy steps and the Utility callback
        trainer.fit(steps=trainer.global_step + n)

    rates = {"plain": [], "alternating": []}
    plain_round(2)
    alt_round(args.n_fr)           # warm-up, including one policy step
    print(f"{args.model} (freq stem, 189x14x14, downsample={args.downsample}), batch {args.batch}, "
          f"n_fr={args.n_fr}, n_pi={args.n_pi}, utility every {args.utility_every} steps on {xu.shape[0]} images, "
          f"{args.rounds} rounds x {args.steps} steps each, {torch.get_num_threads()} threads", flush=True)
    overheads = []
    for r in range(args.rounds):
        order = (("plain", plain_round), ("alternating", alt_round))
        for name, fn in (order if r % 2 == 0 else order[::-1]):   # ABBA: a load trend hits both sides alike
            t0 = time.perf_counter()
            fn(args.steps)
            dt = time.perf_counter() - t0
            rates[name].append(args.steps * args.batch / dt)
            print(f"  round {r + 1} {name:12s} {rates[name][-1]:8.1f} img/s", flush=True)
        overheads.append(100.0 * (rates["plain"][-1] / rates["alternating"][-1] - 1.0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"plain recognizer training:  {med['plain']:.1f} img/s (median)")
    print(f"alternating trainer:        {med['alternating']:.1f} img/s (median)")
    print(f"per-round overheads: {', '.join(f'{o:.1f}' for o in overheads)} %")
    # the median of the paired per-round ratios: a burst of background load inside one round moves one
    # pair, not the whole estimate (as the ratio of the two medians can)
    print(f"overhead: {statistics.median(overheads):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
