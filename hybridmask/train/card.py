"""Model card (markdown) for a trained masking policy, generated at the end of a run."""
from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Dict, Optional, Union

from ..utils import atomic_write


def read_run_results(run: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``<run>/results.json`` of a finished ``hybridmask train`` run; ``ValueError`` naming the problem
    (missing file, invalid JSON, not a hybridmask trainer run)."""
    from ..utils.io import read_json_mapping
    f = os.path.join(run, "results.json")
    try:
        res = read_json_mapping(f, "run results")
    except FileNotFoundError:
        raise ValueError(f"missing {f}: is {run} a finished hybridmask train run?") from None
    if res.get("method") != "hybridmask":
        raise ValueError(f"{f} is not a hybridmask trainer run")
    return res


def run_k_hist(results: Dict[str, Any]) -> Dict[int, float]:
    """The k histogram of a run's training batches (``results["train"]["k_hist"]``), keys as ints, by k;
    empty when the run recorded none."""
    kh = (results.get("train") or {}).get("k_hist") or {}
    return {int(k): float(v) for k, v in sorted(kh.items(), key=lambda kv: int(kv[0]))}


def format_accuracy(results: Dict[str, Any], target: str, missing: str = "n/a") -> str:
    """``"mean +- std"`` (in %) of a run's verification on ``target``, or ``missing``."""
    v = (results.get("verification") or {}).get(target)
    return missing if not v else f"{100 * v['accuracy']:.2f} +- {100 * v['accuracy_std']:.2f}"


#: defense config entries that describe the policy, not the masking (the policy has its own section)
_NOT_MASKING = ("policy_path", "policy_config")


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f} %"


def _reward_note(results: Dict[str, Any]) -> str:
    """What the FR loss of the reward is (the recognizer's own objective) and the attacker in the loop, if any."""
    cfg = results.get("config", {})
    teacher = results.get("teacher") or {}
    if teacher:
        fr = (f"The FR loss is the one the recognizer minimises: it was distilled from `{teacher.get('spec')}` "
              f"(`1 - cos` to the teacher's embedding of the mix{', plus the margin loss' if teacher.get('margin') else ''})"
              + (f"; {teacher['note']}" if teacher.get("note") else "") + ".")
    else:
        fr = "The FR loss is the recognizer's mixed-label margin loss."
    att = (cfg.get("reward") or {}).get("attacker") or {}
    if att.get("name") and att.get("name") != "none" and float(att.get("weight") or 0) > 0:
        fr += (f" **Attacker in the loop**: a `{att.get('name')}` attacker trained alongside (width {att.get('width')}, "
               f"{att.get('size')}x{att.get('size')} grey target, {att.get('steps')} Adam step(s) per policy step); its "
               f"out-of-sample reconstruction error is weighted {att.get('weight')} in the privacy term "
               f"(docs/policy.md#attacker-in-the-loop-hybridmaskpolicyattacker).")
    return fr


def policy_card(results: Dict[str, Any], policy, reward=None, file_note: Optional[str] = None) -> str:
    """``file_note``: where the weights live (default: the run folder's ``policy.pt``, not committed)."""
    cfg = results.get("config", {})
    train = results.get("train", {})
    data = cfg.get("data", {})
    rw = cfg.get("reward", {})
    pc = cfg.get("policy", {})
    src = data.get("train") or (f"embedded synthetic faces ({data.get('synthetic', {}).get('identities')} identities x "
                                f"{data.get('synthetic', {}).get('images_per_identity')} images)")
    kh_rows = "\n".join(f"| {k} | {100 * v:.1f} % |" for k, v in run_k_hist(results).items())
    ver = results.get("verification") or {}
    ver_rows = "\n".join(f"| {name} | {_pct(m.get('accuracy'))} +- {_pct(m.get('accuracy_std'))} | {m.get('pairs')} |"
                         for name, m in ver.items()) or "| (none) | | |"
    masking = ", ".join(f"{k}={v}" for k, v in (results.get("defense") or {}).items()
                        if k not in _NOT_MASKING)
    name = results.get("run", "run")
    k_values = list(getattr(policy, "k_values", []))
    ladder = (results.get("defense") or {}).get("subset_by_k")
    choice = (f"how many faces k in {k_values} the frequency MixUp of hybrid masking mixes"
              if not ladder else
              f"a level of the masking ladder: k in {k_values} faces mixed in its training releases, each face "
              f"keeping {', '.join('all' if m is None else str(m) for m in ladder)} of its channels at those levels, "
              f"and its *query* keeping as many (docs/policy.md#the-masking-ladder-the-policy-acts-at-query-time-subset_by_k)")
    query_note = "k=1 masked queries" if not ladder else "k=1 queries, each at the level the policy chose"
    if file_note is None:
        where = results.get("paths", {}).get("policy", "policy.pt")
        file_note = f"`{where}` (not in the repository; written under `outputs/`)"
    return f"""# Masking policy `{name}`

Generated by `hybridmask train` on {_dt.date.today().isoformat()} (hybridmask, torch {results.get('torch')}).
File: {file_note}.

## What it is
A strategy network (MLP, {getattr(policy, 'hidden', '?')} hidden units, {getattr(policy, 'context_dim', '?')} context
features: energy-spectrum quantiles of the PPFR-FD-masked face, spatial spread, kurtosis, running FR loss,
training progress) that picks, per face, {choice} (Wang et al. 2024, arXiv 2403.10558). It was trained with REINFORCE
(baseline `{pc.get('baseline')}`, entropy bonus {pc.get('entropy_coef')}) against the recognizer, alternating
{cfg.get('train', {}).get('n_fr')} recognizer steps with {cfg.get('train', {}).get('n_pi')} policy step(s), on the reward
`R = P(FR loss) - mu * c(k)` with the utility constraint U >= {rw.get('utility_target')} (U = held-out identification
accuracy of {query_note}; mu by dual ascent, cost `{rw.get('cost')}`).
{_reward_note(results)}

Load it with `hybridmask.defenses.load_defense("<this file>")` (the adaptive defense driven by it), or
`create_defense("adaptive", policy_path=...)` / `load_policy`.

## Training
| item | value |
|---|---|
| training data | {src} |
| images seen | {results.get('images_seen')} ({train.get('steps')} steps) |
| recognizer | {results.get('model', {}).get('name')} ({results.get('model', {}).get('stem')} stem, {results.get('model', {}).get('in_chans')} x {results.get('model', {}).get('grid')} x {results.get('model', {}).get('grid')}) |
| masking | {masking} |
| final utility U | {_pct(train.get('utility'))} (target {_pct(rw.get('utility_target'))}) |
| final multiplier mu | {train.get('mu')} |
| wall time | {results.get('fit_seconds', 0):.0f} s training on {results.get('device')} x {results.get('world_size')} |

k chosen for the recognizer's training batches over the whole run:

| k | fraction |
|---|---|
{kh_rows}

## Utility of the recognizer trained with it ({query_note})
| target | accuracy | pairs |
|---|---|---|
{ver_rows}

## Intended use and limits
* Research on privacy-preserving face recognition; the policy only chooses k. Privacy comes from the
  masking secrets (per-sample channel permutations, partners, weights), which are drawn from a secure
  generator and are *not* in this file. Its sampling generator is not stored either.
* The k distribution is visible to a white-box attacker (this card publishes it).
* Trained on {('the embedded synthetic faces: a demonstration, not a deployable policy' if not data.get('train') else 'a small CPU budget: expect different behaviour at scale')}.
* Faces are personal data: train and evaluate only on data you may use.
"""


def write_policy_card(path: Union[str, os.PathLike], results: Dict[str, Any], policy, reward=None,
                      file_note: Optional[str] = None) -> None:
    with atomic_write(path, "w") as f:
        f.write(policy_card(results, policy, reward, file_note=file_note))


def recognizer_card(results: Dict[str, Any], checkpoint_sha256: str, checkpoint_bytes: int,
                    commit: str = "unknown", command: Optional[str] = None) -> str:
    """Model card (markdown) of the recognizer a ``hybridmask train`` run wrote, from its ``results.json``
    (fields as in ``fr_models/MODEL_CARD_TEMPLATE.md``)."""
    cfg = results.get("config", {})
    data, optim, head = cfg.get("data", {}), cfg.get("optim", {}), cfg.get("head", {})
    model = results.get("model", {})
    name = results.get("run", "run")
    defense = results.get("defense") or {}
    src = data.get("train") or "embedded synthetic faces"
    stem = model.get("stem")
    inp = ("pixel 3x112x112" if stem == "pixel"
           else f"freq {model.get('in_chans')} x {model.get('grid')} x {model.get('grid')}")
    masking = ", ".join(f"{k}={v}" for k, v in defense.items() if k not in _NOT_MASKING) or "none"
    m = head.get("m")
    head_txt = f"{head.get('name')} s={head.get('s')} m={m if m is not None else 'default'}"
    policy = results.get("policy")
    train = results.get("train", {})
    kh = run_k_hist(results)
    ktxt = ", ".join(f"k={k}: {100 * v:.0f} %" for k, v in kh.items()) or "k=1 (no MixUp)"
    ver = results.get("verification") or {}
    key_file = (results.get("paths") or {}).get("client_key")     # a keyed run: eval needs the client's key
    key_arg = f" --key {key_file}" if key_file else ""

    def row(label, key):
        v = ver.get(key)
        if not v:
            return f"| {label} | not measured | not measured | not measured |"
        tar = v.get("tar_at_far", {}) or {}
        tar3 = next((t for f, t in tar.items() if abs(float(f) - 1e-3) < 1e-9), None)
        auc = v.get("auc")
        return (f"| {label} | {_pct(v.get('accuracy'))} +- {_pct(v.get('accuracy_std'))} | "
                f"{_pct(tar3) if tar3 is not None else 'not measured'} | {'n/a' if auc is None else f'{float(auc):.4f}'} |")

    teacher = results.get("teacher") or {}
    taught = (f"distilled from teacher `{teacher.get('spec')}` (weight {teacher.get('weight')}"
              f"{', margin loss kept' if teacher.get('margin') else ', no margin loss'})"
              + (f"; **{teacher['note']}**: privacy numbers judged by SFace are not independent of this model"
                 if teacher.get("note") else "")) if teacher else "no teacher (trained from its own labels)"
    start = results.get("model_start") or {}
    started = ("not recorded" if not start else
               f"{start.get('from')}" + (f" ({start.get('copied')} tensors copied, {start.get('kept_fresh')} fresh)"
                                         if start.get("kind") == "checkpoint" else "")
               + (f"; **{start['note']}**: privacy numbers judged by SFace are not independent of this model"
                  if start.get("note") else ""))
    cmd = command or f"hybridmask train --config configs/{name}.yaml"
    return f"""# Model card: `{name}`

*Generated from `{results.get('paths', {}).get('dir', 'outputs/' + name)}/results.json` by `scripts/model_card.py`.*

## Summary
- **What it is**: face recognizer (embedding model) trained with hybridmask (card written at commit `{commit}`).
- **Backbone**: `{model.get('name')}`, embedding size `{model.get('embedding_size')}`; stem `{stem}`.
- **Input (stem)**: {inp}; defense / masking: {masking}.
- **Head / loss**: {head_txt}; mixed-label margin loss: {'yes' if any(k > 1 for k in kh) else 'no (k=1)'}; policy: `{policy}`.
- **Checkpoint**: `{results.get('paths', {}).get('model')}` (not in git), SHA-256 `{checkpoint_sha256}`,
  size {checkpoint_bytes / 1e6:.1f} MB. The per-sample masking secrets are not in it.

## Training
- **Command**: `{cmd}`
- **Data**: `{src}`, {results.get('identities')} identities, {results.get('train_images')} training images
  ({results.get('heldout_images')} held out to measure U); aligned 112x112 (ArcFace 5-point template).
  LFW and CFP identities are not CelebA identities by construction of the data sets (not checkable by name).
- **Schedule**: {train.get('steps')} steps x batch {data.get('batch_size')} = {results.get('images_seen')} images,
  {optim.get('name')} lr {optim.get('lr')} ({optim.get('scheduler')}, warm-up {optim.get('warmup_steps')}), weight decay
  {optim.get('weight_decay')}, random horizontal flips.
- **k used in training**: {ktxt}.
- **Started from**: {started}.
- **Teacher**: {taught}.
- **Hardware and time**: {results.get('device')} x {results.get('world_size')} process(es), {results.get('threads')} threads;
  {results.get('fit_seconds', 0):.0f} s of training ({results.get('images_per_second', 0):.1f} img/s),
  {results.get('wall_seconds', 0):.0f} s wall including data decoding and evaluation; torch {results.get('torch')}.

## Evaluation (10-fold, mean +- std; flip-sum embeddings; queries masked with k = 1)
| benchmark | accuracy | TAR@FAR=1e-3 | AUC |
|---|---|---|---|
{row('LFW (pairs.txt)', 'lfw')}
{row('CFP-FP', 'cfp_fp')}
{row('CFP-FF', 'cfp_ff')}

Measured at the end of the training run on the full protocols (re-run: `hybridmask eval --model
{results.get('paths', {}).get('model')}{key_arg} --targets lfw,cfp_fp --data ../shared/data/faces`).

## Intended use and limits
- Research on privacy-preserving face recognition; not for identifying people.
- Trained on CelebA (research-only licence): the weights inherit its terms; do not redistribute
  them where the data licence forbids it.
- Known limits: a CPU budget of {results.get('images_seen')} images on ~5k faces of 250 identities, so accuracy is far
  below the literature's (MS1M-scale training); the demographic coverage is that of CelebA.
"""
