"""Sweep point ids stay stable as options are added: a sweep folder written by an earlier version keeps its finished
points. The ids below were computed by the code before the few-shot, base-to-novel, FedPGP, flwr-datasets
partitioner, precision and tracking options existed (commit e60fd3f); a new option that is not listed in
``sweep.LATER_OPTIONS`` (or is not a tracking field) changes every id and fails here."""
import pytest

from fedclip_cache.federated.config import FederateConfig
from fedclip_cache.sweep import LATER_OPTIONS, point_id

EARLIER_IDS = [({}, "a9b1c6f344c8"), ({"algo": "promptfl"}, "02ffe8e80929"),
               ({"hidden": 64, "rounds": 3}, "864b6db45dbb")]


@pytest.mark.parametrize("options,expected", EARLIER_IDS)
def test_ids_of_points_made_before_the_later_options(options, expected):
    assert point_id(FederateConfig(**options)) == expected


def test_a_later_option_away_from_its_default_is_part_of_the_id():
    base = point_id(FederateConfig())
    assert point_id(FederateConfig(shots=4)) != base
    assert point_id(FederateConfig(base_to_novel=True)) != base
    assert point_id(FederateConfig(seed=7)) == base  # the seed is a column of the point, not its identity


def test_later_options_are_fields():
    fields = set(FederateConfig().to_dict())
    assert set(LATER_OPTIONS) <= fields
