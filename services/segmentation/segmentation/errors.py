"""Business errors of the segmentation service; each carries its HTTP status."""

from __future__ import annotations

from crm_common.errors import Conflict, InvalidInput, NotFound, coded

# A segment rule that does not validate; the message and details name the bad node.
InvalidRule = coded(InvalidInput, "invalid_rule")
SegmentNotFound = coded(NotFound, "segment_not_found")
SegmentKeyTaken = coded(Conflict, "segment_key_taken")
ProfileNotFound = coded(NotFound, "profile_not_found")
