#!/usr/bin/env python
"""Publish the masking policy a ``hybridmask train`` run wrote into ``policies/``: the weights as
``policies/<name>.pt`` and its model card as ``policies/<name>.md``; prints the index row for
``policies/README.md``.

    python scripts/publish_policy.py outputs/celeba_freq_adaptive [--to policies] [--name NAME]

The file is checked before it is copied (it must load with ``load_policy``, i.e. through
``torch.load(weights_only=True)``, and hold no generator state), and both files are written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hybridmask.defenses import load_policy
from hybridmask.train.card import policy_card, read_run_results, run_k_hist
from hybridmask.utils import atomic_write, safe_torch_load
from hybridmask.utils.io import write_manifest_entry

ROOT = Path(__file__).resolve().parents[1]


def publish(run, to=None, name=None, command=None) -> dict:
    """Copy ``<run>/policy.pt`` to ``<to>/<name>.pt`` with a fresh card ``<to>/<name>.md``; returns
    ``{"policy": path, "card": path, "sha256": hex, "row": index row}``. ``ValueError`` naming the problem."""
    run = Path(run)
    results = read_run_results(run)
    src = run / "policy.pt"
    if not src.is_file():
        raise ValueError(f"missing {src}: run {results.get('run', run.name)!r} trained no policy "
                         f"(policy {results.get('policy')!r}; only trainable policies are saved)")
    policy, meta = load_policy(src, seed=0)
    blob = src.read_bytes()
    raw = safe_torch_load(src)
    secret = [f"{part}.{k}" for part in ("policy_state", "extra", "context") for k in (raw.get(part) or {})
              if "generator" in str(k).lower() or "rng" in str(k).lower()]
    if secret:
        raise ValueError(f"{src} holds generator state {secret}: refusing to publish secrets")
    name = str(name or results.get("run") or run.name)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad policy name {name!r}")
    to = Path(to) if to is not None else ROOT / "policies"
    dst, card = to / f"{name}.pt", to / f"{name}.md"
    with atomic_write(dst, "wb") as f:
        f.write(blob)
    digest = write_manifest_entry(dst)   # policies/SHA256SUMS: loading verifies it
    try:
        shown = dst.resolve().relative_to(ROOT)
    except ValueError:
        shown = dst
    note = (f"`{shown}` ({len(blob):,} bytes, SHA-256 `{digest[:16]}...`), published from "
            f"`{results.get('paths', {}).get('policy', src)}` by `scripts/publish_policy.py`")
    with atomic_write(card, "w") as f:
        f.write(policy_card(results, policy, file_note=note))
    cfg = results.get("config", {})
    data = (cfg.get("data") or {}).get("train") or "embedded synthetic faces"
    steps = (results.get("train") or {}).get("steps")
    bs = (cfg.get("data") or {}).get("batch_size")
    ver = results.get("verification") or {}
    acc = ", ".join(f"{t} {100 * m['accuracy']:.2f}" for t, m in ver.items() if m.get("accuracy") is not None)
    khist = "/".join(f"{100 * v:.0f}" for v in run_k_hist(results).values())
    command = command or f"hybridmask train --config configs/{name}.yaml"
    row = (f"| {name} | [`{name}.pt`]({name}.pt) | `{command}` | {data} | "
           f"{steps} steps x {bs} | k={'/'.join(str(k) for k in policy.k_values)}: {khist} % | "
           f"{acc or 'not measured'} | [{name}.md]({name}.md) |")
    return {"policy": str(dst), "card": str(card), "sha256": digest, "row": row, "meta": meta}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder holding results.json and policy.pt")
    p.add_argument("--to", default=None, help="destination folder (default: the repository's policies/)")
    p.add_argument("--name", default=None, help="published name (default: the run name)")
    p.add_argument("--command", default=None,
                   help="the command that trained it, for the index row (default: hybridmask train --config "
                        "configs/<name>.yaml)")
    args = p.parse_args(argv)
    try:
        out = publish(args.run, args.to, args.name, args.command)
    except ValueError as e:
        raise SystemExit(f"publish_policy: {e}")
    print(f"wrote {out['policy']} (SHA-256 {out['sha256']})")
    print(f"wrote {out['card']}")
    print(out["row"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
