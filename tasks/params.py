"""``params.yaml`` as one frozen, strictly validated model — the base module of the pipeline.

Every entry point (``infrec <stage> --params``, ``infrec run``, dvc.yaml's stage commands, the
Prefect flows, scheduled deployments) calls :func:`load_params` once, before any stage runs, and
passes the resulting :class:`Params` on. Validation is strict: an unknown section or key is
refused with its dotted path (``fit.dpeth``), numbers must be finite and in range, lists
non-empty; a bad file raises :class:`tasks.errors.InputError` whose message is one line naming the
file and the key.

Locations: ``state_dir`` (default ``.infrec``, git-ignored) holds run state — MLflow's SQLite
database and artifacts, Prefect's home, the data and model outputs of the DVC stages.
``reports_dir`` (default ``reports``, committed) holds the small metrics and plot files that
``dvc metrics``/``dvc plots``/``dvc exp show`` read at every revision. Both are relative to the
working directory (the DVC workspace); ``INFREC_STATE_DIR`` overrides ``state_dir``.

Nothing here reads the environment at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from tasks.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_STATE_DIR = ".infrec"
DEFAULT_REPORTS_DIR = "reports"
# the seven reported metrics (models.metrics.METRIC_KEYS; repeated here so that parsing a params
# file does not import NumPy — a test keeps the two equal)
METRIC_KEYS = ("hr@10", "ndcg@10", "hr@100", "ndcg@100", "psp@10", "psp@100", "auc")
Metric = Literal["hr@10", "ndcg@10", "hr@100", "ndcg@100", "psp@10", "psp@100", "auc"]
_CREDENTIALS = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@\s]+)@", re.IGNORECASE)


class _Section(BaseModel):
    """A params section: unknown keys are refused, values frozen, numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _non_negative_grid(values: tuple[float, ...]) -> tuple[float, ...]:
    if not values:
        raise ValueError("must be a non-empty list of non-negative numbers")
    if any(v < 0 for v in values):
        raise ValueError(f"must be non-negative, got {list(values)}")
    return values


class GenerateParams(_Section):
    """The embedded default data (``tasks.generate``): deterministic synthetic implicit feedback."""

    users: int = Field(3000, ge=10, le=10_000_000)
    items: int = Field(1000, ge=60, le=1_000_000)  # ≥ 50 AUC negatives per user must exist
    seed: int = Field(0, ge=0)


class IngestParams(_Section):
    """How the interactions file is read and split (``tasks.ingest``)."""

    # None: the embedded default (the generate stage's output). A path (absolute, or relative to
    # the working directory) to a MovieLens ratings.dat, CSV/TSV with a header, or Parquet file.
    input: Optional[str] = None
    format: Optional[Literal["movielens", "csv", "tsv", "parquet"]] = None  # None: detect
    user_col: Optional[str] = None  # column names when they are not user_id/item_id/rating or
    item_col: Optional[str] = None  # one of the usual aliases (userId, movieId, …)
    rating_col: Optional[str] = None
    seed: int = Field(0, ge=0)  # the paper's random split (a `split` column in the file wins)
    min_rating: Optional[float] = None  # keep only interactions rated at least this (None: all)
    # users with fewer distinct interactions are dropped — only when infrec draws the split
    min_user_interactions: int = Field(3, ge=1)

    @field_validator("input", "user_col", "item_col", "rating_col")
    @classmethod
    def _not_blank(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (use null for the default)")
        return value


class SelectionParams(_Section):
    """The one metric that decides: ∞-AE's and EASE's λ, Distill-CF's best step (and its in-loop
    λ), early stopping, and the metric every gate compares."""

    metric: Metric = "ndcg@10"


class FitParams(_Section):
    """∞-AE (``tasks.fit``; the depth and the full-data grid also serve gate (c)'s reference)."""

    depth: int = Field(1, ge=1, le=8)
    lambdas: tuple[float, ...] = (0.0, 1.0, 5.0, 20.0, 50.0, 100.0)  # fits on all users
    summary_lambdas: tuple[float, ...] = (1e-5, 1e-3, 0.1, 1.0, 5.0, 50.0)  # fits on summaries
    batch_size: int = Field(2048, ge=1, le=1_000_000)
    # what the candidate's final ∞-AE is fitted on: every training user (``full``), the Distill-CF
    # summary (``summary``), or ``auto``: every user when there are at most ``full_max_users``
    on: Literal["auto", "summary", "full"] = "auto"
    full_max_users: int = Field(20000, ge=1)
    # the NTK grid searched on the summary (validation selection.metric, λ of summary_lambdas):
    # depths (null: [fit.depth]) × weight variances σ_w² × bias variances σ_b²
    kernel_depths: Optional[tuple[int, ...]] = None
    w_vars: tuple[float, ...] = (2.0,)
    b_vars: tuple[float, ...] = (0.01,)
    # candidate families fitted and compared on validation; the best is registered
    families: tuple[Literal["infinite_ae", "blend"], ...] = ("infinite_ae", "blend")
    # the blend's weight of EASE (z-scored scores), chosen on validation from this grid
    blend_weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    @field_validator("lambdas", "summary_lambdas")
    @classmethod
    def _grids(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        return _non_negative_grid(values)

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, raw: Any) -> Any:
        # YAML 1.1 (PyYAML) reads the bare key ``on`` as the boolean true; DVC (YAML 1.2) and
        # every user mean the key "on"
        if isinstance(raw, dict) and True in raw:
            raw = {("on" if k is True else k): v for k, v in raw.items()}
        return raw

    @field_validator("kernel_depths")
    @classmethod
    def _depths(cls, values: Optional[tuple[int, ...]]) -> Optional[tuple[int, ...]]:
        if values is not None and (not values or any(not 1 <= v <= 8 for v in values)):
            raise ValueError(f"must be a non-empty list of depths between 1 and 8, got {list(values)}")
        return values

    @field_validator("w_vars", "b_vars")
    @classmethod
    def _variances(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"must be a non-empty list of positive variances, got {list(values)}")
        return values

    @field_validator("families")
    @classmethod
    def _families(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values or len(set(values)) != len(values):
            raise ValueError(f"must be a non-empty list of distinct families, got {list(values)}")
        return values

    @field_validator("blend_weights")
    @classmethod
    def _weights(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if not values or any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"must be a non-empty list of weights in [0, 1], got {list(values)}")
        return values

    def kernel_grid(self) -> list[tuple[int, float, float]]:
        """The searched ``(depth, σ_w², σ_b²)`` in grid order."""
        default = (self.depth,)
        depths = default if self.kernel_depths is None else self.kernel_depths
        return [(d, w, b) for d in depths for w in self.w_vars for b in self.b_vars]


class DistillParams(_Section):
    """The summary the candidate ∞-AE is fitted on (``tasks.distill``, ``models.distill_cf``)."""

    sampler: Literal["distill-cf", "random", "head"] = "distill-cf"
    budget: int = Field(500, ge=1)  # synthetic users (capped at the number of training users)
    seed: int = Field(0, ge=0)
    steps: int = Field(500, ge=0, le=100_000)  # at most; early stopping may end sooner
    samples: int = Field(200, ge=1, le=100_000)  # Gumbel draws per synthetic user
    tau: float = Field(10.0, gt=0)
    lr: float = Field(0.04, gt=0, le=10)
    reg: float = Field(1e-3, ge=0)  # cardinality regulariser
    patience: int = Field(150, ge=1)  # stop after this many steps without a better evaluation
    min_steps: int = Field(0, ge=0)  # … but never before this step
    eval_every: int = Field(40, ge=1)  # evaluate at steps 25, 50, …, 200 and every this many
    target_batch: Optional[int] = Field(None, ge=1)  # real users per step (None: all)
    # the in-loop checks score a fixed seeded sample of this many validation users when there
    # are more (evaluate.sample_seed); at or below it every user, as before
    eval_max_users: int = Field(10000, ge=50)


class EvaluateParams(_Section):
    """What the gates compare the candidate with (``tasks.evaluate``)."""

    # gate (c)'s reference is ∞-AE on all users; above this many users (the kernel is n × n) on
    # a random sample of this many users instead — the verdict says which
    reference_max_users: int = Field(20000, ge=10)
    reference_seed: int = Field(0, ge=0)
    ease_lambdas: Optional[tuple[float, ...]] = None  # None: models.baselines.EASE_LAMBDAS
    # every model compared (candidate, random users, reference, EASE, PopRec, the champion) is
    # scored on the same fixed seeded sample of this many users of each split when there are
    # more; at or below it on every user (the figures are then the full ones)
    max_users: int = Field(20000, ge=50)
    sample_seed: int = Field(0, ge=0)
    # EASE's item × item inverse is exact up to this many items; above it EASE is fitted on the
    # this-many most popular items (other items score lowest) and the report states the share
    # of train interactions they cover
    ease_max_items: int = Field(10000, ge=100)
    # a Dask scheduler (tcp://host:8786) that scores and ranks the user batches of every model's
    # final evaluation (tasks.cluster); null: in this process. The figures are the same.
    dask_address: Optional[str] = None

    @field_validator("dask_address")
    @classmethod
    def _address(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^(tcp|tls|inproc|ucx)://\S+$", value):
            raise ValueError(f"expected a Dask scheduler address such as tcp://10.0.0.1:8786, "
                             f"got {value!r}")
        return value

    @field_validator("ease_lambdas")
    @classmethod
    def _grid(cls, values: Optional[tuple[float, ...]]) -> Optional[tuple[float, ...]]:
        return None if values is None else _non_negative_grid(values)


class GatesParams(_Section):
    """Thresholds of the promotion gates, on ``selection.metric`` (metrics are ×100)."""

    pop_margin: float = Field(1.0, ge=-100, le=100)  # (a) candidate val − PopRec val ≥ this
    ease_fraction: float = Field(0.97, ge=0, le=2)  # (a) candidate val ≥ this × tuned EASE val
    champion_epsilon: float = Field(0.5, ge=0, le=100)  # (b) candidate test ≥ champion − ε
    fidelity_fraction: float = Field(0.95, ge=0, le=2)  # (c) test ≥ this × ∞-AE on all users
    # (0) a candidate evaluated on fewer test users is not eligible (too little evidence)
    min_eval_users: int = Field(50, ge=1)
    # (b) the champion is compared only when it knows at least this share of the data's items
    # (the same catalogue); a champion of another catalogue is skipped, with the reason
    min_catalogue_overlap: float = Field(0.5, ge=0, le=1)
    # (c) the candidate's summary must touch items carrying at least this share of the train
    # interactions (reports/distill.json's coverage); below it, rejected for that reason
    min_summary_coverage: float = Field(0.5, ge=0, le=1)


class RegistryParams(_Section):
    model_name: str = Field("infrec-infae", min_length=1, pattern=r"^[A-Za-z0-9][\w.-]*$")
    experiment: str = Field("infrec", min_length=1)


class TrackingParams(_Section):
    # None: sqlite:///<state_dir>/mlflow.db; MLFLOW_TRACKING_URI overrides. Never credentials
    # here (they would be stored with every run): use MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN.
    uri: Optional[str] = None

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and _CREDENTIALS.match(value):
            raise ValueError("must not contain credentials (user:password@); set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
        return value


class ScheduleParams(_Section):
    """When ``infrec serve`` runs the pipeline: a cron expression in an IANA time zone (checked
    cheaply here; Prefect validates the expression fully when the deployment is built)."""

    cron: str = "0 3 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"expected a 5-field cron expression (e.g. '0 3 * * *'), got {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} "
                             "(an IANA name, e.g. UTC, Europe/Paris)") from None
        return value


class VersioningParams(_Section):
    """DVC data versions (``tasks.version``), recorded after each pipeline run when enabled."""

    enabled: bool = False
    # the git + DVC workspace holding dvc.yaml (relative to the working directory). Data goes to
    # the DVC default remote, or — when none is configured — to a local one in <state_dir>/dvc-remote
    workspace: str = "."


class ServingParams(_Section):
    """Limits of the served model and ``infrec recommend`` (requests above them are refused)."""

    max_k: int = Field(1000, ge=1)
    max_history: int = Field(10_000, ge=1)  # item ids in one history
    max_batch: int = Field(10_000, ge=1)  # histories in one request


class Params(BaseModel):
    """The whole ``params.yaml``: every section and key is known."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    state_dir: str = Field(DEFAULT_STATE_DIR, min_length=1)
    reports_dir: str = Field(DEFAULT_REPORTS_DIR, min_length=1)
    generate: GenerateParams = GenerateParams()
    ingest: IngestParams = IngestParams()
    selection: SelectionParams = SelectionParams()
    fit: FitParams = FitParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    gates: GatesParams = GatesParams()
    registry: RegistryParams = RegistryParams()
    tracking: TrackingParams = TrackingParams()
    schedule: ScheduleParams = ScheduleParams()
    versioning: VersioningParams = VersioningParams()
    serving: ServingParams = ServingParams()

    @model_validator(mode="before")
    @classmethod
    def _sections_are_mappings(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for name, field in cls.model_fields.items():
                value = raw.get(name)
                if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                    if name in raw and value is None:
                        raw = {**raw, name: {}}  # `fit:` with nothing under it
        return raw

    # -- resolved locations -----------------------------------------------------------------
    def state_path(self) -> Path:
        """Absolute state directory (``INFREC_STATE_DIR`` overrides ``state_dir``)."""
        return Path(os.environ.get("INFREC_STATE_DIR") or self.state_dir).expanduser().resolve()

    def reports_path(self) -> Path:
        return Path(self.reports_dir).expanduser().resolve()

    def tracking_uri(self) -> str:
        """``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else ``sqlite:///mlflow.db`` in
        the workspace — where ``mlflow ui`` and ``mlflow models serve`` look by default."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{self.workspace_path() / 'mlflow.db'}"

    def workspace_path(self) -> Path:
        return Path(self.versioning.workspace).expanduser().resolve()

    def paths(self) -> "StagePaths":
        """The fixed input/output locations of the stages (as dvc.yaml names them)."""
        return StagePaths(self)

    def input_path(self) -> Path:
        """The file the ingest stage reads: ``ingest.input`` or the generated default."""
        if self.ingest.input is not None:
            return Path(self.ingest.input).expanduser().resolve()
        return self.paths().generated

    def resolved(self) -> "Params":
        """A copy with absolute ``state_dir``, ``reports_dir`` and ``ingest.input`` (the
        environment read once); what flows and deployments receive. The tracking URI is *not*
        baked in: it may carry credentials and is read from the environment where it is used."""
        ingest = self.ingest
        if ingest.input is not None:
            ingest = ingest.model_copy(update={"input": str(self.input_path())})
        return self.model_copy(update={"state_dir": str(self.state_path()),
                                       "reports_dir": str(self.reports_path()),
                                       "ingest": ingest})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self, *keys: str) -> str:
        """Short hash of some dotted keys' values (or of all params when none is given)."""
        data = self.to_dict()
        chosen = {k: get_key(data, k) for k in keys} if keys else data
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StagePaths:
    """Where every stage reads and writes (absolute), matching dvc.yaml's ``${state_dir}/…`` and
    ``${reports_dir}/…`` paths. Each folder is resolved when a path under it is asked for, so a
    stage reads only the keys of the paths it uses."""

    params: Any

    @property
    def state(self) -> Path:
        return self.params.state_path()

    @property
    def reports(self) -> Path:
        return self.params.reports_path()

    # state (git-ignored; data and models DVC-cached)
    @property
    def generated(self) -> Path:
        return self.state / "data" / "raw" / "interactions.csv"

    @property
    def log(self) -> Path:  # a link to the file ingest reads: the ingest stage's DVC dependency
        return self.state / "log"

    @property
    def snapshot(self) -> Path:  # a copy of the file that was ingested (DVC-cached with each version)
        return self.state / "data" / "input"

    @property
    def processed(self) -> Path:
        return self.state / "data" / "processed"

    @property
    def summary(self) -> Path:
        return self.state / "data" / "summary.parquet"

    @property
    def distill_log(self) -> Path:  # every step, with timings (not versioned)
        return self.state / "data" / "distill_log.jsonl"

    @property
    def model(self) -> Path:
        return self.state / "model"

    @property
    def runs(self) -> Path:
        return self.state / "runs"

    # reports (committed beside dvc.lock: small, deterministic)
    @property
    def distill_report(self) -> Path:
        return self.reports / "distill.json"

    @property
    def distill_curve(self) -> Path:
        return self.reports / "distill_curve.csv"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def lambda_path(self) -> Path:
        return self.reports / "lambda_path.json"

    @property
    def evaluation(self) -> Path:
        return self.reports / "evaluation.json"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"


def get_key(data: dict[str, Any], dotted: str) -> Any:
    """``get_key(d, "fit.depth")`` → ``d["fit"]["depth"]`` (KeyError naming the key)."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def redact(text: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://***@host`` (anywhere in ``text``)."""
    return re.sub(r"([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", r"\1***@", str(text), flags=re.IGNORECASE)


def _format_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        section = first["loc"][0] if len(first["loc"]) > 1 else None
        message = (f"unknown key in section '{section}'" if section else "unknown section")
    elif first["type"] == "finite_number":
        message = "must be a finite number (not NaN or infinity)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}"


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a mapping (e.g. ``yaml.safe_load`` of ``params.yaml``)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{source}: {_format_error(exc)}") from None


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate a params file; a missing default ``params.yaml`` gives the defaults."""
    import yaml

    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PARAMS
    if not path.exists():
        if explicit:
            raise InputError(f"{path}: params file not found")
        return Params()
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text (UTF-8) file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}:{line} invalid YAML ({problem})") from None
    return parse_params(raw, str(path))


def with_overrides(params: Params, overrides: dict[str, Any], source: str = "override") -> Params:
    """``params`` with dotted keys replaced (``{"ingest.input": "log.csv"}``), re-validated."""
    data = params.to_dict()
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"{source}: {dotted}: not a section")
        node[parts[-1]] = value
    return parse_params(data, source)


def _yaml11_keys(node: Any) -> Any:
    """``node`` with the keys YAML 1.1 reads as the boolean true (a bare ``on``) named "on"."""
    if isinstance(node, dict):
        return {("on" if k is True else k): _yaml11_keys(v) for k, v in node.items()}
    return node


def _yaml_value(value: Any) -> str:
    """``value`` as a one-line YAML flow value that YAML reads back as the same value (a float
    such as 1e-05 is written 1.0e-05: YAML 1.1 reads ``1e-05`` as a string)."""
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            mantissa += "" if "." in mantissa else ".0"
            exponent = exponent if exponent[0] in "+-" else "+" + exponent
            text = f"{mantissa}e{exponent}"
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON scalar is a YAML scalar


def set_in_file(path: str | Path, dotted: str, value: Any) -> bool:
    """Set ``section.key`` in a YAML params file, keeping its layout and comments (the rest of
    the file is unchanged, which is checked). Returns False when it already had that value."""
    import yaml

    from tasks.io import write_text

    path = Path(path)
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    section, key = dotted.split(".")
    if isinstance(data.get(section), dict) and data[section].get(key) == value:
        return False
    rendered = _yaml_value(value)
    lines = text.splitlines(keepends=True)
    head = next((i for i, ln in enumerate(lines)
                 if re.match(rf"^{re.escape(section)}:\s*(#.*)?$", ln.rstrip("\n"))), None)
    if head is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += [f"{section}:\n", f"  {key}: {rendered}\n"]
    else:
        end = head + 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
            end += 1
        # the key bare or quoted ("on" is quoted in params.yaml: YAML 1.1 reads a bare on as true)
        pattern = re.compile(rf"^(\s+)([\"']?){re.escape(key)}\2:[^#\n]*?(\s+#.*)?$")
        for i in range(head + 1, end):
            m = pattern.match(lines[i].rstrip("\n"))
            if m:
                block = not lines[i].split("#", 1)[0].split(":", 1)[1].strip()
                lines[i] = f"{m.group(1)}{m.group(2)}{key}{m.group(2)}: {rendered}{m.group(3) or ''}\n"
                if block:  # a block value below the key (a `- item` list, a mapping): replaced
                    own = len(m.group(1))
                    j = i + 1
                    while j < end and lines[j].strip() and (
                            len(lines[j]) - len(lines[j].lstrip()) > own
                            or lines[j].lstrip().startswith("- ")):
                        j += 1
                    del lines[i + 1:j]
                break
        else:
            indent = next((re.match(r"^(\s+)", ln).group(1) for ln in lines[head + 1:end]
                           if ln.strip()), "  ")
            lines.insert(head + 1, f"{indent}{key}: {rendered}\n")
    new_text = "".join(lines)
    expected = json.loads(json.dumps(_yaml11_keys(data)))
    expected.setdefault(section, {})
    if expected[section] is None:
        expected[section] = {}
    expected[section][key] = value
    if json.loads(json.dumps(_yaml11_keys(yaml.safe_load(new_text)))) != expected:
        raise InputError(f"{path}: cannot set {dotted} without rewriting the file; set it by hand")
    parse_params(yaml.safe_load(new_text), str(path))
    write_text(path, new_text)
    return True


__all__ = ["Params", "StagePaths", "load_params", "parse_params", "with_overrides", "get_key",
           "redact", "set_in_file", "METRIC_KEYS"]
