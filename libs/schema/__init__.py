"""Tickwise's shared contract: Redis key names, wire models, tables, migrations.

Import models from here (`from libs.schema import BuyEvent, parse_event`),
key names from `libs.schema.keys`, tables from `libs.schema.tables`.
"""

from libs.schema.codec import dumps, loads
from libs.schema.models import *  # noqa: F403 - the package re-exports the models
from libs.schema.models import __all__ as _model_names

__all__ = ["dumps", "loads", *_model_names]
