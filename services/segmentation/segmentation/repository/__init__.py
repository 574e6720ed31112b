"""Every query of the segmentation service, one module per concern.

* `facts`: events stored as facts once by their natural key (purchases, items, refunds, traits,
  identities, deliveries);
* `profiles`: every feature of a customer recomputed from their facts (`RECOMPUTE_SQL`), the
  sweeps' lifecycle and RFM refreshes, profile reads;
* `segments`: segment definitions, members, size history;
* `membership`: compiled rules applied set-based (`membership_sql`), entries and exits logged and
  published through the outbox, the membership lock, dry-run counts;
* `reports`: Pareto, RFM grid, acquisition channels.
"""

from segmentation.repository.facts import FactRepository
from segmentation.repository.membership import MembershipRepository
from segmentation.repository.profiles import ProfileRepository
from segmentation.repository.reports import ReportRepository
from segmentation.repository.segments import SegmentRepository

__all__ = [
    "FactRepository",
    "MembershipRepository",
    "ProfileRepository",
    "ReportRepository",
    "SegmentRepository",
]
