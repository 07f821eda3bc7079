"""``params.yaml`` as validated, frozen pydantic models, and where the run state lives.

``load_params(path)`` is called once, at the entry point (``infrec run``, ``infrec promote``…);
flows receive the parsed :class:`Params`. A bad file raises :class:`tasks.errors.InputError` with a
one-line message naming the key at fault.

State (never committed; ``.infrec/`` is git-ignored) — one project-local directory:

* ``mlflow.db`` — MLflow tracking + registry (SQLite); ``mlartifacts/`` — MLflow artifacts;
* ``prefect/`` — ``PREFECT_HOME`` for Prefect's ephemeral mode (when no Prefect API is set);
* ``data/raw/``, ``data/processed/`` — the generated default input and the ingested data;
* ``runs/<stamp>/`` — each pipeline run's summary, models and plots (logged to MLflow).

``state_dir`` (default ``.infrec``) is relative to the working directory; ``INFREC_STATE_DIR``
overrides it. ``MLFLOW_TRACKING_URI`` overrides the embedded tracking URI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_STATE_DIR = ".infrec"


class _Section(BaseModel):
    """A section this project owns: unknown keys are typos and are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _SharedSection(BaseModel):
    """A section other stages also read: unknown keys are kept, not refused."""

    model_config = ConfigDict(extra="allow", frozen=True)


class GenerateParams(_SharedSection):
    users: int = Field(3000, ge=2)
    items: int = Field(1000, ge=10)
    seed: int = 0


class IngestParams(_SharedSection):
    input: Optional[str] = None  # None: the generated default, <state_dir>/data/raw/interactions.csv
    seed: int = 0
    min_rating: Optional[float] = None


class FitParams(_SharedSection):
    depth: int = Field(1, ge=1, le=8)
    lambdas: list[float] = [0.0, 1.0, 5.0, 20.0, 50.0, 100.0]
    summary_lambdas: list[float] = [1e-5, 1e-3, 0.1, 1.0, 5.0, 50.0]
    batch_size: int = Field(2048, ge=1)

    @field_validator("lambdas", "summary_lambdas")
    @classmethod
    def _non_negative(cls, values: list[float]) -> list[float]:
        if not values or any(v < 0 for v in values):
            raise ValueError("must be a non-empty list of non-negative numbers")
        return values


class DistillParams(_Section):
    """The summary the candidate is fitted on (``tasks.distill.distill_dataset``)."""

    sampler: Literal["distill-cf", "random", "head"] = "distill-cf"
    budget: int = Field(500, ge=1)
    seed: int = 0
    steps: int = Field(500, ge=0)
    samples: int = Field(200, ge=1)
    tau: float = Field(10.0, gt=0)
    options: dict[str, Any] = {}  # any further keyword of distill_dataset (e.g. patience)


class EvaluateParams(_Section):
    # The fidelity gate's reference is ∞-AE on all users; above this many users (the kernel is
    # n × n), on a random sample of this many users instead — the verdict says which.
    reference_max_users: int = Field(20000, ge=10)
    reference_seed: int = 0
    ease_lambdas: Optional[list[float]] = None  # None: models.baselines.EASE_LAMBDAS


class GatesParams(_Section):
    """Thresholds of the promotion gates (metrics are ×100, like every reported metric)."""

    metric: str = "ndcg@10"
    pop_margin: float = 1.0  # (a) candidate val − PopRec val ≥ this many points
    ease_fraction: float = Field(0.97, ge=0, le=2)  # (a) candidate val ≥ this × tuned EASE val
    champion_epsilon: float = Field(0.5, ge=0)  # (b) candidate test ≥ champion test − ε
    fidelity_fraction: float = Field(0.95, ge=0, le=2)  # (c) test ≥ this × ∞-AE on all users

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        from models.metrics import METRIC_KEYS

        if value not in METRIC_KEYS:
            raise ValueError(f"unknown metric {value!r} (one of {', '.join(METRIC_KEYS)})")
        return value


class RegistryParams(_Section):
    model_name: str = Field("infrec-infae", min_length=1)
    experiment: str = Field("infrec", min_length=1)


class VersioningParams(_Section):
    """DVC data versions (``tasks/versioning.py``): recorded after each pipeline run when enabled."""

    enabled: bool = False
    # the git + DVC workspace holding dvc.yaml (relative to the cwd). Data goes to the DVC default
    # remote, or — when none is configured — to a local remote in <state_dir>/dvc-remote.
    workspace: str = "."


class ScheduleParams(_Section):
    """When ``infrec serve`` runs the pipeline: a cron expression in an IANA time zone.

    Checked here cheaply (five fields, a known zone); Prefect validates the expression fully when
    ``infrec serve`` builds the deployment.
    """

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


class TrackingParams(_Section):
    uri: Optional[str] = None  # None: sqlite:///<state_dir>/mlflow.db (MLFLOW_TRACKING_URI wins)


class Params(BaseModel):
    """The whole ``params.yaml``; top-level keys of other tools are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)

    state_dir: str = DEFAULT_STATE_DIR
    generate: GenerateParams = GenerateParams()
    ingest: IngestParams = IngestParams()
    fit: FitParams = FitParams()
    distill: DistillParams = DistillParams()
    evaluate: EvaluateParams = EvaluateParams()
    gates: GatesParams = GatesParams()
    registry: RegistryParams = RegistryParams()
    tracking: TrackingParams = TrackingParams()
    schedule: ScheduleParams = ScheduleParams()
    versioning: VersioningParams = VersioningParams()

    # -- resolved locations -----------------------------------------------------------------
    def state_path(self) -> Path:
        """Absolute state directory (``INFREC_STATE_DIR`` overrides ``state_dir``)."""
        return Path(os.environ.get("INFREC_STATE_DIR") or self.state_dir).expanduser().resolve()

    def tracking_uri(self) -> str:
        """``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri``, else SQLite in the state dir."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{self.state_path() / 'mlflow.db'}"

    def raw_input(self) -> str:
        """The ingest stage's input: ``ingest.input`` or the generated default file."""
        return self.ingest.input or f"{self.state_dir}/data/raw/interactions.csv"

    def stage_paths(self) -> dict[str, str]:
        """The fixed output paths of the stages (as in dvc.yaml), under ``state_dir``."""
        st = self.state_dir
        return {
            "raw": f"{st}/data/raw/interactions.csv",
            "processed": f"{st}/data/processed",
            "summary": f"{st}/data/summary.parquet",
            "distill_log": f"{st}/data/distill_log.jsonl",
            "model": f"{st}/model",
            "metrics": f"{st}/metrics.json",
            "evaluation": f"{st}/evaluation.json",
        }

    def artifact_root(self) -> Path:
        return self.state_path() / "mlartifacts"

    def resolved(self) -> "Params":
        """A copy with ``state_dir`` absolute and ``tracking.uri`` fixed (environment read once)."""
        return self.model_copy(update={
            "state_dir": str(self.state_path()),
            "tracking": TrackingParams(uri=self.tracking_uri()),
        })


def process_defaults() -> dict[str, str]:
    """Environment defaults (never overriding what is set) to apply before NumPy is imported.

    ``OPENBLAS_NUM_THREADS=1``: the pipeline's BLAS calls are small (≤ a few thousand rows) and
    multi-threaded OpenBLAS spin-waits when the cores are shared — measured on this 2-core
    machine under load: EASE + the full-data reference 38 s with the default threads, 5 s with
    one. Set ``OPENBLAS_NUM_THREADS`` yourself to change it.
    """
    defaults = {"OPENBLAS_NUM_THREADS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                # a fresh ephemeral server migrates its DB (≈ 14 s, more on a busy machine)
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    return {k: v for k, v in defaults.items() if k not in os.environ}


def runtime_environment(params: Params) -> dict[str, str]:
    """Environment variables an entry point sets before importing Prefect (none already set).

    With no Prefect API configured (``PREFECT_API_URL``/``PREFECT_HOME`` unset), Prefect's
    ephemeral mode keeps its database in ``<state_dir>/prefect``; the user's own profiles file
    (``~/.prefect/profiles.toml``) stays in effect, so a profile's API URL is still honoured.
    ``JAX_COMPILATION_CACHE_DIR`` defaults to ``<state_dir>/jax-cache``. Includes
    :func:`process_defaults`.
    """
    env: dict[str, str] = process_defaults()
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # compiled XLA programs persist across scheduled runs: on a GPU each new shape costs
        # seconds of compilation and GEMM autotuning (measured on an H200: 8 s before the first
        # product), paid once per machine instead of once per run
        env["JAX_COMPILATION_CACHE_DIR"] = str(params.state_path() / "jax-cache")
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        env["PREFECT_HOME"] = str(params.state_path() / "prefect")
        profiles = Path.home() / ".prefect" / "profiles.toml"
        if profiles.is_file() and not os.environ.get("PREFECT_PROFILES_PATH"):
            env["PREFECT_PROFILES_PATH"] = str(profiles)
    return env


def _format_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate a mapping (e.g. ``yaml.safe_load`` of ``params.yaml``)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of stage names, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{source}: {_format_error(exc)}") from None


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate ``params.yaml``; a missing default file gives the built-in defaults."""
    import yaml

    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_PARAMS
    if not path.exists():
        if explicit:
            raise InputError(f"{path}: params file not found")
        return Params()
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise InputError(f"{path}:{line} invalid YAML ({problem})") from None
    return parse_params(raw, str(path))


__all__ = ["Params", "load_params", "parse_params", "GatesParams", "DistillParams"]


def stage_defaults(stage: str, params: Params) -> dict[str, Any]:
    """Option defaults of ``infrec <stage> --params FILE``: the pipeline's values for that stage.

    dvc.yaml calls the stage commands this way, so `dvc repro` and the Prefect pipeline run the
    same code with the same parameters and write the same paths.
    """
    paths = params.stage_paths()
    if stage == "generate":
        g = params.generate
        return {"out": paths["raw"], "users": g.users, "items": g.items, "seed": g.seed}
    if stage == "ingest":
        return {"input": params.raw_input(), "out": paths["processed"], "seed": params.ingest.seed,
                "min_rating": params.ingest.min_rating, "overwrite": True}
    if stage == "distill":
        d = params.distill
        return {"data": paths["processed"], "out": paths["summary"], "log": paths["distill_log"],
                "sampler": d.sampler, "budget": d.budget, "seed": d.seed, "steps": d.steps,
                "samples": d.samples, "tau": d.tau}
    if stage == "fit":
        f = params.fit
        return {"data": paths["processed"], "support": paths["summary"], "out": paths["model"],
                "metrics": paths["metrics"], "lambdas": ",".join(f"{v:g}" for v in f.summary_lambdas),
                "depth": f.depth, "batch_size": f.batch_size, "overwrite": True}
    if stage == "evaluate":
        return {"data": paths["processed"], "model": paths["model"], "out": paths["evaluation"]}
    raise KeyError(stage)
