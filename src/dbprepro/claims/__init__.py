"""Every claim of both papers as a tested verdict: the statistics (:mod:`.stats`), the claims a
run can test (:mod:`.paper1`, :mod:`.paper2`, on :mod:`.base`'s :class:`Claim` and
:class:`RunData`) and the table (:mod:`.table`, ``results/tables/claims.csv``)."""

from .base import Claim, RunData  # noqa: F401
from .table import apply_family, claims_table, load_run_data, write_claims_table  # noqa: F401
