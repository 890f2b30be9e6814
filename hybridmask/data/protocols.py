"""Readers for the official verification protocols of LFW (View 2) and CFP.

Both return ``[(path1, path2, issame, fold), ...]`` in protocol order, with every path checked
to exist (a clear FileNotFoundError lists what is missing).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Tuple, Union

PathLike = Union[str, os.PathLike]
Pair = Tuple[str, str, bool, int]


def _check_exist(pairs: List[Pair], what: str) -> List[Pair]:
    missing = sorted({p for a, b, _, _ in pairs for p in (a, b) if not os.path.isfile(p)})
    if missing:
        raise FileNotFoundError(
            f"{what}: {len(missing)} image(s) named by the protocol are missing, e.g. {', '.join(missing[:3])}")
    return pairs


def _lfw_path(root: Path, name: str, num: str) -> str:
    try:
        n = int(num)
    except ValueError:
        raise ValueError(f"bad image number {num!r} for {name}") from None
    return str(root / name / f"{name}_{n:04d}.jpg")


def read_lfw_pairs(lfw_root: PathLike, pairs_txt: PathLike = None) -> List[Pair]:
    """Parse LFW ``pairs.txt`` (View 2: a ``10 300`` header, then per fold 300 same and 300
    different pairs; 3-field lines ``name i j`` are same-identity pairs, 4-field lines
    ``name1 i name2 j`` different-identity pairs). Images are ``lfw_root/<name>/<name>_NNNN.jpg``.
    A one-number header (View 1 files) gives a single fold.
    """
    root = Path(lfw_root)
    pairs_txt = Path(pairs_txt) if pairs_txt is not None else root / "pairs.txt"
    if not root.is_dir():
        raise FileNotFoundError(f"LFW image folder not found: {root}")
    if not pairs_txt.is_file():
        raise FileNotFoundError(f"LFW pairs file not found: {pairs_txt}")
    lines = [ln.split() for ln in pairs_txt.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{pairs_txt}: empty pairs file")
    header = lines[0]
    if all(re.fullmatch(r"\d+", t) for t in header) and len(header) in (1, 2):
        if len(header) == 2:
            n_folds, per_fold = int(header[0]), 2 * int(header[1])
        else:
            n_folds, per_fold = 1, 2 * int(header[0])
        body = lines[1:]
    else:
        body = lines
        n_folds, per_fold = 1, len(lines)
    if per_fold <= 0 or len(body) != n_folds * per_fold:
        raise ValueError(f"{pairs_txt}: header says {n_folds} fold(s) x {per_fold} pairs but the file has {len(body)} pair lines")
    out: List[Pair] = []
    for k, f in enumerate(body):
        lineno = k + 2 if body is not lines else k + 1
        try:
            if len(f) == 3:
                a, b, same = _lfw_path(root, f[0], f[1]), _lfw_path(root, f[0], f[2]), True
            elif len(f) == 4:
                a, b, same = _lfw_path(root, f[0], f[1]), _lfw_path(root, f[2], f[3]), False
            else:
                raise ValueError(f"expected 3 or 4 fields, got {len(f)}")
        except ValueError as e:
            raise ValueError(f"{pairs_txt} line {lineno}: {e}: {' '.join(f)!r}") from None
        out.append((a, b, same, k // per_fold))
    return _check_exist(out, f"LFW ({pairs_txt})")


_CFP_RE = re.compile(r"(?:.*/)?Images/(.+)$")


def _read_cfp_list(path: Path, root: Path) -> Dict[int, str]:
    if not path.is_file():
        raise FileNotFoundError(f"CFP pair list not found: {path}")
    out: Dict[int, str] = {}
    for lineno, ln in enumerate(path.read_text().splitlines(), 1):
        if not ln.strip():
            continue
        f = ln.split()
        if len(f) != 2:
            raise ValueError(f"{path} line {lineno}: expected 'index path', got {ln!r}")
        m = _CFP_RE.match(f[1].replace("\\", "/"))
        rel = m.group(1) if m else f[1].lstrip("./")
        out[int(f[0])] = str(root / rel)
    return out


def read_cfp_pairs(cfp_root: PathLike, protocol: str = "FP") -> List[Pair]:
    """Official CFP protocol ``"FP"`` (frontal-profile) or ``"FF"`` (frontal-frontal): 10 folds x
    (350 same + 350 different) = 7,000 pairs. Reads ``Protocol/Pair_list_{F,P}.txt`` and
    ``Protocol/Split/<FP|FF>/01..10/{same,diff}.txt`` and maps ``../Data/Images/<id>/<pose>/<nn>.jpg``
    onto ``cfp_root/<id>/<pose>/<nn>.jpg``. In FP the first index is a frontal image, the second
    a profile image.
    """
    proto = str(protocol).upper()
    if proto not in ("FP", "FF"):
        raise ValueError(f"CFP protocol must be 'FP' or 'FF', got {protocol!r}")
    root = Path(cfp_root)
    pdir = root / "Protocol"
    if not pdir.is_dir():
        raise FileNotFoundError(f"CFP protocol folder not found: {pdir}")
    frontal = _read_cfp_list(pdir / "Pair_list_F.txt", root)
    second = _read_cfp_list(pdir / "Pair_list_P.txt", root) if proto == "FP" else frontal
    split = pdir / "Split" / proto
    folds = sorted(d for d in split.iterdir() if d.is_dir()) if split.is_dir() else []
    if not folds:
        raise FileNotFoundError(f"CFP split folders not found under {split}")
    out: List[Pair] = []
    for fold, d in enumerate(folds):
        for fname, same in (("same.txt", True), ("diff.txt", False)):
            path = d / fname
            if not path.is_file():
                raise FileNotFoundError(f"CFP split file not found: {path}")
            for lineno, ln in enumerate(path.read_text().splitlines(), 1):
                if not ln.strip():
                    continue
                try:
                    i, j = (int(t) for t in ln.replace(",", " ").split())
                    out.append((frontal[i], second[j], same, fold))
                except (ValueError, KeyError) as e:
                    raise ValueError(f"{path} line {lineno}: bad pair {ln.strip()!r} ({type(e).__name__}: {e})") from None
    return _check_exist(out, f"CFP-{proto} ({root})")


def protocol_pairs(target: str, data_root: PathLike) -> List[Pair]:
    """Pairs of a folder benchmark: ``lfw`` (``data_root/lfw_112`` or ``lfw``, with ``pairs.txt``),
    ``cfp_fp`` / ``cfp_ff`` (``data_root/cfp_112`` or ``cfp``, with ``Protocol/``). ``data_root``
    may also be the benchmark folder itself."""
    name = str(target).lower()
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")

    def first(names, marker):
        for n in names:
            if (root / n / marker).exists():
                return root / n
        return root if (root / marker).exists() else None

    if name == "lfw":
        lfw = first(("lfw_112", "lfw"), "pairs.txt")
        if lfw is None:
            raise FileNotFoundError(f"LFW not found under {root}: expected lfw_112/ (or lfw/) holding pairs.txt")
        return read_lfw_pairs(lfw, lfw / "pairs.txt")
    if name in ("cfp_fp", "cfp_ff"):
        cfp = first(("cfp_112", "cfp", "cfp-dataset"), "Protocol")
        if cfp is None:
            raise FileNotFoundError(f"CFP not found under {root}: expected cfp_112/ (or cfp/) holding Protocol/")
        return read_cfp_pairs(cfp, name[-2:].upper())
    raise KeyError(f"no folder protocol for {target!r}; folder targets are lfw, cfp_fp, cfp_ff")
