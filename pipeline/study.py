"""Study: which backbone, layer and head suit a dataset, measured in one command.

Every (backbone, layer) goes into the normal feature cache, the layers of one backbone out of one
forward pass. Every head is fitted as fit-head fits it: grouped CV on the training part of fit-head's
split. The winner is the single-layer configuration with the best CV score, chosen before any test
score is looked at; the test part only reports, each accuracy with its 95% Wilson interval.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .artifacts import (
    PREDICTIONS_CSV,
    output_dir,
    paired_outcomes,
    predictions_from_rows,
    read_predictions,
    staged_folder,
)
from .backbones import loaded_once
from .cache import FeatureCache, load
from .checkout import LIKENESS_PER_CLASS, checkout
from .errors import UserError
from .extract import extract_layers
from .heads import (
    CLASSIFIERS,
    NEAR_DUPLICATES,
    fit_on_split,
    near_duplicate_hash_pairs,
    near_duplicate_metrics,
    save_head,
    split_with_test,
)
from .images import Dataset, scan_dataset
from .params import Interval, Options, ParamError, check_params, define
from .sources import join
from .splits import Split
from .stats import mcnemar_exact, paired_verdict, wilson_interval
from .study_plan import Plan, parse_backbone, plan_layers, probe, split_list, timing_images
from .study_report import advice, checkout_png, slug, table_markdown, write_outputs
from .study_results import FinetuneResult, StudyResults, StudyRow
from .views import ViewRecipe, load_view_features, view_recipe

logger = logging.getLogger(__name__)

DEFAULT_LAYERS = "auto,auto+top"
DEFAULT_HEADS = "logreg,svm"
# Budget estimates before the first fit of a kind: seconds per (n_train ** power * feature width), from
# bench/study.py on the 2-core machine (flowers, 767 x 1280: logreg 1.6 s, svm 3.4 s); every fit recalibrates.
FIT_COST = {"logreg": (1.6e-6, 1), "svm": (4.5e-9, 2), "rbf-svm": (4.5e-9, 2), "knn": (1e-6, 1)}
CONVERSION_SECONDS = 15.0  # one TFLite conversion of a backbone, when its caches are still to be made
FINETUNE_PASSES = 30  # budget estimate of fine-tuning: about 10 epochs at 3x the cost of inference
define(budget_minutes=[Interval(0.001, 100_000), None], heads=[Options(CLASSIFIERS)])


# -- fitting one configuration ---------------------------------------------------------------------
@dataclass
class Outcome:
    """One fitted configuration: what fit_config measured and what saving it as a head folder needs."""

    fitted: Any  # heads.FittedHead
    cache: FeatureCache
    split: Split
    test_proba: np.ndarray
    head_ms: float
    test_correct: int
    sources: list[Any] = field(default_factory=list)  # pipeline.sources.Source of each cache, in order
    near_duplicates: dict[str, Any] = field(default_factory=dict)  # what metrics.json records of the grouping


def fit_config(
    cache: FeatureCache,
    clf: str,
    *,
    cv: int,
    n_jobs: int,
    seed: int,
    test_size: float,
    log: Callable[[str], None],
    near_pairs: Sequence[tuple[str, str]] = (),
    views_of: Callable[[list[str]], np.ndarray] | None = None,
) -> Outcome:
    """fit-head on one feature set: C chosen by grouped CV on the training part, then the test score.

    near_pairs: content-hash pairs of near-duplicates to keep on one side (found once per study).
    views_of: the (n, K, D) augmented views of images by content hash, to train on as fit-head --views does.
    """
    split = split_with_test(cache, test_size, seed, near_pairs)
    X, y = cache.features, cache.labels
    views = views_of([cache.content_hash[i] for i in split.train]) if views_of else None
    fitted = fit_on_split(cache, split, clf, views, cv=cv, n_jobs=n_jobs, seed=seed, log=log)
    fitted.options.update(test_size=test_size, **({"views": int(views.shape[1])} if views is not None else {}))
    start = time.perf_counter()
    proba = fitted.model.predict_proba(X[split.test])
    head_ms = 1000 * (time.perf_counter() - start) / len(split.test)
    correct = int((proba.argmax(1) == y[split.test]).sum())
    return Outcome(fitted, cache, split, proba, head_ms, correct)


def choose_winner(rows: Sequence[StudyRow]) -> int | None:
    """The row with the best CV accuracy, whatever its kind (layer, hypercolumn, ensemble); ties go to the
    faster, then the smaller one. Test scores play no part."""
    eligible = [k for k, r in enumerate(rows) if r.cv_accuracy is not None]
    if not eligible:
        return None
    return min(
        eligible, key=lambda k: (-round(rows[k].cv_accuracy, 12), rows[k].infer_ms_per_image, rows[k].model_mb, k)
    )


def save_outcome(folder: Path, outcome: Outcome) -> None:
    """A configuration as a normal head folder (predict, export and compare take it as it is)."""
    save_head(
        folder,
        outcome.fitted,
        outcome.cache,
        outcome.split,
        outcome.test_proba,
        {"selected_by": "cnncodes study: CV accuracy on the training part", **outcome.near_duplicates},
        test_features=outcome.cache.features[outcome.split.test],
        sources=outcome.sources,
    )


def paired_test(winner: Outcome, folder: Path) -> tuple[dict[str, Any], str]:
    """A fine-tuning run vs the winner head on the test images both scored."""
    run = read_predictions(folder / PREDICTIONS_CSV)
    cache = winner.cache
    head = predictions_from_rows(
        winner.split.test,
        winner.test_proba,
        cache.paths,
        cache.content_hash,
        cache.split,
        cache.labels,
        cache.class_names,
    )
    a, b = paired_outcomes(run, head)
    return mcnemar_exact(a, b), paired_verdict("fine-tune", "winner head", a, b)


# -- the study -------------------------------------------------------------------------------------
@dataclass
class Task:
    """One step of a study: fit a head on some layers of a backbone, or the backbone's ImageNet checkout."""

    plan: Plan
    layers: tuple[str, ...] = ()  # empty: the checkout
    clf: str = ""
    partner: tuple[Plan, str] | None = None  # an ensemble: another backbone and its layer, beside this one's

    @property
    def name(self) -> str:
        if self.partner:
            return f"{self.plan.label} {self.layers[0]} + {self.partner[0].label} {self.partner[1]} {self.clf}"
        return f"{self.plan.label} " + (f"{'+'.join(self.layers)} {self.clf}" if self.layers else "checkout")

    @property
    def pieces(self) -> list[tuple[Plan, str]]:
        """(backbone, layer) of each feature source, in order."""
        return [(self.plan, k) for k in self.layers] + ([self.partner] if self.partner else [])

    @property
    def backbones(self) -> list[Plan]:
        """The backbones of the pieces, each once."""
        return [self.plan] + ([self.partner[0]] if self.partner else [])


@dataclass
class StudyResult:
    """What study() measured (the study.json object) and where it wrote it."""

    folder: Path
    data: StudyResults
    markdown: str

    @property
    def interrupted(self) -> bool:
        return self.data.interrupted

    def lines(self) -> list[str]:
        """What the command prints: the table, the winner, the advice, what was skipped, where it all is."""
        data = self.data
        lines = [table_markdown(data.rows), ""]
        lines += [f"- {line}" for line in data.advice["text"]]
        lines += [f"skipped {s['config']}: {s['reason']}" for s in data.skipped]
        if data.winner is not None:
            lines.append(f"winner (by CV accuracy, before the test part was looked at): {self.folder / 'winner'}/")
        lines.append(f"study written to {self.folder}/ (study.md, study.json, study.png) in {data.seconds:.0f} s")
        if self.interrupted:
            lines.append("interrupted: the table holds what was finished.")
        return lines


class Study:
    """The state of one study run: plans, rows so far, the budget; run() does the work in cost order."""

    def __init__(
        self,
        dataset: Dataset,
        plans: list[Plan],
        tokens: list[str],
        clfs: list[str],
        *,
        budget_minutes: float | None,
        seed: int,
        test_size: float,
        cv: int,
        n_jobs: int,
        runtime: str,
        cache_dir: str | Path | None,
        log: Callable[[str], None],
        near_duplicates: float = NEAR_DUPLICATES,
        ensembles: bool = False,
        views: ViewRecipe | None = None,
    ) -> None:
        self.dataset, self.plans, self.tokens, self.clfs = dataset, plans, tokens, clfs
        self.near_threshold, self.ensembles, self.views = near_duplicates or 0.0, ensembles, views
        self.near_pairs: list[tuple[str, str]] | None = None  # found once, on the first features fitted
        self.seed, self.test_size, self.cv, self.n_jobs, self.runtime = seed, test_size, cv, n_jobs, runtime
        self.cache_dir, self.log = cache_dir, log
        self.started = time.perf_counter()
        self.budget = None if budget_minutes is None else 60.0 * budget_minutes
        self.scale = {clf: 1.0 for clf in FIT_COST}  # measured / estimated fit seconds, per classifier
        self.n_train = int(round(len(dataset.files) * (1 - test_size)))
        self.rows: list[StudyRow] = []
        self.outcomes: list[Outcome] = []
        self.checkouts: dict[str, Any] = {}
        self.skipped: list[dict[str, str]] = []
        self._loaded: dict[Path, FeatureCache] = {}

    # budget ----------------------------------------------------------------------------------------
    def left(self) -> float:
        """Seconds of budget left (infinite without a budget)."""
        return np.inf if self.budget is None else self.budget - (time.perf_counter() - self.started)

    def _extraction_cost(self, plan: Plan) -> float:
        if plan.caches:
            return 0.0
        conversion = 0.0 if self.runtime == "keras" else CONVERSION_SECONDS
        passes = 1 + (self.views.k if self.views else 0)  # the clean image and each of its views
        return (
            passes * len(self.dataset.files) * plan.ms["top" if "top" in plan.ms else max(plan.ms)] / 1000 + conversion
        )

    def _fit_cost(self, clf: str, dim: int) -> float:
        factor, power = FIT_COST[clf]
        return self.scale[clf] * factor * self.n_train**power * dim

    def cost(self, task: Task) -> float:
        """Estimated seconds: extraction if the backbone still needs it, plus the fit (or the checkout)."""
        top_ms = max(task.plan.ms.values())
        if not task.layers:
            return 3.0 + len(self.dataset.class_names) * LIKENESS_PER_CLASS * top_ms / 1000
        return sum(self._extraction_cost(p) for p in task.backbones) + self._fit_cost(
            task.clf, sum(p.dims[k] for p, k in task.pieces)
        )

    def tier(self, task: Task) -> int:
        """Each backbone's top layer with the first head first, then the checkouts, then the rest."""
        return 1 if not task.layers else 0 if task.layers == ("top",) and task.clf == self.clfs[0] else 2

    # steps -----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Resolve each backbone's layers and probe their inference time; a backbone that fails is skipped."""
        decoded: dict[int, np.ndarray] = {}
        for plan in self.plans:
            self.log(f"probing {plan.label}")
            try:
                plan_layers(plan, self.tokens, self.skipped)
                if plan.config.image_size not in decoded:
                    decoded[plan.config.image_size] = timing_images(self.dataset, plan.config.image_size)
                probe(plan, decoded)
            except UserError as exc:
                plan.failed = str(exc)
                self.skipped.append({"config": plan.label, "reason": plan.failed})
            for note in plan.notes:
                self.log(f"  {note}")

    def extract(self, plan: Plan) -> None:
        """Every layer of one backbone into its normal cache, out of one forward pass."""
        labels = list(plan.layers)
        self.log(f"extracting {plan.label}: {', '.join(labels)} (one forward pass)")
        summaries = extract_layers(
            self.dataset.root,
            plan.config,
            [plan.layers[k] for k in labels],
            cache_dir=self.cache_dir,
            runtime=self.runtime,
            progress=False,
            log=self.log,
            views=self.views,
        )
        if any(s.interrupted for s in summaries):
            raise KeyboardInterrupt
        plan.caches = {k: s.cache_path for k, s in zip(labels, summaries)}
        fresh = max(summaries, key=lambda s: s.n_new)
        # a cache that was already complete measured nothing: the probe's rate stands in
        plan.images_per_s = fresh.images_per_s if fresh.n_new else 1000 / plan.ms[labels[0]]

    def features(self, path: Path) -> FeatureCache:
        """A cache, loaded once."""
        if path not in self._loaded:
            self._loaded[path] = load(path)
        return self._loaded[path]

    def fit(self, task: Task) -> None:
        """One configuration: fit-head on its features (several sources joined as fit-head joins them), its row."""
        pieces = task.pieces
        cache, sources = join([self.features(p.caches[k]) for p, k in pieces], log=lambda _: None)
        if self.near_pairs is None:
            first = self.features(pieces[0][0].caches[pieces[0][1]])
            self.near_pairs = near_duplicate_hash_pairs(first.features, first.content_hash, self.near_threshold)
            self.log(
                f"near-duplicates (whitened cosine >= {self.near_threshold:g} on {task.name.rsplit(' ', 1)[0]}): "
                f"{len(self.near_pairs)} pairs, kept on one side of the split and of every fold"
                if self.near_threshold
                else "near-duplicates not grouped (--group-near-duplicates 0)"
            )
        self.log(f"fitting {task.name}")
        paths = [p.caches[k] for p, k in pieces]
        outcome = fit_config(
            cache,
            task.clf,
            cv=self.cv,
            n_jobs=self.n_jobs,
            seed=self.seed,
            test_size=self.test_size,
            log=self.log,
            near_pairs=self.near_pairs,
            views_of=(lambda hashes: load_view_features(paths, hashes)[0]) if self.views else None,
        )
        outcome.sources = sources
        if self.views:
            outcome.fitted.options["views_recipe"] = self.views.to_json()
        outcome.near_duplicates = near_duplicate_metrics(self.near_threshold, self.near_pairs, outcome.split)
        fitted, n_test, dim = outcome.fitted, len(outcome.split.test), int(cache.features.shape[1])
        self.scale[task.clf] = 1.0
        self.scale[task.clf] = fitted.fit_seconds / max(self._fit_cost(task.clf, dim), 1e-9)
        backbones = task.backbones
        row = StudyRow(
            backbone="+".join(p.label for p in backbones),
            layer="+".join(k for _, k in pieces),
            kind="ensemble" if task.partner else "layer" if len(task.layers) == 1 else "hypercolumn",
            head=task.clf,
            cv_accuracy=fitted.cv_score,
            cv_folds=fitted.cv_folds,
            best_params=fitted.best_params,
            test_accuracy=outcome.test_correct / n_test,
            test_ci=list(wilson_interval(outcome.test_correct, n_test)),
            n_train=len(outcome.split.train),
            n_test=n_test,
            fit_seconds=fitted.fit_seconds,
            feature_dim=dim,
            cache=str(cache.path),
            extract_images_per_s=min(p.images_per_s for p in backbones),
            # each backbone runs once, to its deepest layer; the parameters up to it count once
            infer_ms_per_image=sum(max(p.ms[k] for q, k in pieces if q is p) for p in backbones) + outcome.head_ms,
            model_mb=(
                sum(max(p.params[k] for q, k in pieces if q is p) for p in backbones) * 4
                + len(pickle.dumps(fitted.model))
            )
            / 1e6,
        )
        self.rows.append(row)
        self.outcomes.append(outcome)
        self.log(f"  CV accuracy {row.cv_accuracy:.4f} ({row.fit_seconds:.1f} s)")

    def checkout(self, plan: Plan) -> None:
        """The backbone's ImageNet classifier on sample images; skipped with the reason when there is none."""
        self.log(f"checkout {plan.label}")
        try:
            self.checkouts[plan.label] = checkout(
                self.dataset.files, self.dataset.class_names, plan.config, seed=self.seed
            )
        except UserError as exc:
            self.skipped.append({"config": f"{plan.label} checkout", "reason": str(exc)})

    def run(self) -> None:
        """Every task, cheapest useful first, within the budget; what does not fit is listed as skipped.
        With ensembles, then each pair of backbones, each with the layer of its best CV row."""
        with loaded_once():  # a backbone's layers listed, timed and extracted from one loaded model
            self.prepare()
            live = [p for p in self.plans if not p.failed]
            tasks = [Task(p, (k,), c) for p in live for k in p.layers for c in self.clfs]
            tasks += [Task(p, pair, c) for p in live for pair in p.hypercolumns for c in self.clfs]
            tasks += [Task(p) for p in live]
            self._run_tasks(tasks)
            if self.ensembles:
                self._run_tasks(self.ensemble_tasks())

    def ensemble_tasks(self) -> list[Task]:
        """Pairs of backbones, each with the layer of its best single-layer CV row, with every head."""
        best: dict[str, str] = {}
        for row in sorted(self.rows, key=lambda r: -r.cv_accuracy):
            if row.kind == "layer":
                best.setdefault(row.backbone, row.layer)
        plans = [p for p in self.plans if p.label in best and not p.failed]
        return [
            Task(a, (best[a.label],), c, (b, best[b.label]))
            for i, a in enumerate(plans)
            for b in plans[i + 1 :]
            for c in self.clfs
        ]

    def _run_tasks(self, tasks: list[Task]) -> None:
        while tasks:
            task = min(tasks, key=lambda t: (self.tier(t), self.cost(t)))
            tasks.remove(task)
            if task.plan.failed:
                continue
            if self.cost(task) > self.left():
                self.skipped.append(
                    {
                        "config": task.name,
                        "reason": f"over budget: estimated {self.cost(task):.0f} s, {max(self.left(), 0):.0f} s left",
                    }
                )
            elif not task.layers:
                self.checkout(task.plan)
            else:
                try:
                    for plan in task.backbones:
                        if not plan.caches:
                            self.extract(plan)
                except UserError as exc:
                    task.plan.failed = str(exc)
                    self.skipped.append({"config": task.plan.label, "reason": task.plan.failed})
                    continue
                self.fit(task)

    def finetune(self, winner: int, stage: Path) -> tuple[FinetuneResult, bool] | None:
        """Fine-tune the winner's backbone from a logistic-regression head; a paired test against the winner.

        Returns the run's result and whether it was interrupted, or None when it does not fit the budget."""
        from .finetune import finetune

        if self.rows[winner].kind != "layer":  # fine-tuning trains one backbone: the best single layer
            winner = max(
                (k for k, r in enumerate(self.rows) if r.kind == "layer"), key=lambda k: self.rows[k].cv_accuracy
            )
        row, outcome = self.rows[winner], self.outcomes[winner]
        plan = next(p for p in self.plans if p.label == row.backbone)
        estimate = (FINETUNE_PASSES * self.n_train + len(self.dataset.files)) * plan.ms[row.layer] / 1000
        if estimate > self.left():
            self.skipped.append(
                {
                    "config": f"{plan.label} {row.layer} finetune",
                    "reason": f"over budget: estimated {estimate:.0f} s, {max(self.left(), 0):.0f} s left",
                }
            )
            return None
        init = stage / "winner" if row.head == "logreg" else None
        same = [
            k for k, r in enumerate(self.rows) if (r.backbone, r.layer, r.head) == (row.backbone, row.layer, "logreg")
        ]
        if init is None and same:  # fine-tuning starts from a logistic regression: the winner's layer's one
            init = stage / "heads" / slug(f"{row.backbone}-{row.layer}-logreg")
            save_outcome(init, self.outcomes[same[0]])
            self.rows[same[0]].head_dir = str(init.relative_to(stage))
        self.log(f"fine-tuning {plan.label} {row.layer}" + (f" from {init.relative_to(stage)}" if init else ""))
        result = finetune(
            self.dataset.root,
            replace(plan.config, layer=plan.layers[row.layer]),
            init_head=init,
            test_size=self.test_size,
            seed=self.seed,
            cache=outcome.cache.path,
            out=stage / "finetune",
            log=self.log,
            near_pairs=self.near_pairs,
        )
        test, verdict = paired_test(outcome, stage / "finetune")
        m = result.metrics
        n_classes = len(self.dataset.class_names)
        tuned_row = StudyRow(
            backbone=plan.label,
            layer=row.layer,
            kind="finetune",
            head="finetune",
            cv_accuracy=None,
            test_accuracy=m["accuracy"],
            n_test=m["n_test"],
            test_ci=m.get("accuracy_ci") or list(wilson_interval(round(m["accuracy"] * m["n_test"]), m["n_test"])),
            fit_seconds=m["train_seconds"],
            infer_ms_per_image=plan.ms[row.layer],
            model_mb=(plan.params[row.layer] + (plan.dims[row.layer] + 1) * n_classes) * 4 / 1e6,
            head_dir="finetune",
        )
        tuned = FinetuneResult(
            row=tuned_row,
            paired_test=test,
            verdict=verdict,
            worth_it=test["p_value"] < 0.05 and test["a_only"] > test["b_only"],
            init_head=str(init.relative_to(stage)) if init else None,
            epochs_run=m.get("epochs_run"),
        )
        return tuned, result.interrupted


def study(
    data_dir: str | Path,
    backbones: str = "MobileNetV2",
    layers: str = DEFAULT_LAYERS,
    heads: str = DEFAULT_HEADS,
    *,
    finetune: bool = False,
    budget_minutes: float | None = None,
    seed: int = 0,
    test_size: float = 0.2,
    cv: int = 5,
    n_jobs: int = -1,
    runtime: str = "auto",
    cache_dir: str | Path | None = None,
    out: str | Path | None = None,
    ensembles: bool = False,
    group_near_duplicates: float | None = NEAR_DUPLICATES,
    views: int = 0,
    log: Callable[[str], None] = logger.info,
) -> StudyResult:
    """Extract, fit and compare every backbone x layer x head on one split; save the CV winner as a head.

    ensembles: also each pair of backbones, each with its best layer. group_near_duplicates: as fit-head's.
    views: cache K augmented views of every image and train every head on them too (as fit-head --views).
    """
    check_params(
        dict(
            budget_minutes=budget_minutes,
            seed=seed,
            test_size=test_size,
            cv=cv,
            n_jobs=n_jobs,
            runtime=runtime,
            group_near_duplicates=group_near_duplicates,
        )
    )
    clfs = split_list(heads, "heads")
    for clf in clfs:
        check_params(dict(heads=clf))
    tokens = split_list(layers, "layers")
    bad = [t for t in tokens if "+" in t and (t.count("+") != 1 or "" in t.split("+"))]
    if bad:
        raise ParamError(f"{{}}: {bad[0]!r} is not a hypercolumn A+B of two layers (e.g. auto+top).", "layers")
    plans = [Plan(label, config) for label, config in map(parse_backbone, split_list(backbones, "backbones"))]
    if len({p.label for p in plans}) != len(plans):
        raise ParamError(f"{{}} {backbones!r} names one backbone twice.", "backbones")
    dataset = scan_dataset(data_dir)
    out = Path(out) if out else output_dir("studies") / dataset.root.name
    run = Study(
        dataset,
        plans,
        tokens,
        clfs,
        budget_minutes=budget_minutes,
        seed=seed,
        test_size=test_size,
        cv=cv,
        n_jobs=n_jobs,
        runtime=runtime,
        cache_dir=cache_dir,
        log=log,
        near_duplicates=group_near_duplicates,
        ensembles=ensembles,
        views=view_recipe(views, seed),
    )
    interrupted, tuned = False, None
    with staged_folder(out) as stage:
        try:
            run.run()
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: writing the table of what is finished")
        winner = choose_winner(run.rows)
        if winner is not None:
            save_outcome(stage / "winner", run.outcomes[winner])
            run.rows[winner].head_dir = "winner"
            if finetune and not interrupted:
                finetuned = run.finetune(winner, stage)
                if finetuned is not None:
                    tuned, interrupted = finetuned
                    run.rows.append(tuned.row)
        data = StudyResults(
            dataset_root=str(dataset.root),
            n_images=len(dataset.files),
            images_per_class={
                name: sum(f.label == c for f in dataset.files) for c, name in enumerate(dataset.class_names)
            },
            seed=seed,
            test_size=test_size,
            cv=cv,
            heads=clfs,
            layers=tokens,
            near_duplicates={"threshold": run.near_threshold, "pairs": len(run.near_pairs or [])},
            ensembles=ensembles,
            views=views,
            backbones={
                p.label: {
                    "config": p.config.__dict__,
                    "layers": p.layers,
                    "notes": p.notes,
                    "backbone_ms": p.ms,
                    "failed": p.failed,
                }
                for p in plans
            },
            rows=run.rows,
            winner=run.rows[winner] if winner is not None else None,
            checkout={
                label: {
                    "likeness": c.likeness,
                    "summary": c.summary(),
                    "samples": c.samples,
                    "per_class": c.per_class,
                    "grid_png": checkout_png(label),
                }
                for label, c in run.checkouts.items()
            },
            finetune=tuned,
            skipped=run.skipped,
            interrupted=interrupted,
            seconds=time.perf_counter() - run.started,
        )
        data.advice = advice(data)
        markdown = write_outputs(stage, data, {label: c.figure for label, c in run.checkouts.items()})
    return StudyResult(out, data, markdown)
