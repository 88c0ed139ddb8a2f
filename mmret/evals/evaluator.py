"""What an evaluator is: an evaluate function and the kind of data it reads.

``evaluate(predict_fn, *, data, input_cfg, workdir=None, params=None, **options) -> dict of
metrics``. ``data`` is either one random-access sequence of records (``RECORDS``, e.g. caption5) or
a ``(queries, candidates)`` pair of sequences (``QUERIES_CANDIDATES``). Evaluators are listed by
type name in ``mmret.registry.EVALUATORS``.
"""

import dataclasses
from typing import Callable

RECORDS, QUERIES_CANDIDATES = "records", "queries_candidates"
DATA_KINDS = (RECORDS, QUERIES_CANDIDATES)


@dataclasses.dataclass(frozen=True)
class Evaluator:
  evaluate: Callable[..., dict]
  data: str  # one of DATA_KINDS

  def __post_init__(self):
    if self.data not in DATA_KINDS:
      raise ValueError(
          f"{self.evaluate.__name__}: data must be one of {DATA_KINDS}, " f"got {self.data!r}"
      )
