"""Load an ingested data directory (``infrec ingest`` output) into sparse matrices."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from models.infinite_ae import EvalSet
from models.metrics import propensity_weights, sample_negatives, sample_users
from tasks.errors import InputError

AUC_NEGATIVES = 50
AUC_SEED = 0
REQUIRED_FILES = ("interactions.parquet", "user_map.parquet", "item_map.parquet", "manifest.json")


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test interactions as binary CSR matrices (users × items)."""

    path: Path
    train: sp.csr_matrix
    val: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray  # raw user id of each user index
    item_ids: np.ndarray  # raw item id of each item index
    manifest: dict

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @cached_property
    def item_weights(self) -> np.ndarray:
        """PSP weights from train counts."""
        counts = np.asarray(self.train.sum(axis=0)).ravel()
        return propensity_weights(counts, int(self.train.nnz))

    @cached_property
    def negatives(self) -> np.ndarray:
        """50 AUC negatives per user (fixed seed), among items in neither the user's train nor test
        set — validation items may be drawn, as the specification and the reference implementation
        do (``../shared/docs/algorithms.md``, "Evaluation"). The same negatives serve validation
        and test."""
        return sample_negatives(self.train + self.test, AUC_NEGATIVES, AUC_SEED)

    def sample_negatives(self, rows: np.ndarray) -> np.ndarray:
        """AUC negatives of the users ``rows`` only (a user sample: drawing them for every user
        would cost as much as the evaluation saved). Same rule as :attr:`negatives`, the draw
        seeded by :data:`AUC_SEED` over the sample's rows."""
        return sample_negatives((self.train[rows] + self.test[rows]).tocsr(), AUC_NEGATIVES,
                                AUC_SEED)

    def val_set(self, max_users: int | None = None, seed: int = 0) -> EvalSet:
        """Validation: context = train rows, targets = validation items.

        ``max_users``: above this many validation users, a fixed seeded sample of that many
        (:func:`models.metrics.sample_users`: the same users for every model scored with the same
        setting); at or below it — or None — every user.
        """
        rows = sample_users(self.val, max_users, seed)
        if rows is None:
            return EvalSet(context=self.train, targets=self.val, weights=self.item_weights,
                           negatives=self.negatives)
        return EvalSet(context=self.train[rows], targets=self.val[rows], weights=self.item_weights,
                       negatives=self.sample_negatives(rows), rows=rows,
                       population=int((np.diff(self.val.indptr) > 0).sum()))

    def test_set(self, max_users: int | None = None, seed: int = 0) -> EvalSet:
        """Test: context = train + validation rows, targets = test items (``max_users``, ``seed``:
        as in :meth:`val_set`)."""
        rows = sample_users(self.test, max_users, seed)
        if rows is None:
            ctx = (self.train + self.val).tocsr()
            ctx.data[:] = 1.0
            return EvalSet(context=ctx, targets=self.test, weights=self.item_weights,
                           negatives=self.negatives)
        ctx = (self.train[rows] + self.val[rows]).tocsr()
        ctx.data[:] = 1.0
        return EvalSet(context=ctx, targets=self.test[rows], weights=self.item_weights,
                       negatives=self.sample_negatives(rows), rows=rows,
                       population=int((np.diff(self.test.indptr) > 0).sum()))

    @cached_property
    def data_version(self) -> str:
        """Short content hash of the processed data (from the manifest's output hashes)."""
        import hashlib

        outputs = json.dumps(self.manifest.get("outputs", {}), sort_keys=True).encode()
        return hashlib.sha256(outputs).hexdigest()[:12]


def load_dataset(path: str | Path) -> Dataset:
    """Read an ingested directory; a missing or malformed one raises :class:`InputError`."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: not a data directory (run `infrec ingest` first)")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise InputError(f"{path / name}: missing (not an `infrec ingest` output directory?)")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        inter = pl.read_parquet(path / "interactions.parquet")
        users = pl.read_parquet(path / "user_map.parquet").sort("user")
        items = pl.read_parquet(path / "item_map.parquet").sort("item")
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad input directory
        raise InputError(f"{path}: cannot read processed data ({type(exc).__name__}: {exc})") from exc
    for col in ("user", "item", "split"):
        if col not in inter.columns:
            raise InputError(f"{path / 'interactions.parquet'}: missing column '{col}'")
    n, m = users.height, items.height
    u = inter["user"].to_numpy()
    i = inter["item"].to_numpy()
    split = inter["split"].cast(pl.String).to_numpy()

    def matrix(name: str) -> sp.csr_matrix:
        mask = split == name
        mat = sp.csr_matrix(
            (np.ones(int(mask.sum()), dtype=np.float32), (u[mask], i[mask])), shape=(n, m)
        )
        mat.sum_duplicates()
        mat.data[:] = 1.0
        return mat

    return Dataset(
        path=path,
        train=matrix("train"),
        val=matrix("val"),
        test=matrix("test"),
        user_ids=users["raw_id"].to_numpy(),
        item_ids=items["raw_id"].to_numpy(),
        manifest=manifest,
    )
