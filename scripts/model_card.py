#!/usr/bin/env python
"""Write the model card of a recognizer trained by ``hybridmask train`` into ``fr_models/`` and print
its index row (for ``fr_models/README.md``).

    python scripts/model_card.py outputs/celeba_ppfrfd [--out fr_models] [--command "hybridmask train ..."] [--name N]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from hybridmask.train.card import format_accuracy, read_run_results, recognizer_card
from hybridmask.utils import atomic_write, file_sha256


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder holding results.json and model.pt")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "fr_models"))
    p.add_argument("--command", default=None, help="the exact training command (default: from the run name)")
    p.add_argument("--name", default=None, help="the card's name (default: the run name; e.g. the benchmark's "
                   "student runs share their config's run name)")
    args = p.parse_args(argv)
    run = Path(args.run)
    model_path = run / "model.pt"
    try:
        results = read_run_results(run)
    except ValueError as e:
        raise SystemExit(str(e))
    if not model_path.is_file():
        raise SystemExit(f"missing {model_path}: is {run} a finished hybridmask train run?")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    digest = file_sha256(model_path)
    card = recognizer_card(results, digest, model_path.stat().st_size, commit=commit, command=args.command)
    name = args.name or results.get("run", run.name)
    out = Path(args.out) / f"{name}.md"
    with atomic_write(out, "w") as f:
        f.write(card)
    model = results.get("model", {})
    inp = "pixel 3x112x112" if model.get("stem") == "pixel" else f"freq {model.get('in_chans')}x{model.get('grid')}x{model.get('grid')}, {(results.get('defense') or {}).get('name')}"
    print(f"wrote {out}")
    print(f"| {name} | {model.get('name')}-{model.get('embedding_size')} | {inp} | celeba_112 ({results.get('identities')} ids, "
          f"{results.get('train_images')} images, {results.get('images_seen')} seen) | {format_accuracy(results, 'lfw', 'not measured')} | {format_accuracy(results, 'cfp_fp', 'not measured')} | "
          f"`{results.get('paths', {}).get('model')}` (SHA-256 {digest[:12]}...) | [{name}.md]({name}.md) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
