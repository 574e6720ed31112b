"""Business errors of the segmentation service; each carries its HTTP status."""

from __future__ import annotations

from crm_common.errors import Conflict, InvalidInput, NotFound


class InvalidRule(InvalidInput):
    """A segment rule that does not validate; the message and details name the bad node."""

    code = "invalid_rule"


class SegmentNotFound(NotFound):
    code = "segment_not_found"


class SegmentKeyTaken(Conflict):
    code = "segment_key_taken"


class ProfileNotFound(NotFound):
    code = "profile_not_found"
