"""``hybridmask benchmark``: the privacy-utility benchmark of every defense, under one protocol.

    hybridmask benchmark --config configs/benchmark.yaml --budget small --dry-run   # the plan only
    hybridmask benchmark --config configs/benchmark.yaml --budget small             # docs/results_small.md

For each defense of the benchmark config (one training config each) it runs
``train -> load_defense -> verify -> attack`` (:mod:`.pipeline`):

1. **train** the run with :func:`hybridmask.train.run_training` (which dispatches on the config's
   ``method``) - or **reuse** a finished run: ``<runs_dir>/<run name>/`` is reused when its
   ``results.json`` records the very config the benchmark would train, volatile keys aside
   (:mod:`.runs`). A folder holding another config is never written to; the run then goes to
   ``<run name>-<config hash>/``. A folder another process is writing is waited for;
2. **load_defense**: the trained defense with :func:`hybridmask.defenses.io.load_defense` (fresh
   victim secrets) and the run's recognizer;
3. **verify**: LFW and CFP-FP as the run's ``results.json`` reports them (a run that reports none is
   verified here with its recognizer);
4. **attack**: the attacks of ``attacks.run`` (registered attacks with their parameters) that apply to
   the defense's capabilities, scored by :func:`hybridmask.attacks.harness.evaluate_defense`
   (reconstruction attacks, judged by SFace) or :func:`hybridmask.attacks.harness.evaluate_linkage`
   (linkage attacks) on LFW victims no model saw (:mod:`.attack_plan`);

then writes the Markdown report (``templates/report.md.j2``: one table whose privacy columns come from
each defense's strongest query attack (``attacks.headline: strongest``), with training-release and
linkage columns, every attack, attack times, the target checks of the
config's ``targets:``, the literature comparison, notes, an appendix with every config),
``results.json``, a privacy-utility scatter and one reconstruction grid per defense, all atomically.
``--budget`` picks a section of the benchmark config (``tiny`` smoke run, ``small`` CPU, ``full`` GPU).
Nothing in this package names a defense, an attack or a training method.
"""
from .cli import add_arguments, main, run
from .config import BUDGETS, load_benchmark
from .plot import privacy_utility_plot
from .report import render_markdown, target_checks
from .runner import Benchmark
from .runs import Entry, config_diff, config_hash, fingerprint, inspect_folder, place_run, resolve_entry, wait_for

__all__ = ["Benchmark", "Entry", "BUDGETS", "load_benchmark", "resolve_entry", "place_run", "inspect_folder",
           "wait_for", "fingerprint", "config_hash", "config_diff", "target_checks", "render_markdown",
           "privacy_utility_plot", "add_arguments", "run", "main"]
