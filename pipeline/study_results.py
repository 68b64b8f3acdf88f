"""What a study measured, typed: its rows, its fine-tuning run and the whole study.json object.

study.py builds these, study_report.py and the HTML report read them; study.json is `to_json()` and
`from_json()` reads it back. from_json takes files of older versions: an optional field they lack gets its default,
a key this version does not know is dropped,
a required field that is missing is a ValueError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .artifacts import STUDY_JSON, read_json
from .errors import UserError

KINDS = ("layer", "hypercolumn", "ensemble", "finetune")


def _build(cls: type, data: dict[str, Any], **parsed: Any) -> Any:
    """cls from the keys of data that are its fields (parsed ones replaced); a missing field is a ValueError."""
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names}, **parsed)
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"not a study.json {cls.__name__}: {exc}") from None


@dataclass
class StudyRow:
    """One configuration of the study table: its sources, its head and what was measured on it."""

    backbone: str  # "A" or "A+B" (an ensemble)
    layer: str  # "top", "block6a+top" (a hypercolumn, or the two layers of an ensemble)
    kind: str  # one of KINDS
    head: str  # logreg, svm, ... or "finetune"
    cv_accuracy: float | None  # None for a fine-tuning run (it is not cross-validated)
    test_accuracy: float
    test_ci: list[float]  # 95% Wilson interval of test_accuracy
    n_test: int
    fit_seconds: float
    infer_ms_per_image: float  # backbone(s) up to the layer(s), plus the head
    model_mb: float  # float32 backbone parameters up to the layer(s), plus the pickled head
    extract_images_per_s: float | None = None
    cv_folds: int | None = None
    best_params: dict[str, Any] | None = None
    n_train: int | None = None
    feature_dim: int | None = None
    cache: str | None = None  # the (first) feature cache
    head_dir: str | None = None  # where the study saved it as a head folder, relative to the study folder

    @property
    def name(self) -> str:
        """'backbone layer head'."""
        return f"{self.backbone} {self.layer} {self.head}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyRow:
        return _build(cls, {"kind": "layer", **data})  # rows before hypercolumns were all single layers


@dataclass
class FinetuneResult:
    """The study's fine-tuning run and its paired test against the winner head."""

    row: StudyRow
    paired_test: dict[str, Any]  # exact McNemar: n, a_only, b_only, p_value
    verdict: str
    worth_it: bool
    init_head: str | None = None
    epochs_run: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "row": self.row.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FinetuneResult:
        return _build(cls, {k: v for k, v in data.items() if k != "row"}, row=StudyRow.from_json(data["row"]))


@dataclass
class StudyResults:
    """The study.json object: the dataset, the options, every row, the winner, the advice and the checkouts."""

    dataset_root: str
    n_images: int
    images_per_class: dict[str, int]
    seed: int
    rows: list[StudyRow]
    winner: StudyRow | None  # the row with the best CV accuracy (also in rows, with head_dir "winner")
    seconds: float
    test_size: float = 0.2
    cv: int = 5
    heads: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    near_duplicates: dict[str, Any] = field(default_factory=dict)  # threshold, pairs
    ensembles: bool = False
    views: int = 0
    backbones: dict[str, dict[str, Any]] = field(default_factory=dict)  # config, layers, notes, ms, failed
    checkout: dict[str, dict[str, Any]] = field(default_factory=dict)  # per backbone: likeness, samples, ...
    finetune: FinetuneResult | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # config, reason
    interrupted: bool = False
    advice: dict[str, Any] = field(default_factory=dict)  # study_report.advice()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = [r.to_json() for r in self.rows]
        data["winner"] = self.winner.to_json() if self.winner else None
        data["finetune"] = self.finetune.to_json() if self.finetune else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyResults:
        parsed = {
            "rows": [StudyRow.from_json(r) for r in data.get("rows", [])],
            "winner": StudyRow.from_json(data["winner"]) if data.get("winner") else None,
            "finetune": FinetuneResult.from_json(data["finetune"]) if data.get("finetune") else None,
        }
        return _build(cls, {k: v for k, v in data.items() if k not in parsed}, **parsed)


def read_study(folder: str | Path) -> StudyResults:
    """A study folder's study.json; a missing, damaged or foreign one is a UserError naming it."""
    path = Path(folder) / STUDY_JSON
    data = read_json(path, "it is written by `study`")
    try:
        return StudyResults.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{path} is not a study.json this version reads ({exc}); run `cnncodes study` again.") from None
