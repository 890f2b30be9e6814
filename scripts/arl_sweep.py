#!/usr/bin/env python
"""ARL privacy/utility sweep on real CelebA faces: lambda1 = 0 (no adversary) vs lambda1 > 0 with
lambda2 in {0, 1, 2, 5}.

1. One shared warm-up (Enc+f on the utility alone, then the decoder warm-up) so every run starts
   from the same encoder.
2. One run per (lambda1, lambda2): ``train.epochs`` adversarial epochs from that start, then a FRESH
   attacker decoder (+ PatchGAN, same L_a) trained on public faces against the frozen encoder, and
   the metrics (MCC or identity accuracy; SSIM, PSNR, SFace face similarity of the attacker; LDA;
   feature-level attack). Runs go to ``--jobs`` worker processes (one torch thread each).
3. ``<out>/results.md`` (table + setup + the paper's numbers), ``<out>/tradeoff.png``,
   ``<out>/results.json``, t-SNE plots of the baseline and the strongest run (example reconstructions,
   which show real faces, stay in the run folders).

    python scripts/arl_sweep.py --config configs/arl_attr.yaml --out docs/arl
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER = {"baseline": {"mcc": 0.641, "face_sim": 0.551, "ssim": 0.231, "psnr": 13.74},
         "arl": {"mcc": 0.612, "face_sim": 0.515, "ssim": 0.221, "psnr": 13.42}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "arl_attr.yaml"), help="ARL config (method: arl)")
    p.add_argument("--out", default=str(REPO / "docs" / "arl"), help="where results.md / tradeoff.png go")
    p.add_argument("--runs-dir", default=str(REPO / "outputs" / "arl_sweep"), help="run folders (checkpoints)")
    p.add_argument("--lambda1", type=float, default=1.0, help="the lambda1 > 0 of the adversarial runs")
    p.add_argument("--lambda2", type=float, nargs="+", default=[0.0, 1.0, 2.0, 5.0])
    p.add_argument("--warmup-epochs", type=int, default=None, help="override train.warmup_epochs")
    p.add_argument("--decoder-warmup-steps", type=int, default=None, help="override train.decoder_warmup_steps")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs (adversarial epochs)")
    p.add_argument("--attack-steps", type=int, default=None, help="override attack.steps")
    p.add_argument("--feature-attack-steps", type=int, default=None, help="override attack.feature_attack_steps")
    p.add_argument("--max-public-images", type=int, default=None, help="override data.max_public_images")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for the runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=None, help="override seed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.md / tradeoff.png from <out>/results.json (adds the SFace similarity of "
                        "the resolution ceiling when it is missing)")
    p.add_argument("--noise-seeds", type=int, nargs="*", default=[],
                   help="with --report-only: retrain the baseline's fresh attacker with these extra seeds (one "
                        "process each) to measure the attacker's seed-to-seed spread")
    return p.parse_args(argv)


def _attack_with_seed(job):
    """Fresh attacker with another seed against a finished run's encoder -> attack metrics."""
    ckpt, base, seed = job
    import torch
    torch.set_num_threads(1)
    from hybridmask.attacks.harness import default_embedder
    from hybridmask.attacks.metrics import embed
    from hybridmask.data.celeba import prepare_data, to_float
    from hybridmask.models.perceptual import build_perceptual
    from hybridmask.train.arl import load_arl_model
    from hybridmask.train.arl_eval import evaluate_privacy, train_fresh_attacker
    net, _ = load_arl_model(ckpt)
    _, pub, test, _ = prepare_data(base["data"], int(base["seed"]), progress=False)
    at = base["attack"]
    g = build_perceptual(**{k: base["perceptual"][k] for k in ("kind", "vgg_weights", "recognizer", "seed")}) \
        if at["mu2"] > 0 else None
    dec = train_fresh_attacker(net, g, pub, "cpu", int(at["steps"]), int(at["batch_size"]), float(at["mu1"]),
                               float(at["mu2"]), float(at["lr"]), int(seed), progress=False)
    sf = default_embedder()
    res, _ = evaluate_privacy(net, dec, test, "cpu", 64, sf, embed(sf, to_float(test.images)))
    return dict(res, seed=int(seed))


def ceiling_face_sim(base) -> dict:
    """SSIM / PSNR / SFace similarity of original -> input_size -> 112 on the sweep's test faces."""
    from hybridmask.attacks.harness import default_embedder
    from hybridmask.data.celeba import prepare_data, to_float
    from hybridmask.models.arl_nets import OUT_SIZE
    from hybridmask.models.blocks import resize
    from hybridmask.train.arl_eval import image_scores
    data = dict(base["data"], max_public_images=2)
    _, _, test, _ = prepare_data(data, int(base["seed"]), progress=False)
    orig = to_float(test.images)
    ceil = resize(resize(orig, base["model"]["input_size"]), OUT_SIZE).clamp(-1, 1)
    return image_scores(ceil, orig, default_embedder())


def report_only(args) -> int:
    from hybridmask.train.arl import merge_config
    from hybridmask.utils import atomic_write
    out = Path(args.out)
    summary = json.loads((out / "results.json").read_text())
    st = summary["settings"]
    base = merge_config({k: st[k] for k in ("data", "model", "train", "attack", "perceptual", "seed") if k in st})
    if args.noise_seeds:
        run0 = summary["runs"][0]
        jobs = [(run0["checkpoint"], base, sd) for sd in args.noise_seeds]
        with mp.get_context("spawn").Pool(min(len(jobs), max(1, args.jobs))) as pool:
            extra = pool.map(_attack_with_seed, jobs, chunksize=1)
        summary["attacker_seed_spread"] = {"run": run0["name"],
                                           "attacks": [dict(run0["attack"], seed=base["attack"]["seed"])] + extra}
    if "face_sim" not in summary["runs"][0]["resolution_ceiling"]:
        ceil = ceiling_face_sim(base)
        for r in summary["runs"]:
            r["resolution_ceiling"] = ceil
    with atomic_write(out / "results.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    write_markdown(out / "results.md", summary, base)
    plot_tradeoff(out / "tradeoff.png", summary["runs"], base["data"]["task"])
    return 0


def _run(cfg):
    import torch
    torch.set_num_threads(int(cfg["threads"]))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    from hybridmask.train.arl import train_arl
    t = time.time()
    r = train_arl(cfg)
    r["wall_s"] = round(time.time() - t, 1)
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch
    torch.set_num_threads(args.threads)
    if args.report_only:
        return report_only(args)
    from hybridmask.train.arl import merge_config
    from hybridmask.train.config import read_config_file

    base = merge_config(read_config_file(args.config))
    base["threads"] = args.threads
    base["progress"] = not args.no_progress and args.jobs == 1
    if args.seed is not None:
        base["seed"] = args.seed
    tr = base["train"]
    for key, val in (("warmup_epochs", args.warmup_epochs), ("decoder_warmup_steps", args.decoder_warmup_steps),
                     ("epochs", args.epochs)):
        if val is not None:
            tr[key] = val
    if args.attack_steps is not None:
        base["attack"]["steps"] = args.attack_steps
    if args.feature_attack_steps is not None:
        base["attack"]["feature_attack_steps"] = args.feature_attack_steps
    if args.max_public_images is not None:
        base["data"]["max_public_images"] = args.max_public_images
    runs_dir, out = Path(args.runs_dir), Path(args.out)
    runs_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # 1. shared warm-up -------------------------------------------------------------------------
    warm = copy.deepcopy(base)
    warm.update(name="warmup", output_dir=str(runs_dir / "warmup"))
    warm["loss"].update(lambda1=0.0, lambda2=0.0)
    warm["train"].update(epochs=0, resume=False, init_checkpoint=None)
    warm["eval"]["enabled"] = False
    logging.info("shared warm-up: %d utility epochs + %d decoder steps", tr["warmup_epochs"], tr["decoder_warmup_steps"])
    rw = _run(warm)
    t_warm = time.time() - t0
    logging.info("warm-up done in %.0f s", t_warm)

    # 2. the runs --------------------------------------------------------------------------------
    grid = [(0.0, 0.0)] + [(args.lambda1, l2) for l2 in args.lambda2]
    cfgs = []
    for l1, l2 in grid:
        c = copy.deepcopy(base)
        name = f"l1_{l1:g}_l2_{l2:g}"
        c.update(name=name, output_dir=str(runs_dir / name))
        c["loss"].update(lambda1=l1, lambda2=l2)
        c["train"].update(warmup_epochs=0, decoder_warmup_steps=0, init_checkpoint=rw["checkpoint"], resume=False)
        c["eval"]["tsne"] = base["data"]["task"] == "attributes"
        cfgs.append(c)
    t1 = time.time()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_run, cfgs, chunksize=1)
    else:
        results = [_run(c) for c in cfgs]
    t_runs = time.time() - t1
    if base["eval"]["sface"] and "face_sim" not in results[0]["resolution_ceiling"]:
        ceil = ceiling_face_sim(base)
        for r in results:
            r["resolution_ceiling"] = ceil
    total = time.time() - t0

    # 3. report ----------------------------------------------------------------------------------
    summary = {"config": str(args.config), "grid": grid, "warmup_wall_s": round(t_warm, 1),
               "runs_wall_s": round(t_runs, 1), "total_wall_s": round(total, 1), "jobs": args.jobs,
               "threads_per_job": args.threads, "settings": {k: base[k] for k in ("model", "train", "attack", "data", "perceptual", "seed")},
               "runs": results, "paper": PAPER}
    from hybridmask.utils import atomic_write
    with atomic_write(out / "results.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
    write_markdown(out / "results.md", summary, base)
    plot_tradeoff(out / "tradeoff.png", results, base["data"]["task"])
    strongest = max(results[1:], key=lambda r: r["loss"]["lambda2"])
    for tag, r in (("baseline", results[0]), ("arl", strongest)):
        run_dir = Path(r["checkpoint"]).parent
        for fname in ("tsne.png",):  # examples.png shows real faces: it stays in the run folder, out of docs/
            if (run_dir / fname).is_file():
                shutil.copyfile(run_dir / fname, out / f"{fname[:-4]}_{tag}.png")
    logging.info("sweep done in %.0f s -> %s", total, out)
    return 0


def _util(r):
    u = r["utility"]
    return u["mcc"] if "mcc" in u else u["identity_accuracy"]


def write_markdown(path: Path, s, base) -> None:
    from hybridmask.utils import atomic_write
    task = base["data"]["task"]
    uname = "MCC" if task == "attributes" else "id. acc."
    runs = s["runs"]
    d = runs[0]["data"]
    m = base["model"]
    lines = [
        "# ARL privacy / utility sweep (real CelebA faces)",
        "",
        "Generated by `scripts/arl_sweep.py` (" + f"`--config {Path(s['config']).name}`" + "). Every run starts from one "
        "shared warm-up (encoder + utility head trained on the utility alone, then the decoder), trains "
        f"{base['train']['epochs']} adversarial epochs with the given lambdas, and is then attacked by a **fresh** "
        f"decoder (+ PatchGAN, same L_a with mu1={base['attack']['mu1']}, mu2={base['attack']['mu2']}) trained for "
        f"{base['attack']['steps']} steps on public faces against the frozen encoder.",
        "",
        f"* data: task `{task}`; private (Enc/f training) {d['num_private']} images of {d['private_identities']} "
        f"identities; test victims {d['num_test']} images of {d['test_identities']} identities; public (decoder, "
        f"attacker) {d['num_public']} images of {d['public_identities']} other identities",
        f"* model: {m['arch']} width {m['width']} at {m['input_size']}x{m['input_size']} (faces resized from 112), "
        f"z = `{m['feature_layer']}` {tuple(runs[0]['z_shape'])}; warm-up {base['train']['warmup_epochs']} epochs + "
        f"{base['train']['decoder_warmup_steps']} decoder steps; batch {base['train']['batch_size']}",
        f"* perceptual network g: {runs[0]['perceptual']}",
        f"* metrics on the test victims: utility ({uname}); SSIM (scikit-image, 11x11 Gaussian window, sigma 1.5, "
        "on [-1, 1] images: the attack harness's SSIM) / PSNR and face similarity (cosine "
        "of SFace embeddings, an independent recognizer) between the attacker's reconstruction (resized to "
        "112x112) and the original; LDA = between/within-class scatter of z over identities; feature sim = "
        "cosine of the feature attack M(z) and g(x), centred by the public mean",
        f"* wall time on this machine (2 shared CPU cores, {s['jobs']} worker process(es) x {s['threads_per_job']} "
        f"thread): warm-up {s['warmup_wall_s']:.0f} s, runs {s['runs_wall_s']:.0f} s, **total {s['total_wall_s'] / 60:.1f} min**",
        "",
        f"| lambda1 | lambda2 | {uname} | face sim (SFace) | SSIM | PSNR (dB) | LDA | feature sim | own-decoder SSIM |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        a, lo = r["attack"], r["loss"]
        fs = r.get("feature_attack", {}).get("feature_sim")
        lda = r.get("lda")
        lines.append(f"| {lo['lambda1']:g} | {lo['lambda2']:g} | {_util(r):.3f} | {a.get('face_sim', float('nan')):.3f} | "
                     f"{a['ssim']:.3f} | {a['psnr']:.2f} | {'-' if lda is None else f'{lda:.3f}'} | "
                     f"{'-' if fs is None else f'{fs:.3f}'} | {r['own_decoder']['ssim']:.3f} |")
    rc = runs[0]["resolution_ceiling"]
    extra = ""
    if task == "attributes":
        u = runs[0]["utility"]
        extra = (f" Majority-class attribute accuracy on the test set is {u['majority_accuracy']:.3f}; "
                 f"the baseline's is {u['attribute_accuracy']:.3f}.")
    lines += [
        "",
        f"Resolution ceiling (original -> {m['input_size']}x{m['input_size']} -> 112x112, i.e. a perfect "
        f"reconstruction at the working size): SSIM {rc['ssim']:.3f}, PSNR {rc['psnr']:.2f} dB"
        + (f", face sim {rc['face_sim']:.3f}" if "face_sim" in rc else "") + "." + extra,
        "",
    ]
    spread = s.get("attacker_seed_spread")
    if spread:
        att = spread["attacks"]
        def rng(key):
            v = [a[key] for a in att if key in a]
            return f"{min(v):.3f} .. {max(v):.3f}" if key != "psnr" else f"{min(v):.2f} .. {max(v):.2f}"
        lines += [
            f"Attacker seed-to-seed spread (run `{spread['run']}`, {len(att)} fresh attackers with seeds "
            f"{', '.join(str(a['seed']) for a in att)}): face sim {rng('face_sim')}, SSIM {rng('ssim')}, "
            f"PSNR {rng('psnr')} dB. Differences between runs smaller than this are noise.",
            "",
        ]
    lines += [
        "## The paper's numbers (Xiao et al. 2020, CelebA, ResNet-50, full-size images)",
        "",
        "| | MCC | face sim | SSIM | PSNR |",
        "|---|---:|---:|---:|---:|",
        f"| baseline | {PAPER['baseline']['mcc']} | {PAPER['baseline']['face_sim']} | {PAPER['baseline']['ssim']} | {PAPER['baseline']['psnr']} |",
        f"| ARL | {PAPER['arl']['mcc']} | {PAPER['arl']['face_sim']} | {PAPER['arl']['ssim']} | {PAPER['arl']['psnr']} |",
        "",
        "![trade-off](tradeoff.png)",
        "",
    ]
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines))


def plot_tradeoff(path: Path, runs, task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from hybridmask.utils import atomic_write

    uname = "mean MCC (attributes)" if task == "attributes" else "identification accuracy"
    panels = [("face_sim", "attacker face similarity (SFace)"), ("ssim", "attacker SSIM"), ("psnr", "attacker PSNR (dB)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, panels):
        for r in runs:
            if key not in r["attack"]:
                continue
            lo = r["loss"]
            base = lo["lambda1"] == 0 and lo["lambda2"] == 0
            ax.scatter(r["attack"][key], _util(r), s=60, marker="s" if base else "o",
                       c="tab:red" if base else "tab:blue", zorder=3)
            ax.annotate(f"l1={lo['lambda1']:g}, l2={lo['lambda2']:g}", (r["attack"][key], _util(r)),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label + "  (lower = more private)")
        ax.set_ylabel(uname)
        ax.grid(alpha=0.3)
    fig.suptitle("ARL on CelebA (this machine, CPU-sized): utility vs reconstruction leakage of a fresh attacker")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
