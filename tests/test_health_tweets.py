"""The health-tweets corpus: real, cleaned, one agency per site, split by time, disjoint from the public corpus."""

import pandas as pd
import pytest

from protocols.errors import ConfigError
from simulations.health_tweets import agencies_by_size, health_tweet_sites, load_health_tweets


@pytest.fixture(scope="module")
def tweets() -> pd.DataFrame:
    return load_health_tweets()


def test_the_corpus_is_cleaned_and_keyed_by_agency(tweets):
    assert len(tweets) > 59_000 and tweets["agency"].nunique() == 16
    assert not tweets["text"].str.contains("http|&amp;").any() and tweets["text"].is_unique
    assert (tweets["text"].str.len() > 0).all()
    assert tweets["time"].min().year == 2011 and tweets["time"].max().year == 2015


def test_sites_are_the_largest_agencies_split_by_time_and_disjoint_from_the_public_corpus(tweets):
    sites, public = health_tweet_sites(4, frame=tweets)
    assert list(sites) == agencies_by_size(tweets)[:4]
    everything = set(public)
    for agency, splits in sites.items():
        rows = tweets[tweets["agency"] == agency]
        assert len(splits.train) + len(splits.val) + len(splits.test) == len(rows)
        times = dict(zip(rows["text"], rows["time"]))
        assert max(times[t] for t in splits.train) <= min(times[t] for t in splits.val)
        assert max(times[t] for t in splits.val) <= min(times[t] for t in splits.test)
        texts = set(splits.train) | set(splits.val) | set(splits.test)
        assert not texts & everything
        everything |= texts
    assert len(everything) == len(tweets)


def test_a_small_preset_keeps_each_site_s_newest_tweets(tweets):
    sites, _ = health_tweet_sites(3, max_per_site=50, frame=tweets)
    for agency, splits in sites.items():
        assert (len(splits.train), len(splits.val), len(splits.test)) == (35, 5, 10)
        newest = tweets[tweets["agency"] == agency]["text"].tolist()[-50:]
        assert list(splits.train + splits.val + splits.test) == newest


@pytest.mark.parametrize("sites", [0, 16])
def test_too_many_or_too_few_sites_is_refused_by_name(tweets, sites):
    with pytest.raises(ConfigError, match="--sites"):
        health_tweet_sites(sites, frame=tweets)
