"""The scenarios ``fedistill simulate --scenario`` can load, by name.

Each scenario module is imported only when its scenario is loaded (they read data sets and build teachers).
The scenario modules import :mod:`simulations.scenario` (the dataclasses), never this registry.
"""

from __future__ import annotations

from protocols.errors import ConfigError
from simulations.scenario import Scenario, ScenarioOptions

SCENARIOS = ("hospitals", "banks", "drug-reviews", "health-tweets")


def load_scenario(name: str, options: ScenarioOptions) -> Scenario:
    if options.preset is not None and name != "health-tweets":
        raise ConfigError(f"--preset: the {name} scenario has no presets; only health-tweets has (smoke, tiny, full).")
    if name == "hospitals":
        from simulations.hospitals import load_hospitals

        return load_hospitals(options)
    if name == "banks":
        from simulations.banks import load_banks

        return load_banks(options)
    if name == "drug-reviews":
        from simulations.drug_reviews import load_drug_reviews

        return load_drug_reviews(options)
    if name == "health-tweets":
        from simulations.health_tweets import load_health_tweets_scenario

        return load_health_tweets_scenario(options)
    raise ConfigError(f"--scenario: unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}.")
