"""Tasks generated in code: prompt rows with the metadata their rewards need."""

from tether.tasks.instructions import (
    ALL_KINDS,
    BASE_REQUESTS,
    DEFAULT_KINDS,
    SPLITS,
    base_requests,
    make_instruction_prompts,
    write_jsonl,
)

__all__ = [
    "ALL_KINDS",
    "BASE_REQUESTS",
    "DEFAULT_KINDS",
    "SPLITS",
    "base_requests",
    "make_instruction_prompts",
    "write_jsonl",
]
