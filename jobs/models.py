"""Where a model or tokenizer comes from: a finished stage output in the store, or a Hub id."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobs import store
from jobs.contract import StageContext

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(ref: str) -> bool:
    return not store.is_s3(ref) and not Path(ref).exists() and bool(_HUB_ID.match(ref))


def model_source(ctx: StageContext, ref: str, revision: str | None = None) -> str:
    """A path or Hub id ``from_pretrained`` can load; the input is recorded in the manifest."""
    if is_hub_id(ref):
        ctx.input_hub(ref, revision)
        return ref
    return str(ctx.input_dir(ref))


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report where weights are missing by design (a new head)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
