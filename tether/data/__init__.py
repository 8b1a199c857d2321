"""Datasets for tether's recipes: TRL-format preference data, validated, tokenized and collated; prompt files."""

from tether.data.preference import (
    DataError,
    DataReport,
    PreferenceExample,
    UnreadableRow,
    check_preference_file,
    collate_preference,
    curriculum_order,
    curriculum_stages,
    load_preference_dataset,
    load_rows,
    tokenize_preference_rows,
)
from tether.data.prompts import load_prompt_rows, load_prompts

__all__ = [
    "DataError",
    "DataReport",
    "PreferenceExample",
    "UnreadableRow",
    "check_preference_file",
    "collate_preference",
    "curriculum_order",
    "curriculum_stages",
    "load_preference_dataset",
    "load_prompt_rows",
    "load_prompts",
    "load_rows",
    "tokenize_preference_rows",
]
